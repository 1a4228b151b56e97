"""The one model client: litellm, streamed, with our own deadlines and one retry policy.

litellm is imported on the first model call, never at node start: its import takes seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import os
import time
from typing import Any, Awaitable, Callable

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from mesh.errors import MeshError

__all__ = ["ModelClient", "ModelError", "ModelFault", "ModelSettings", "ModelTurn"]

log = structlog.get_logger("agent_runtime.model")


class ModelError(MeshError):
    """The provider could not give an answer; the message is the provider's reason."""


class ModelFault(ModelError):
    """A transient provider fault (rate limit, timeout, 5xx, dropped or silent stream)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    model: str
    api_base: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    temperature: float | None = None
    # Output tokens of one call; set by rules (set-params), unlimited otherwise.
    max_tokens: int | None = None
    timeout_s: float = 120.0
    idle_timeout_s: float = 60.0
    retries: int = 4
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0


@dataclasses.dataclass
class ModelTurn:
    text: str = ""
    # (call id, tool name, raw JSON arguments as the model wrote them)
    tool_calls: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    duration_ms: float = 0.0


_litellm: Any = None


def _import_litellm() -> Any:
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True
        litellm.telemetry = False
        _litellm = litellm
    return _litellm


def _retry_after(exc: BaseException) -> float | None:
    """Seconds the provider asked us to wait, from a Retry-After header (seconds or a date)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return getattr(exc, "retry_after", None)
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _translate(exc: Exception) -> ModelError:
    """litellm's exceptions, sorted into transient faults (retried) and final errors."""
    litellm = _import_litellm()
    transient = (
        litellm.RateLimitError,
        litellm.Timeout,
        litellm.APIConnectionError,
        litellm.InternalServerError,
        litellm.ServiceUnavailableError,
        litellm.BadGatewayError,
    )
    reason = str(exc).split("\n")[0][:500]
    if isinstance(exc, transient):
        return ModelFault(reason, retry_after=_retry_after(exc))
    if isinstance(exc, (asyncio.TimeoutError, ConnectionError)):
        return ModelFault(f"{type(exc).__name__}: {reason}")
    return ModelError(reason)


TextCallback = Callable[[str], Awaitable[None] | None]


class ModelClient:
    """Streams one model turn, retrying transient faults with exponential backoff."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        backoff = wait_exponential(
            multiplier=self.settings.retry_base_s, max=self.settings.retry_max_s
        )(state)
        asked = exc.retry_after if isinstance(exc, ModelFault) else None
        return min(asked, self.settings.retry_max_s) if asked is not None else backoff

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        on_text: TextCallback | None = None,
        on_retry: Callable[[int, ModelFault, float], None] | None = None,
    ) -> ModelTurn:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.info("model.retry", attempt=state.attempt_number, delay_s=round(delay, 3),
                     reason=str(exc))
            if on_retry is not None and isinstance(exc, ModelFault):
                on_retry(state.attempt_number, exc, delay)

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, ModelFault)),
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=self._wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._stream_once(messages, tools, on_text)
        raise AssertionError("unreachable: tenacity reraises the last fault")

    async def _stream_once(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        on_text: TextCallback | None,
    ) -> ModelTurn:
        # The first import takes seconds of CPU: in a thread, so the node keeps answering.
        litellm = _litellm if _litellm is not None else await asyncio.to_thread(_import_litellm)
        settings = self.settings
        started = time.perf_counter()
        kwargs: dict[str, Any] = {
            "model": settings.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "timeout": settings.timeout_s,
            # tenacity is the one retry policy; litellm must not retry underneath it.
            "num_retries": 0,
        }
        if tools:
            kwargs["tools"] = tools
        if settings.api_base:
            kwargs["api_base"] = settings.api_base
        if settings.api_key:
            kwargs["api_key"] = settings.api_key
        if settings.temperature is not None:
            kwargs["temperature"] = settings.temperature
        if settings.max_tokens is not None:
            kwargs["max_tokens"] = settings.max_tokens

        turn = ModelTurn()
        calls: dict[int, dict[str, str]] = {}
        finished = False
        try:
            stream = await asyncio.wait_for(
                litellm.acompletion(**kwargs), timeout=settings.idle_timeout_s
            )
            iterator = stream.__aiter__()
            while True:
                # Our own deadline on silence, whatever the provider's client does.
                try:
                    chunk = await asyncio.wait_for(
                        iterator.__anext__(), timeout=settings.idle_timeout_s
                    )
                except StopAsyncIteration:
                    break
                usage = getattr(chunk, "usage", None)
                if usage:
                    turn.prompt_tokens = usage.prompt_tokens or turn.prompt_tokens
                    turn.completion_tokens = usage.completion_tokens or turn.completion_tokens
                for choice in chunk.choices or []:
                    finished = finished or bool(choice.finish_reason)
                    delta = choice.delta
                    if delta.content:
                        turn.text += delta.content
                        if on_text is not None:
                            maybe = on_text(delta.content)
                            if maybe is not None:
                                await maybe
                    for call in delta.tool_calls or []:
                        slot = calls.setdefault(call.index or 0,
                                                {"id": "", "name": "", "arguments": ""})
                        slot["id"] = call.id or slot["id"]
                        if call.function is not None:
                            slot["name"] += call.function.name or ""
                            slot["arguments"] += call.function.arguments or ""
        except asyncio.TimeoutError as exc:
            raise ModelFault(
                f"the model stream stayed silent for {settings.idle_timeout_s:g}s"
            ) from exc
        except ModelError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc

        if not finished and not turn.text and not calls:
            raise ModelFault("the provider returned an empty response")
        turn.tool_calls = [
            (slot["id"] or f"call_{index}", slot["name"], slot["arguments"])
            for index, slot in sorted(calls.items())
        ]
        turn.duration_ms = (time.perf_counter() - started) * 1000
        turn.cost_usd = _cost(litellm, settings.model, turn)
        return turn


def _cost(litellm: Any, model: str, turn: ModelTurn) -> float:
    """The provider's price for the turn, or 0 where litellm has no price for the model."""
    try:
        prompt, completion = litellm.cost_per_token(
            model=model,
            prompt_tokens=turn.prompt_tokens,
            completion_tokens=turn.completion_tokens,
        )
        return float(prompt + completion)
    except Exception:
        return 0.0
