"""HTTP plumbing shared by every service: the error shape, auth, and typed request bodies."""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from mesh.errors import ApiError, BadRequest, PayloadTooLarge, Unauthorized

__all__ = [
    "PUBLIC_PATHS",
    "auth_middleware",
    "error_middleware",
    "field_error",
    "json_response",
    "parse_json",
    "query_int",
    "read_model",
    "validation_message",
]

log = structlog.get_logger("agent_runtime.http")

PUBLIC_PATHS = frozenset({"/healthz", "/.well-known/agent-card.json"})

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, *, status: int = 200) -> web.Response:
    if isinstance(data, BaseModel):
        body = data.model_dump_json()
    elif isinstance(data, list) and data and isinstance(data[0], BaseModel):
        body = "[" + ",".join(item.model_dump_json() for item in data) + "]"
    else:
        body = json.dumps(data, default=_default)
    return web.Response(text=body, status=status, content_type="application/json")


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def validation_message(exc: ValidationError) -> tuple[str, list[dict[str, Any]]]:
    """One readable sentence naming each bad field, plus the structured list."""
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(body)"
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append({"field": field, "message": message})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return f"invalid request: {summary}", problems


def field_error(field: str, message: str) -> BadRequest:
    """A refusal shaped like the one read_model gives for a field pydantic refused."""
    return BadRequest(f"invalid request: {field}: {message}",
                      details={"errors": [{"field": field, "message": message}]})


def query_int(request: web.Request, name: str, default: int | None = None, *,
              maximum: int | None = None) -> int | None:
    """A whole-number query parameter, 0 or more (and at most `maximum`); `default` if absent."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise field_error(name, "must be a whole number") from None
    if value < 0 or (maximum is not None and value > maximum):
        limit = "0 or more" if maximum is None else f"between 0 and {maximum}"
        raise field_error(name, f"must be {limit}")
    return value


def parse_json(raw: bytes | str, what: str = "body") -> Any:
    """Decode JSON from a client; every way it can be malformed is a 400 saying how."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"malformed JSON {what}: {exc}") from exc
    except RecursionError as exc:
        raise BadRequest(f"malformed JSON {what}: nested too deeply") from exc


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse the JSON body into `model`, turning every fault into a 4xx naming the field."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(
            "request body too large", details={"limit_bytes": request.app._client_max_size}
        ) from exc
    data = parse_json(raw if raw.strip() else b"{}", "body")
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, problems = validation_message(exc)
        raise BadRequest(message, details={"errors": problems}) from exc


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every refusal as {"error": {...}}; an unexpected fault is a 500 without detail."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.to_body(), status=exc.status)
    except web.HTTPRequestEntityTooLarge:
        err = PayloadTooLarge("request body too large")
        return json_response(err.to_body(), status=err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        body = {"error": {"code": code, "message": exc.reason, "details": {}}}
        return json_response(body, status=exc.status)
    except (ConnectionResetError, TimeoutError) as exc:
        # The client went away mid-response; there is nobody left to answer.
        log.debug("http.client_gone", path=request.path, error=str(exc))
        raise
    except Exception:
        log.exception("http.internal_error", method=request.method, path=request.path)
        body = {"error": {"code": "internal", "message": "internal error", "details": {}}}
        return json_response(body, status=500)


def auth_middleware(token: str, *, also: Callable[[str, str], bool] | None = None) -> Any:
    """The node's bearer token on every path but the public ones.

    `also(path, presented)` may accept another token for a path: the model gateway's keys.
    """
    expected = token.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or request.method == "OPTIONS":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        presented = header[7:] if header[:7].lower() == "bearer " else ""
        # Browsers cannot set headers on a WebSocket, so the token may come as a query value.
        presented = presented or request.query.get("access_token", "")
        # A header that is not UTF-8 arrives holding lone surrogates; surrogatepass encodes
        # them too, so it is compared (in constant time) and refused like any other.
        raw = presented.encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(raw, expected) and not (
            also is not None and _is_text(presented) and also(request.path, presented)
        ):
            raise Unauthorized(
                "missing bearer token" if not presented else "wrong bearer token"
            )
        return await handler(request)

    return middleware


def _is_text(value: str) -> bool:
    """Whether the string is valid text, without the lone surrogates of undecodable bytes."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
