"""The node answers as a service: health, card, auth, and one error shape for bad input."""

from __future__ import annotations

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
