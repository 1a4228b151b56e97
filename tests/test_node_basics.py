"""The node answers as a service: health, card, auth, and one error shape for bad input."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient


async def test_healthz_needs_no_token_and_reports_capabilities(client: TestClient) -> None:
    response = await client.get("/healthz", headers={"Authorization": ""})
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert "docker_socket" in body


async def test_missing_token_is_refused_with_401(client: TestClient) -> None:
    response = await client.get("/api/v1/agent/tasks", headers={"Authorization": ""})
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"


async def test_wrong_token_is_refused_with_401(client: TestClient) -> None:
    response = await client.get(
        "/api/v1/agent/tasks", headers={"Authorization": "Bearer nope-nope-nope"}
    )
    assert response.status == 401
    assert "wrong" in (await response.json())["error"]["message"]


async def test_a_token_that_is_not_utf8_is_refused_with_401_not_a_crash(
    client: TestClient,
) -> None:
    # The HTTP client will not send such bytes, so the request goes over a raw socket.
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    for token in (b"\xff\xfe", b"\xed\xa0\x80", b"caf\xe9"):
        writer.write(
            b"GET /api/v1/agent/tasks HTTP/1.1\r\nHost: node\r\n"
            b"Authorization: Bearer " + token + b"\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = json.loads(await reader.readexactly(int(headers["content-length"])))

        assert status_line.split()[1] == b"401", token
        assert body["error"]["code"] == "unauthorized"
    writer.close()
    await writer.wait_closed()


async def test_agent_card_needs_no_token_and_points_at_the_skill_text(
    client: TestClient,
) -> None:
    response = await client.get("/.well-known/agent-card.json", headers={"Authorization": ""})
    assert response.status == 200
    card = await response.json()
    assert card["name"] == "test-node"
    assert card["url"].startswith("http://")
    assert card["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert {skill["id"] for skill in card["skills"]} >= {"terminal", "files", "tasks"}
    assert card["documentationUrl"].endswith("/api/v1/skill")


async def test_skill_text_describes_every_service_an_agent_needs(client: TestClient) -> None:
    response = await client.get("/api/v1/skill")
    assert response.status == 200
    assert response.content_type == "text/markdown"
    text = await response.text()
    for route in ("/api/v1/terminal/exec", "/api/v1/files/", "/api/v1/daemons",
                  "/api/v1/snapshots", "/api/v1/agent/tasks", "/api/v1/peers"):
        assert route in text, f"the skill text never mentions {route}"
    assert "{{URL}}" not in text


async def test_skill_and_openapi_need_the_token(client: TestClient) -> None:
    for path in ("/api/v1/skill", "/api/v1/openapi.json", "/api/v1/tools"):
        response = await client.get(path, headers={"Authorization": ""})
        assert response.status == 401, path


async def test_openapi_document_lists_the_node_routes_with_schemas(client: TestClient) -> None:
    response = await client.get("/api/v1/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.")
    assert "/api/v1/terminal/exec" in document["paths"]
    assert "/api/v1/agent/tasks" in document["paths"]
    assert "ExecRequest" in document["components"]["schemas"]


async def test_tools_listing_gives_json_schemas_built_from_models(client: TestClient) -> None:
    response = await client.get("/api/v1/tools")
    tools = {tool["function"]["name"]: tool["function"] for tool in await response.json()}
    assert {"terminal_exec", "read_file", "write_file", "edit_file"} <= set(tools)
    parameters = tools["write_file"]["parameters"]
    assert parameters["type"] == "object"
    assert {"path", "content"} <= set(parameters["properties"])


async def test_metrics_count_requests_in_prometheus_text(client: TestClient) -> None:
    await client.post("/api/v1/terminal/exec", json={"command": "true"})
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert "# TYPE" in text
    assert "exec" in text


NESTED = b"[" * 100_000 + b"]" * 100_000


async def test_deeply_nested_json_is_a_400_on_every_body_reading_route(
    client: TestClient,
) -> None:
    for method, path in (("POST", "/api/v1/terminal/exec"), ("POST", "/api/v1/agent/tasks"),
                         ("PUT", "/api/v1/peers/book"), ("PUT", "/api/v1/agent/rules"),
                         ("POST", "/api/v1/agent/mcp/servers")):
        response = await client.request(method, path, data=NESTED,
                                        headers={"Content-Type": "application/json"})
        assert response.status == 400, path
        assert "nested too deeply" in (await response.json())["error"]["message"], path


async def test_terminal_stream_refuses_a_deeply_nested_first_message(client: TestClient) -> None:
    async with client.ws_connect("/api/v1/terminal/ws") as ws:
        await ws.send_str(NESTED.decode())
        message = await ws.receive_json()
        assert "nested too deeply" in message["error"]["message"]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
async def test_a_number_that_is_not_finite_is_a_400_naming_the_field(
    client: TestClient, number: str,
) -> None:
    bodies = (
        ("/api/v1/terminal/exec", '{"command": "true", "timeout_s": %s}', "timeout_s"),
        ("/api/v1/agent/tasks",
         '{"steps": [{"tool": "terminal_exec", "args": {"command": "true"}}], "timeout_s": %s}',
         "timeout_s"),
        ("/api/v1/agent/tasks", '{"description": "x", "temperature": %s}', "temperature"),
        ("/api/v1/lease", '{"ttl_s": %s}', "ttl_s"),
    )
    for path, body, field in bodies:
        response = await client.post(path, data=body % number,
                                     headers={"Content-Type": "application/json"})
        error = (await response.json())["error"]

        assert response.status == 400, (path, error)
        assert f"{field}: Input should be a finite number" in error["message"], path
