"""Fixtures that start real nodes: in-process for most tests, as processes where a test kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_runtime.app import NODE, build_app
from agent_runtime.config import NodeConfig
from agent_runtime.logs import configure_logging
from agent_runtime.node import Node

if TYPE_CHECKING:
    from agent_runtime.scripted_model import ScriptedModelServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
configure_logging("console", "warning")

TOKEN = "test-token-0123456789"


def make_config(tmp_path: Path, **overrides: object) -> NodeConfig:
    values: dict[str, object] = {
        "workspace": tmp_path / "workspace",
        "state_dir": tmp_path / "state",
        "port": 0,
        "token": TOKEN,
        "name": "test-node",
    }
    values.update(overrides)
    return NodeConfig.model_validate(values)


@pytest.fixture
def node_config(tmp_path: Path) -> NodeConfig:
    return make_config(tmp_path)


@pytest.fixture
async def client(  # type: ignore[no-untyped-def]
    aiohttp_client, node_config: NodeConfig,
) -> TestClient:
    """A real node served in-process, with a client that sends the bearer token."""
    app = build_app(node_config)
    return await aiohttp_client(app, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture
def node(client: TestClient) -> Node:
    app: web.Application = client.server.app  # type: ignore[assignment]
    return app[NODE]


@pytest.fixture
def workspace(node_config: NodeConfig) -> Path:
    return node_config.workspace


class NodeProcess:
    """A node running as its own process, as `mesh node` would start it."""

    def __init__(self, workspace: Path, state_dir: Path, *extra: str) -> None:
        self.workspace = workspace
        self.state_dir = state_dir
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> NodeProcess:
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent_runtime", "--workspace", str(self.workspace),
             "--state-dir", str(self.state_dir), "--port", "0", "--token", TOKEN,
             "--log-format", "json", *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node exited with {self.proc.wait(timeout)} before ready")
        self.url = json.loads(line)["url"]
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=15)
        # The ready-line pipe would otherwise be left open, a ResourceWarning under -W error.
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path / "workspace", tmp_path / "state")
    yield process
    process.stop()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def scripted() -> AsyncIterator["ScriptedModelServer"]:
    """A scripted OpenAI-compatible model server on loopback, reached through litellm."""
    from agent_runtime.scripted_model import ScriptedModelServer

    async with ScriptedModelServer() as server:
        yield server


@pytest.fixture
async def agent_client(  # type: ignore[no-untyped-def]
    aiohttp_client, tmp_path: Path, scripted,
) -> TestClient:
    """A node whose agent loop talks to the scripted model, with short test deadlines."""
    config = make_config(
        tmp_path, model="openai/scripted", api_base=scripted.api_base, api_key="scripted",
        stream_idle_timeout_s=0.5, model_retries=2, model_retry_base_s=0.01,
    )
    app = build_app(config)
    return await aiohttp_client(app, headers={"Authorization": f"Bearer {TOKEN}"})
