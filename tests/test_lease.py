"""A spawned node's lease: renewed, it keeps the node alive; not renewed, the node stops."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import TOKEN, NodeProcess, make_config

from agent_runtime.app import NODE, build_app
from agent_runtime.node import Node
from mesh.spawn.base import LeaseKeeper


@pytest.fixture
async def leased(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> AsyncIterator[TestClient]:
    """A node whose lease runs out after 0.5 s unless renewed."""
    app = build_app(make_config(tmp_path, lease_s=0.5, parent_url="http://parent.example"))
    yield await aiohttp_client(app, headers={"Authorization": f"Bearer {TOKEN}"})


def node_of(client: TestClient) -> Node:
    return client.server.app[NODE]  # type: ignore[no-any-return]


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        await asyncio.sleep(0.02)


async def test_node_without_lease_shows_none_and_refuses_a_renewal(client: TestClient) -> None:
    response = await client.get("/api/v1/lease")
    assert response.status == 200
    assert (await response.json())["enabled"] is False

    response = await client.post("/api/v1/lease", json={"ttl_s": 5})
    assert response.status == 409
    assert "no lease" in (await response.json())["error"]["message"]


async def test_lease_shows_its_deadline_and_parent(leased: TestClient) -> None:
    body = await (await leased.get("/api/v1/lease")).json()

    assert body["enabled"] is True
    assert body["ttl_s"] == 0.5
    assert body["parent_url"] == "http://parent.example"
    assert 0 < body["remaining_s"] <= 0.5
    assert body["deadline"] == pytest.approx(time.time() + body["remaining_s"], abs=0.2)


async def test_renewal_moves_the_deadline_by_the_requested_time(leased: TestClient) -> None:
    response = await leased.post("/api/v1/lease", json={"ttl_s": 30})

    body = await response.json()
    assert response.status == 200
    assert body["remaining_s"] > 29 and body["renewals"] == 1
    assert not node_of(leased).stop_requested.is_set()


async def test_renewal_with_an_unknown_field_is_refused_naming_it(leased: TestClient) -> None:
    response = await leased.post("/api/v1/lease", json={"ttl": 30})

    assert response.status == 400
    assert "ttl" in (await response.json())["error"]["message"]


async def test_renewal_needs_the_token(leased: TestClient) -> None:
    response = await leased.post("/api/v1/lease", json={}, headers={"Authorization": ""})

    assert response.status == 401


async def test_lease_not_renewed_in_time_asks_the_node_to_stop(leased: TestClient) -> None:
    node = node_of(leased)

    await wait_until(node.stop_requested.is_set)


async def test_node_process_exits_cleanly_once_its_lease_runs_out(
    node_process: NodeProcess,
) -> None:
    node_process.extra = ("--lease-s", "1")
    node_process.start()
    assert node_process.proc is not None

    assert await asyncio.to_thread(node_process.proc.wait, 20) == 0


async def test_lease_keeper_keeps_a_node_process_alive_past_its_lease(
    node_process: NodeProcess,
) -> None:
    node_process.extra = ("--lease-s", "1")
    node_process.start()
    assert node_process.proc is not None
    keeper = LeaseKeeper()
    keeper.hold("n", node_process.url, TOKEN, 1.0)
    try:
        async def renewals() -> int:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{node_process.url}/api/v1/lease",
                                       headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    return int((await r.json())["renewals"])

        deadline = time.monotonic() + 20
        while await renewals() < 4:
            assert time.monotonic() < deadline, "the keeper did not renew the lease"
            await asyncio.sleep(0.1)
        assert node_process.proc.poll() is None
    finally:
        await keeper.close()

    # Released, the node stops on its own.
    assert await asyncio.to_thread(node_process.proc.wait, 20) == 0


async def test_node_held_up_past_its_lease_still_takes_the_parents_renewal(
    leased: TestClient,
) -> None:
    node = node_of(leased)

    # The node's own event loop is blocked (a long import, a busy machine) well past the
    # deadline, so the parent's renewals could not have been answered in time.
    time.sleep(2.5)
    response = await leased.post("/api/v1/lease", json={"ttl_s": 30})

    assert response.status == 200
    assert (await response.json())["renewals"] == 1
    assert not node.stop_requested.is_set()


async def test_node_held_up_past_its_lease_stops_if_no_renewal_follows(
    leased: TestClient,
) -> None:
    node = node_of(leased)

    time.sleep(2.5)

    await wait_until(node.stop_requested.is_set)
