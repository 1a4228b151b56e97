"""The agent loop: a model works on a task through the node's tools until it answers.

Each turn the model sees its mode's instructions and tools, streams text (message events) and
asks for tool calls (tool_use / tool_result events). Calls in one turn run concurrently. The
model's mistakes go back to it as error results; provider faults are retried by the model
client; limits on turns, wall time and tokens end the task with a reason.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import structlog

from mesh.models import Task

from ..tasks import TaskError, cut, render_output
from .model import ModelClient, ModelError, ModelFault, ModelSettings, ModelTurn
from .modes import policy_for

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["AgentLoop"]

log = structlog.get_logger("agent_runtime.agent")

# Text deltas are gathered into message events of about this size, so a fast stream does not
# become one event per token.
MESSAGE_EVENT_CHARS = 200


class AgentLoop:
    def __init__(self, node: Node) -> None:
        self.node = node

    def settings_for(self, task: Task) -> ModelSettings | None:
        config = self.node.config
        options = task.options
        model = options.get("model") or config.model
        if not model:
            return None
        api_base = options.get("api_base") or config.api_base
        return ModelSettings(
            model=model,
            api_base=api_base,
            # Local OpenAI-compatible servers need no key, but the client insists on one.
            api_key=config.api_key or ("unused" if api_base else None),
            temperature=options.get("temperature", config.temperature),
            timeout_s=config.model_timeout_s,
            idle_timeout_s=config.stream_idle_timeout_s,
            retries=config.model_retries,
            retry_base_s=config.model_retry_base_s,
        )

    async def run(self, task: Task) -> str:
        settings = self.settings_for(task)
        if settings is None:
            raise TaskError(
                "no model configured: start the node with --model (or MESH_MODEL), pass "
                "`model` with the task, or give the task explicit steps"
            )
        timeout_s = task.options.get("timeout_s") or self.node.config.task_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._turns(task, ModelClient(settings))
        except TimeoutError:
            raise TaskError(f"the task ran past its wall-time limit of {timeout_s:g}s") from None

    async def _turns(self, task: Task, client: ModelClient) -> str:
        node = self.node
        max_steps = task.options.get("max_steps") or node.config.max_steps
        max_tokens = task.options.get("max_tokens") or node.config.max_tokens
        messages = node.store.get_transcript(task.id)
        if not messages:
            messages = [{"role": "user", "content": task.description}]
        mistakes = 0

        for step in range(1, max_steps + 1):
            for text in node.tasks.take_messages(task.id):
                messages.append({"role": "user", "content": text})

            policy = policy_for(task.mode)
            tools = [tool for tool in node.tools.all() if policy.allows(tool)]
            system = self.system_prompt(task, policy.prompt)
            request = await node.rules.prompt(task, system, messages)
            turn = await self._model_turn(task, client, request, tools, step)
            self._count_usage(task, turn)

            assistant: dict[str, Any] = {"role": "assistant", "content": turn.text or None}
            if turn.tool_calls:
                assistant["tool_calls"] = [
                    {"id": call_id, "type": "function",
                     "function": {"name": name, "arguments": raw}}
                    for call_id, name, raw in turn.tool_calls
                ]
            messages.append(assistant)
            node.store.save_transcript(task.id, messages)

            if not turn.tool_calls:
                if node.tasks.has_messages(task.id):
                    continue
                return turn.text

            results = await asyncio.gather(*(
                self._call(task, policy, call_id, name, raw)
                for call_id, name, raw in turn.tool_calls
            ))
            for (call_id, name, _), (content, mistake) in zip(turn.tool_calls, results):
                messages.append({"role": "tool", "tool_call_id": call_id, "name": name,
                                 "content": content})
                mistakes += mistake
            node.store.save_transcript(task.id, messages)

            limit = node.config.max_tool_mistakes
            if mistakes >= limit:
                raise TaskError(
                    f"the model made {mistakes} invalid tool calls (limit {limit}); the last: "
                    f"{cut(results[-1][0], 300)}"
                )
            if max_tokens and task.usage.total_tokens > max_tokens:
                raise TaskError(
                    f"the task used {task.usage.total_tokens} tokens, over its limit of "
                    f"{max_tokens}"
                )

        raise TaskError(f"the model took {max_steps} turns without a final answer (max_steps)")

    def system_prompt(self, task: Task, mode_prompt: str) -> str:
        """The system prompt of a turn: the mode's, then the node's own instructions."""
        instructions = self.node.config.instructions
        return f"{mode_prompt}\n\n{instructions}" if instructions else mode_prompt

    async def _model_turn(
        self, task: Task, client: ModelClient, messages: list[dict[str, Any]],
        tools: list[Any], step: int,
    ) -> ModelTurn:
        events = self.node.events
        buffer: list[str] = []

        def flush_text() -> None:
            if buffer:
                events.emit(task.id, "message", {"role": "assistant", "text": "".join(buffer),
                                                 "step": step})
                buffer.clear()

        def on_text(delta: str) -> None:
            buffer.append(delta)
            if sum(len(part) for part in buffer) >= MESSAGE_EVENT_CHARS:
                flush_text()

        def on_retry(attempt: int, fault: ModelFault, delay: float) -> None:
            buffer.clear()
            events.emit(task.id, "model.retry", {"attempt": attempt, "reason": str(fault),
                                                 "delay_s": round(delay, 3)})

        settings = await self.node.rules.chat_params(task, client.settings, messages)
        try:
            turn = await ModelClient(settings).complete(
                messages, [tool.schema() for tool in tools], on_text=on_text, on_retry=on_retry
            )
        except ModelError as exc:
            raise TaskError(f"model provider failed: {exc}") from exc
        flush_text()
        return turn

    def _count_usage(self, task: Task, turn: ModelTurn) -> None:
        usage = task.usage
        usage.prompt_tokens += turn.prompt_tokens
        usage.completion_tokens += turn.completion_tokens
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        usage.cost_usd += turn.cost_usd
        self.node.events.emit(task.id, "model.usage", {
            "prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
            "cost_usd": turn.cost_usd, "duration_ms": round(turn.duration_ms, 3),
            "total_tokens": usage.total_tokens,
        })

    async def _call(
        self, task: Task, policy: Any, call_id: str, name: str, raw: str
    ) -> tuple[str, int]:
        """Run one call; returns (content for the model, 1 if it was the model's mistake)."""
        tasks = self.node.tasks
        allowed = [tool.name for tool in self.node.tools.all() if policy.allows(tool)]
        try:
            args = json.loads(raw) if raw.strip() else {}
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
        except RecursionError:
            reason = (f"error: the arguments of {name} are nested too deeply; send one flat "
                      "JSON object")
            tasks.refuse_call(task, call_id, name, raw, reason)
            return reason, 1
        except ValueError as exc:
            reason = (f"error: the arguments of {name} are not valid JSON ({exc}); send one "
                      "JSON object")
            tasks.refuse_call(task, call_id, name, raw, reason)
            return reason, 1

        if name not in self.node.tools:
            reason = (f"error: unknown tool {name!r}; tools available in {task.mode.value} "
                      f"mode: {', '.join(allowed)}")
            tasks.refuse_call(task, call_id, name, args, reason)
            return reason, 1
        tool = self.node.tools.get(name)
        refusal = policy.refusal(tool, args)
        if refusal is not None:
            reason = f"error: {refusal}; tools available: {', '.join(allowed)}"
            tasks.refuse_call(task, call_id, name, args, reason)
            return reason, 1
        try:
            tool.parse_args(args)
        except Exception as exc:
            reason = f"error: {exc}"
            tasks.refuse_call(task, call_id, name, args, reason)
            return reason, 1

        ok, output = await tasks.call_tool(task, name, args, call_id=call_id)
        text = render_output(output)
        return (text if ok else f"error: {text}"), 0
