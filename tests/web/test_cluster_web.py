"""The web client in the distributed mode: the page is served by the cluster's ``im api`` and its chat
connection goes to whichever gateway process ``GET /api/v1/gateway`` hands out. Two users on different
gateways chat both ways with read marks, typing and online dots; then the gateway under one of them stops
and that page moves to the other gateway by itself, with what was typed meanwhile delivered exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Route, WebSocket, expect

from im.cluster import LocalCluster
from tests.cluster import conftest as cluster_fixtures
from tests.support.server import ServerProcess
from tests.web.conftest import Web, WebUser
from tests.web.test_resilience import stored_texts

#: The cluster tests' fixture (api-1, gw-1, gw-2, tr-1, tr-2; every node still running must stop cleanly).
cluster = cluster_fixtures.cluster


@pytest.fixture
def server(cluster: LocalCluster, tmp_path: Path) -> ServerProcess:
    """Replaces the web fixtures' ``im serve`` with the cluster's API process: only its address (pages
    open ``http``, users register at ``api``); nothing starts or stops through this object."""
    gw = cluster.nodes["gw-1"].ports
    return ServerProcess(tmp_path / "unused", http_port=cluster.base_port, ws_port=gw["ws"], tcp_port=gw["tcp"])


def gateway_name(cluster: LocalCluster, ws: WebSocket) -> str:
    """The gateway node a WebSocket of a page goes to (by the port of its URL)."""
    by_port = {n.ports["ws"]: n.name for n in cluster.nodes.values() if n.role == "gateway"}
    port = urlsplit(ws.url).port
    assert port in by_port, f"{ws.url} is no gateway of the cluster ({by_port})"
    return by_port[port]


async def gateway_of(web: Web, cluster: LocalCluster, user: WebUser, timeout: float = 20.0) -> str:
    """The gateway the page's chat connection is open to: its newest WebSocket not closed (one of a document
    since reloaded may never report its close); waits (a condition, not an assertion) until there is one."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        opened = [ws for ws in web.sockets(user.page) if not ws.is_closed()]
        if opened:
            return gateway_name(cluster, opened[-1])
        assert asyncio.get_running_loop().time() < deadline, (
            f"{user.name}'s page has no open WebSocket: {[ws.url for ws in web.sockets(user.page)]}"
        )
        await asyncio.sleep(0.05)


async def test_chat_across_gateways_and_failover(web: Web, cluster: LocalCluster) -> None:
    alice = await web.user("alice", register_in_page=True)  # registers through the cluster's API
    bob = await web.user("bob")

    # Each page asked the API for a gateway; until they are on different ones, Bob reloads (the API hands
    # out the least loaded gateway, ties broken at random, so this takes a reload or two at most).
    gw_a = await gateway_of(web, cluster, alice)
    gw_b = await gateway_of(web, cluster, bob)
    reloads = 0
    while gw_b == gw_a:
        assert reloads < 10, f"both pages stayed on {gw_a} after {reloads} reloads"
        async with bob.page.expect_websocket() as opened:
            await bob.page.reload()
        gw_b = gateway_name(cluster, await opened.value)
        reloads += 1
    await expect(bob.page.locator("#me-name")).to_have_text(bob.display)
    assert {gw_a, gw_b} == {"gw-1", "gw-2"}

    # Alice (on one gateway) writes to Bob (on the other): delivered, then read when he opens it.
    await alice.open_chat_with(bob)
    await alice.send("Hello from the other gateway")
    first = alice.message("Hello from the other gateway")
    await expect(first).to_have_class("msg mine")
    await expect(first.locator(".status")).to_have_text("Delivered")
    item = bob.conversation(alice.display)
    await expect(item.locator(".badge")).to_have_text("1")
    await expect(item.locator(".conv-preview")).to_have_text("Hello from the other gateway")
    # Online dots: presence written by one gateway is seen by a page on the other.
    await expect(item.locator(".dot")).to_have_class("dot online")
    await bob.open_conversation(alice.display)
    await expect(bob.message("Hello from the other gateway")).to_have_class("msg theirs")
    await expect(item.locator(".badge")).to_have_count(0)
    await expect(first.locator(".status")).to_have_text("Read")
    # Alice wrote to Bob, so Bob sees her online; she sees him once he has answered (protocol §18).
    await expect(bob.page.locator("#chat-subtitle")).to_have_text("online")
    await expect(alice.page.locator("#chat-subtitle")).to_have_text("offline")

    # Bob types (Alice sees it, across the gateways) and answers; Alice has the chat open: read at once.
    await bob.page.focus("#message-input")
    await bob.page.keyboard.type("Hi Al")
    await expect(alice.page.locator("#typing")).to_have_text(f"{bob.display} is typing…")
    await bob.page.keyboard.type("ice, loud and clear")
    await bob.page.keyboard.press("Enter")
    await expect(alice.message("Hi Alice, loud and clear")).to_have_class("msg theirs")
    await expect(alice.page.locator("#typing")).to_have_text("")
    await expect(bob.message("Hi Alice, loud and clear").locator(".status")).to_have_text("Read")
    # Bob has answered: Alice sees him online from her next presence poll (every 12 s), across gateways.
    await expect(alice.page.locator("#chat-subtitle")).to_have_text("online")
    await expect(alice.page.locator("#chat-avatar .dot")).to_have_class("dot online")
    expected = ["Hello from the other gateway", "Hi Alice, loud and clear"]

    # Alice's gateway stops (SIGTERM). Her page's next gateway lookup is held back until she has typed a
    # message, so it is written while there is no connection.
    release = asyncio.Event()

    async def hold(route: Route) -> None:
        await release.wait()
        await route.continue_()

    await alice.page.route("**/api/v1/gateway", hold)
    assert await asyncio.to_thread(cluster.nodes[gw_a].stop) == 0, cluster.nodes[gw_a].log()[-4000:]
    assert "Traceback" not in cluster.nodes[gw_a].log(), cluster.nodes[gw_a].log()[-4000:]
    await expect(alice.page.locator("#banner")).to_contain_text("Reconnecting")
    typed = "typed while my gateway was gone"
    await alice.send(typed)
    pending = alice.message(typed)
    await expect(pending).to_have_class("msg mine pending")
    await expect(pending.locator(".status")).to_have_text("Waiting for connection…")
    await expect(bob.page.locator("#banner")).to_be_hidden()  # Bob's gateway did not move

    # Let the lookup through: the page reconnects by itself, to the gateway left, and sends it once.
    release.set()
    await expect(alice.page.locator("#banner")).to_be_hidden()
    await expect(bob.message(typed)).to_have_count(1)
    await expect(alice.message(typed).locator(".status")).to_have_text("Read")
    assert await gateway_of(web, cluster, alice) == gw_b
    await bob.send("got it, once")
    await expect(alice.message("got it, once")).to_have_class("msg theirs")
    await expect(bob.message("got it, once").locator(".status")).to_have_text("Read")
    await expect(alice.page.locator("#chat-subtitle")).to_have_text("online")
    await expect(bob.page.locator("#chat-subtitle")).to_have_text("online")
    expected += [typed, "got it, once"]

    # Exactly once each, in the same order on both pages and in the store.
    for user in (alice, bob):
        await expect(user.texts).to_have_text(expected)
    assert await stored_texts(web.server, bob, alice) == expected
    await web.shot(alice.page, "11-cluster-after-failover")
