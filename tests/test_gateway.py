"""The model gateway: OpenAI clients and spawned children reach the node's model through it."""

from __future__ import annotations

import asyncio
import secrets
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_runtime.app import NODE, build_app
from agent_runtime.node import Node
from agent_runtime.scripted_model import ScriptedModelServer, ToolCall, Turn
from mesh.client import Peer
from mesh.models import NodeSpec
from tests.conftest import TOKEN, make_config
from tests.test_tasks import submit, wait_final

# litellm builds one of its pydantic models on first use, and pydantic warns about a TypedDict
# of litellm's in them; the stream that happens to build it would fail under warnings-as-errors.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Item .* on TypedDict class .* is using the .ReadOnly. qualifier:UserWarning"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}


def node_of(client: TestClient) -> Node:
    app: web.Application = client.server.app  # type: ignore[assignment]
    return app[NODE]


def gateway_url(client: TestClient) -> str:
    return str(client.make_url("/api/v1/ai"))


@pytest.fixture
async def ai(agent_client: TestClient) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official OpenAI client pointed at the node's gateway, with the node's token."""
    async with openai.AsyncOpenAI(
        base_url=gateway_url(agent_client), api_key=TOKEN, max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def parent(
    agent_client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TestClient]:
    """A node with a model that spawns local children, each with a registry of this test."""
    monkeypatch.setenv("MESH_SPAWN_BACKEND", "local")
    monkeypatch.setenv("PEERMESH_HOME", str(tmp_path / "peermesh-home"))
    node = node_of(agent_client)
    # serve() sets the URL a node is reached by; the test server knows it only once it runs.
    node.url = str(agent_client.make_url("")).rstrip("/")
    node.config.mesh_name = f"t{secrets.token_hex(4)}"
    yield agent_client
    await node.peers.close()


async def test_openai_client_gets_a_whole_completion_from_the_node_model(
    ai: openai.AsyncOpenAI, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(text="forty-two", prompt_tokens=12, completion_tokens=3))

    reply = await ai.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "the answer?"}]
    )

    assert reply.choices[0].message.content == "forty-two"
    assert reply.usage is not None and reply.usage.prompt_tokens == 12
    assert scripted.requests[-1]["model"] == "scripted"
    assert scripted.requests[-1]["messages"] == [{"role": "user", "content": "the answer?"}]


async def test_openai_client_streams_text_and_tool_calls_with_usage(
    ai: openai.AsyncOpenAI, scripted: ScriptedModelServer, agent_client: TestClient
) -> None:
    scripted.add(Turn(text="Looking it up. " * 5, chunk_chars=4,
                      tool_calls=[ToolCall("weather", {"city": "Oslo"}, id="call_1")]))

    stream = await ai.chat.completions.create(
        model="openai/scripted", messages=[{"role": "user", "content": "weather in Oslo?"}],
        tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True},
    )
    text, calls, usage = "", [], None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += choice.delta.tool_calls or []

    assert text == "Looking it up. " * 5
    assert [(c.function.name, c.function.arguments) for c in calls if c.function] == [
        ("weather", '{"city": "Oslo"}')
    ]
    assert usage is not None and usage.completion_tokens == 5
    assert scripted.requests[-1]["tools"] == [WEATHER_TOOL]
    response = await agent_client.get("/api/v1/ai/usage")
    assert (await response.json())["node"]["prompt_tokens"] == 10


async def test_models_lists_the_alias_and_the_configured_model(
    ai: openai.AsyncOpenAI,
) -> None:
    models = await ai.models.list()

    assert [model.id for model in models.data] == ["default", "openai/scripted"]


async def test_a_request_for_another_model_is_refused_naming_the_models_served(
    ai: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await ai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )

    assert caught.value.code == "model_not_found"
    assert "default, openai/scripted" in caught.value.message


async def test_a_malformed_request_is_a_400_naming_the_field(agent_client: TestClient) -> None:
    response = await agent_client.post(
        "/api/v1/ai/chat/completions", json={"model": "default", "messages": "hi"}
    )

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"


@pytest.mark.parametrize(("message", "param", "words"), [
    ({"role": "robot", "content": "hi"}, "messages.0.role", "Input should be 'system'"),
    ({"role": "user", "content": 5}, "messages.0.content", "a string, a list of parts"),
    ({"role": "user", "content": [{"type": "image_url"}]}, "messages.0.content",
     "part 0, of type 'image_url', needs a 'image_url' field"),
])
async def test_a_malformed_message_is_a_400_before_any_provider_is_asked(
    agent_client: TestClient, scripted: ScriptedModelServer, message: dict[str, Any],
    param: str, words: str,
) -> None:
    response = await agent_client.post(
        "/api/v1/ai/chat/completions", json={"model": "default", "messages": [message]}
    )

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == param and words in error["message"]
    assert scripted.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_rate_limit_reaches_the_caller_as_429_with_its_retry_after(
    ai: openai.AsyncOpenAI, scripted: ScriptedModelServer, stream: bool
) -> None:
    scripted.add(Turn(error_status=429, retry_after=7))

    with pytest.raises(openai.RateLimitError) as caught:
        await ai.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], stream=stream
        )

    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "7"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_fault_reaches_the_caller_as_a_502_not_as_the_gateways_own_500(
    ai: openai.AsyncOpenAI, scripted: ScriptedModelServer, stream: bool
) -> None:
    scripted.add(Turn(error_status=500))

    with pytest.raises(openai.APIStatusError) as caught:
        await ai.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], stream=stream
        )

    assert caught.value.status_code == 502
    assert caught.value.code == "provider_error"


@pytest.mark.parametrize("stream", [False, True])
async def test_an_unreachable_provider_is_a_502_naming_it_unreachable(
    aiohttp_client: Any, tmp_path: Path, stream: bool
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config = make_config(tmp_path, model="openai/scripted", api_key="k",
                         api_base=f"http://127.0.0.1:{closed_port}/v1")
    node = await aiohttp_client(build_app(config))

    response = await node.post(
        "/api/v1/ai/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
        json={"model": "default", "messages": [{"role": "user", "content": "hi"}],
              "stream": stream},
    )

    assert response.status == 502
    assert (await response.json())["error"]["code"] == "provider_unreachable"


async def test_a_body_nested_too_deeply_is_a_400_in_openai_shape(
    agent_client: TestClient,
) -> None:
    nested = b'{"model": "default", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    response = await agent_client.post("/api/v1/ai/chat/completions", data=nested)

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "nested too deeply" in error["message"]


async def test_a_node_without_a_model_answers_503_in_openai_shape(client: TestClient) -> None:
    async with openai.AsyncOpenAI(
        base_url=gateway_url(client), api_key=TOKEN, max_retries=0
    ) as ai:
        with pytest.raises(openai.APIStatusError) as caught:
            await ai.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "hi"}]
            )

    assert caught.value.status_code == 503
    assert caught.value.code == "no_model_configured"
    assert "no model configured" in caught.value.message


async def test_a_gateway_key_opens_the_gateway_and_nothing_else(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    key = node_of(agent_client).gateway.mint("child-1")
    scripted.add(Turn(text="hi child"))
    with_key = {"Authorization": f"Bearer {key}"}
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}

    completion = await agent_client.post("/api/v1/ai/chat/completions", json=body,
                                         headers=with_key)
    tasks = await agent_client.get("/api/v1/agent/tasks", headers=with_key)
    usage = await agent_client.get("/api/v1/ai/usage", headers=with_key)

    assert completion.status == 200
    assert tasks.status == 401
    assert (await tasks.json())["error"]["code"] == "unauthorized"
    assert usage.status == 401
    counted = await (await agent_client.get("/api/v1/ai/usage")).json()
    assert counted["children"]["child-1"]["requests"] == 1


async def test_a_childs_key_stops_working_once_the_child_is_stopped(
    parent: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.script_for("child", Turn(text="answered through my parent",
                                      prompt_tokens=21, completion_tokens=4))
    # The child's first model call imports litellm on its event loop, which under load can
    # outlast the default lease; the lease is not what this test is about.
    response = await parent.post("/api/v1/peers", json={"name": "worker", "lease_s": 300})
    assert response.status == 201, await response.text()
    child = await response.json()
    key = node_of(parent).gateway.key_for(child["id"])
    assert key is not None

    async with Peer(child["url"], child["token"]) as peer:
        handle = await peer.submit(description="[script:child] say something")
        task = await handle.result(timeout=60)
    usage = await (await parent.get("/api/v1/ai/usage")).json()
    stopped = await parent.delete(f"/api/v1/peers/{child['id']}")
    after = await parent.post(
        "/api/v1/ai/chat/completions", headers={"Authorization": f"Bearer {key}"},
        json={"model": "default", "messages": [{"role": "user", "content": "still there?"}]},
    )

    assert task.result == "answered through my parent"
    assert usage["children"][child["id"]] == {
        "requests": 1, "prompt_tokens": 21, "completion_tokens": 4, "cost_usd": 0.0,
        "active": True,
    }
    assert stopped.status == 204
    assert after.status == 401
    final = await (await parent.get("/api/v1/ai/usage")).json()
    assert final["children"][child["id"]]["active"] is False


async def test_a_child_that_dies_on_its_own_loses_its_key_once_its_parent_sees_it(
    parent: TestClient,
) -> None:
    response = await parent.post("/api/v1/peers", json={"name": "fragile", "lease_s": 300})
    assert response.status == 201, await response.text()
    child = await response.json()
    key = node_of(parent).gateway.key_for(child["id"])
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}

    async with Peer(child["url"], child["token"]) as peer:
        # The command's parent process is the child node itself.
        await peer.submit(steps=[{"tool": "terminal_exec",
                                  "args": {"command": "kill -9 $PPID"}}])

    async def ended() -> dict[str, Any]:
        while True:
            seen = await (await parent.get(f"/api/v1/peers/{child['id']}")).json()
            if seen["state"] not in ("starting", "running"):
                return dict(seen)
            await asyncio.sleep(0.02)

    seen = await asyncio.wait_for(ended(), 30)
    after = await parent.post("/api/v1/ai/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {key}"})

    assert seen["state"] in ("crashed", "exited")
    assert after.status == 401
    usage = (await (await parent.get("/api/v1/ai/usage")).json())["children"]
    assert usage[child["id"]]["active"] is False


async def test_a_fan_out_child_gets_a_key_of_its_own_that_ends_with_its_node(
    parent: TestClient,
) -> None:
    fan_out: dict[str, Any] = {"assignments": [
        {"spawn": "helper", "steps": [{"tool": "list_files", "args": {"path": "."}}]},
    ]}

    task_id = await submit(parent, steps=[{"tool": "fan_out", "args": fan_out}])
    task = await wait_final(parent, task_id, timeout=60)

    assert task["status"] == "completed", task["error"]
    assert "succeeded" in str(task["result"])
    usage = (await (await parent.get("/api/v1/ai/usage")).json())["children"]
    assert [(node_id.startswith("helper-"), record["active"])
            for node_id, record in usage.items()] == [(True, False)]


async def test_a_child_with_a_provider_of_its_own_keeps_it_and_others_never_see_ours(
    parent: TestClient,
) -> None:
    node = node_of(parent)

    own, own_grant = node.peers._provider_spec(
        NodeSpec(name="own", env={"MESH_API_KEY": "child-secret"})
    )
    via, via_grant = node.peers._provider_spec(NodeSpec(name="via"))

    assert own_grant is None and own.env == {"MESH_API_KEY": "child-secret"}
    assert via_grant is not None
    assert via.env == {"MESH_MODEL": "openai/default", "MESH_API_BASE": f"{node.url}/api/v1/ai",
                       "MESH_API_KEY": node.gateway.key_for(via_grant)}
    assert via.model is None and via.api_base is None
    assert node.config.api_key not in via.model_dump_json()
