"""Modes: what each kind of task is told, and which tools it may use."""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath
from typing import Any

from mesh.models import Mode

from ..tools import Tool

__all__ = ["ModePolicy", "policy_for"]

_COMMON = (
    "You are an agent working on a computer of your own through tools. The workspace folder "
    "is your current directory; every path you give is relative to it. Work step by step: "
    "look before you change, check what your commands print, and keep going until the task "
    "is done. When you are finished, answer with a short summary of what you did and what "
    "you found, without calling a tool."
)

_PROMPTS = {
    Mode.CODE: (
        "Mode: code. Make the change the task asks for: read the relevant files, edit them, "
        "run the tests or the program to check your work."
    ),
    Mode.ARCHITECT: (
        "Mode: architect. Study the code and write a plan. You may read anything, but you may "
        "only write Markdown and plan files (*.md, *.markdown, or files under plans/)."
    ),
    Mode.DEBUG: (
        "Mode: debug. Find the cause of the problem before fixing it: reproduce it, read logs "
        "and code, narrow it down, then fix it and show that the fix works."
    ),
    Mode.ASK: (
        "Mode: ask. Answer the question by reading files and searching. You cannot change "
        "anything: no writes and no commands."
    ),
    Mode.ORCHESTRATOR: (
        "Mode: orchestrator. Split the work and delegate it to peer nodes with the peer tools "
        "(spawn_peer, assign_task, fan_out, read_peer_file); you may read local files, but do "
        "the work through your peers and combine their results."
    ),
}

_PLAN_SUFFIXES = frozenset({".md", ".markdown"})


def is_plan_file(path: str) -> bool:
    pure = PurePosixPath(path)
    return pure.suffix.lower() in _PLAN_SUFFIXES or (pure.parts[:1] == ("plans",))


@dataclasses.dataclass(frozen=True)
class ModePolicy:
    mode: Mode

    @property
    def prompt(self) -> str:
        return f"{_COMMON}\n\n{_PROMPTS[self.mode]}"

    def allows(self, tool: Tool) -> bool:
        if self.mode is Mode.ASK:
            return not (tool.writes or tool.executes or tool.peers)
        if self.mode is Mode.ARCHITECT:
            return not (tool.executes or tool.peers) and (
                not tool.writes or tool.name in ("write_file", "edit_file")
            )
        if self.mode is Mode.ORCHESTRATOR:
            return tool.peers or not (tool.writes or tool.executes)
        return not tool.peers

    def refusal(self, tool: Tool, args: dict[str, Any]) -> str | None:
        """Why this call is not allowed in this mode, or None when it is."""
        if not self.allows(tool):
            return f"{tool.name} is not allowed in {self.mode.value} mode"
        if self.mode is Mode.ARCHITECT and tool.writes:
            path = str(args.get("path", ""))
            if not is_plan_file(path):
                return (
                    f"architect mode may only write Markdown and plan files, not {path!r}"
                )
        return None


def policy_for(mode: Mode) -> ModePolicy:
    return ModePolicy(mode)
