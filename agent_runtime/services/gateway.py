"""The model gateway: an OpenAI-compatible endpoint that forwards to this node's own provider.

    POST /api/v1/ai/chat/completions   chat completions, whole or streamed (SSE)
    GET  /api/v1/ai/models             the model ids this gateway answers to
    GET  /api/v1/ai/usage              usage per child (node token only)

Nodes this node spawns get no provider key: Peers.spawn mints each child a gateway key of its
own and points the child's agent at this gateway (`openai/default`, so litellm speaks the
OpenAI protocol to it); Peers.stop revokes the key. A gateway key is good for /api/v1/ai/*
alone (never for usage) and only while its child lives; the node's own token works here too.

Model ids: `default` and the configured model's own name both mean the node's model, and
the request runs with the node's provider settings (model, api_base, api_key, temperature
unless the request sets one). Any other id is a 404 `model_not_found`.

Errors here take OpenAI's shape, {"error": {"message", "type", "param", "code"}}, not the
node's, because every caller is an OpenAI client. A provider's refusal keeps its status (400,
429 with its Retry-After, 502-504); its other faults (a 500, no connection, this node's own
credentials refused) are a 502, since neither the caller nor the gateway was at fault.
Missing or wrong keys are refused by the node's auth middleware in the node's shape, which
OpenAI clients read the same way (error.message).

Keys and usage live in memory only: a restarted parent has no children left to serve.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from mesh.errors import MeshError

from ..agent.model import _import_litellm, _retry_after
from ..http import json_response, validation_message

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["ALIAS", "Gateway", "GatewayUsage", "PREFIX", "add_routes"]

log = structlog.get_logger("agent_runtime.gateway")

PREFIX = "/api/v1/ai/"
USAGE_PATH = PREFIX + "usage"
# The model id children are configured with; it always means this node's own model.
ALIAS = "default"


class ChatMessage(BaseModel):
    """A message as litellm needs it to build the provider's request: the rest passes as is."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> Any:
        # Checked here because litellm fails on a malformed part as if the provider were down.
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("content", "must be a string, a list of parts or null")
        for index, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str):
                raise PydanticCustomError(
                    "content", "part {index} must be an object with a `type`", {"index": index})
            if kind not in part:
                # Every OpenAI part carries its data under its type: {"type": "text", "text": .}
                raise PydanticCustomError(
                    "content", "part {index}, of type '{kind}', needs a '{kind}' field",
                    {"index": index, "kind": kind})
        return value


class ChatRequest(BaseModel):
    """The OpenAI chat-completions parameters the gateway forwards; others are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    n: int | None = None
    user: str | None = None


class GatewayUsage(BaseModel):
    """What one caller has used through the gateway."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    active: bool = True


class GatewayError(MeshError):
    """A request the gateway answers with an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, *, kind: str, code: str | None = None,
        param: str | None = None, retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> web.Response:
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["Retry-After"] = f"{self.retry_after:g}"
        return web.json_response(self.body(), status=self.status, headers=headers)


def _digest(key: str) -> bytes:
    # Keys are looked up by their hash, so the lookup's timing says nothing about a key.
    return hashlib.sha256(key.encode()).digest()


class Gateway:
    """The keys this node has handed to its children, and what each has used."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._owners: dict[bytes, str] = {}
        self._keys: dict[str, str] = {}
        self.own_usage = GatewayUsage()
        self.usage: dict[str, GatewayUsage] = {}

    @property
    def model_ids(self) -> list[str]:
        """The ids a request may name; empty while the node has no model."""
        model = self.node.config.model
        return [ALIAS, model] if model else []

    def mint(self, owner: str) -> str:
        """A fresh key for `owner` (a child's id); an older key of the same owner stops."""
        self.revoke(owner)
        key = secrets.token_urlsafe(32)
        self._owners[_digest(key)] = owner
        self._keys[owner] = key
        self.usage[owner] = GatewayUsage()
        log.info("gateway.key_minted", owner=owner)
        return key

    def rename(self, old: str, new: str) -> None:
        """Give `old`'s key and usage to `new`, once a child's id is known."""
        key = self._keys.pop(old, None)
        if key is None:
            return
        self._keys[new] = key
        self._owners[_digest(key)] = new
        self.usage[new] = self.usage.pop(old)

    def revoke(self, owner: str, *, forget: bool = False) -> None:
        """The owner's key stops working at once; its usage stays on record unless `forget`."""
        key = self._keys.pop(owner, None)
        if key is None:
            return
        self._owners.pop(_digest(key), None)
        if forget:
            self.usage.pop(owner, None)
        else:
            self.usage[owner].active = False
        log.info("gateway.key_revoked", owner=owner)

    def key_for(self, owner: str) -> str | None:
        return self._keys.get(owner)

    def owner_of(self, key: str) -> str | None:
        return self._owners.get(_digest(key)) if key else None

    def accepts(self, path: str, key: str) -> bool:
        """Whether a child key may call `path`: a live key, on the gateway's own routes."""
        if not path.startswith(PREFIX) or path == USAGE_PATH:
            return False
        return self.owner_of(key) is not None

    def usage_of(self, owner: str | None) -> GatewayUsage:
        return self.own_usage if owner is None else self.usage[owner]

    def provider_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        """litellm's arguments: the request's parameters with this node's provider settings."""
        config = self.node.config
        if not config.model:
            raise GatewayError(
                503, "this node has no model configured (start it with --model or MESH_MODEL)",
                kind="service_unavailable", code="no_model_configured",
            )
        if request.model not in self.model_ids:
            raise GatewayError(
                404, f"unknown model {request.model!r}; this gateway serves "
                f"{', '.join(self.model_ids)}", kind="invalid_request_error",
                code="model_not_found", param="model",
            )
        kwargs = request.model_dump(exclude_none=True,
                                    exclude={"model", "stream_options", "messages"})
        # Messages go on as the caller wrote them, explicit nulls included.
        kwargs["messages"] = [message.model_dump(exclude_unset=True)
                              for message in request.messages]
        kwargs.update(model=config.model, timeout=config.model_timeout_s,
                      # The caller's client retries; the gateway must not retry underneath.
                      num_retries=0)
        if request.stream:
            # Asked for always, so that the usage of every stream is counted.
            kwargs["stream_options"] = {"include_usage": True}
        if "temperature" not in kwargs and config.temperature is not None:
            kwargs["temperature"] = config.temperature
        if config.api_base:
            kwargs["api_base"] = config.api_base
        if config.api_key or config.api_base:
            # Local OpenAI-compatible servers need no key, but the client insists on one.
            kwargs["api_key"] = config.api_key or "unused"
        return kwargs

    def count(self, record: GatewayUsage, usage: Any) -> None:
        """Add a provider's usage object (prompt and completion tokens) to a caller's record.

        The record is taken when the request comes in: a child's key may be renamed or
        revoked while its request runs, and what it used still counts.
        """
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        completion = getattr(usage, "completion_tokens", 0) or 0
        record.prompt_tokens += prompt
        record.completion_tokens += completion
        record.cost_usd += _cost(self.node.config.model or "", prompt, completion)


async def _litellm() -> Any:
    """litellm, imported in a worker thread.

    The first import takes seconds; the event loop must go on meanwhile (lease renewals,
    other children's calls).
    """
    return await asyncio.to_thread(_import_litellm)


def _cost(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """The provider's price, or 0 where litellm has no price for the model."""
    try:
        prompt, completion = _import_litellm().cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
        return float(prompt + completion)
    except Exception:
        return 0.0


def _unreachable(exc: BaseException, litellm: Any) -> bool:
    """Whether the provider was never reached: litellm reports a refused connection as an
    InternalServerError, with the connection error only in the chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (litellm.APIConnectionError, ConnectionError)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _provider_error(exc: Exception) -> GatewayError:
    """A litellm exception as the OpenAI-style error the caller gets, with a fitting status.

    A provider's own 500 becomes a 502: a 500 from the gateway would say the gateway failed.
    """
    litellm = _import_litellm()
    reason = str(exc).split("\n")[0][:500] or type(exc).__name__
    status = getattr(exc, "status_code", None)
    if isinstance(exc, (litellm.Timeout, asyncio.TimeoutError)):
        return GatewayError(504, reason, kind="server_error", code="provider_timeout")
    if isinstance(exc, (litellm.AuthenticationError, litellm.PermissionDeniedError)):
        return GatewayError(502, f"the provider refused this node's credentials: {reason}",
                            kind="server_error", code="provider_auth_failed")
    if _unreachable(exc, litellm) or not isinstance(status, int) or not 400 <= status <= 599:
        return GatewayError(502, reason, kind="server_error", code="provider_unreachable")
    if status == 429:
        return GatewayError(429, reason, kind="rate_limit_error", code="rate_limit_exceeded",
                            retry_after=_retry_after(exc))
    if status >= 500:
        return GatewayError(status if status in (502, 503, 504) else 502, reason,
                            kind="server_error", code="provider_error")
    return GatewayError(status, reason, kind="invalid_request_error", code="provider_error")


async def _read_request(request: web.Request) -> ChatRequest:
    try:
        data = json.loads(await request.read() or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GatewayError(400, f"malformed JSON body: {exc}",
                           kind="invalid_request_error") from exc
    except RecursionError as exc:
        raise GatewayError(400, "malformed JSON body: nested too deeply",
                           kind="invalid_request_error") from exc
    if not isinstance(data, dict):
        raise GatewayError(400, "request body must be a JSON object",
                           kind="invalid_request_error")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        message, problems = validation_message(exc)
        raise GatewayError(400, message, kind="invalid_request_error",
                           param=problems[0]["field"]) from exc


def _caller(gateway: Gateway, request: web.Request) -> str | None:
    """The child whose key the request carries, or None for the node's own token.

    The auth middleware has already let the request in; a key revoked since then is refused.
    """
    header = request.headers.get("Authorization", "")
    presented = header[7:] if header[:7].lower() == "bearer " else ""
    presented = presented or request.query.get("access_token", "")
    owner = gateway.owner_of(presented)
    token = gateway.node.config.token.encode()
    if owner is None and not hmac.compare_digest(presented.encode(), token):
        raise GatewayError(401, "this gateway key has been revoked",
                           kind="authentication_error", code="invalid_api_key")
    return owner


async def _chunks(stream: Any, idle_timeout_s: float) -> AsyncIterator[Any]:
    """The provider's stream, with our own deadline on silence between chunks."""
    iterator = stream.__aiter__()
    while True:
        try:
            yield await asyncio.wait_for(iterator.__anext__(), timeout=idle_timeout_s)
        except StopAsyncIteration:
            return


async def _send_stream(
    gateway: Gateway, request: web.Request, record: GatewayUsage, kwargs: dict[str, Any],
    wants_usage: bool,
) -> web.StreamResponse:
    """Server-sent chunks as OpenAI sends them, ending with `data: [DONE]`."""
    stream = await (await _litellm()).acompletion(**kwargs)
    chunks = _chunks(stream, gateway.node.config.stream_idle_timeout_s)
    try:
        # The first chunk is awaited before the status is sent, so an early fault keeps its
        # own status instead of arriving inside a 200.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            if first is not None:
                await _send_chunk(gateway, response, record, first, wants_usage)
            async for chunk in chunks:
                await _send_chunk(gateway, response, record, chunk, wants_usage)
        except (ConnectionResetError, web.HTTPException):
            raise
        except Exception as exc:
            error = _provider_error(exc)
            log.info("gateway.stream_failed", error=error.message)
            await response.write(f"data: {json.dumps(error.body())}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    finally:
        await chunks.aclose()
        await stream.aclose()


async def _send_chunk(
    gateway: Gateway, response: web.StreamResponse, record: GatewayUsage, chunk: Any,
    wants_usage: bool,
) -> None:
    usage = getattr(chunk, "usage", None)
    if usage:
        gateway.count(record, usage)
    # The usage-only chunk goes out only to a caller that asked for it, as OpenAI does.
    if chunk.choices or wants_usage:
        await response.write(f"data: {chunk.model_dump_json()}\n\n".encode())


async def _complete(
    gateway: Gateway, request: web.Request, owner: str | None, body: ChatRequest,
) -> web.StreamResponse:
    """Forward one request to the provider; its faults become OpenAI-style errors."""
    kwargs = gateway.provider_kwargs(body)
    record = gateway.usage_of(owner)
    record.requests += 1
    try:
        if body.stream:
            wants_usage = bool((body.stream_options or {}).get("include_usage"))
            return await _send_stream(gateway, request, record, kwargs, wants_usage)
        result = await (await _litellm()).acompletion(**kwargs)
    except (ConnectionResetError, web.HTTPException):
        raise
    except Exception as exc:
        raise _provider_error(exc) from exc
    gateway.count(record, getattr(result, "usage", None))
    return web.json_response(text=result.model_dump_json())


def add_routes(app: web.Application, node: Node) -> None:
    gateway = node.gateway

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            owner = _caller(gateway, request)
            body = await _read_request(request)
            response = await _complete(gateway, request, owner, body)
        except GatewayError as exc:
            log.info("gateway.refused", status=exc.status, code=exc.code, error=exc.message)
            return exc.response()
        log.info("gateway.completion", owner=owner, stream=body.stream,
                 ms=round((time.perf_counter() - started) * 1000))
        return response

    async def models(request: web.Request) -> web.Response:
        data = [{"id": model_id, "object": "model", "created": int(node.started_at),
                 "owned_by": node.config.name} for model_id in gateway.model_ids]
        return web.json_response({"object": "list", "data": data})

    async def usage(request: web.Request) -> web.Response:
        return json_response({"node": gateway.own_usage, "children": gateway.usage})

    app.router.add_post(PREFIX + "chat/completions", chat_completions)
    app.router.add_get(PREFIX + "models", models)
    app.router.add_get(USAGE_PATH, usage)
