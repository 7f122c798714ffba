"""One connection per device across gateway nodes, in a real cluster: a device that connects again on
the other gateway closes its older connection there (``bye replaced``), through presence (Redis) and the
transfer link, and only the newer connection gets what is sent afterwards."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from im.cluster import LocalCluster
from tests.support.client import Account, ChatClient, register
from tests.support.wait import eventually

#: How soon the older connection must get its bye, from the moment the newer one starts connecting.
PROMPT = 1.0


def on(cluster: LocalCluster, gateway: str, account: Account, device: str, *, tcp: bool = False) -> ChatClient:
    ports = cluster.nodes[gateway].ports
    return ChatClient(
        f"ws://127.0.0.1:{ports['ws']}/ws", account, device, tcp=("127.0.0.1", ports["tcp"]) if tcp else None
    )


async def replace(older: ChatClient, newer: ChatClient) -> float:
    """Connect ``newer``; return the seconds until ``older`` got ``bye replaced``."""
    started = time.monotonic()
    assert (await newer.connect())["t"] == "auth_ok"
    await older.wait_for(lambda: older.closed_reason is not None, timeout=10)
    latency = time.monotonic() - started
    assert older.closed_reason == {
        "t": "bye",
        "code": "replaced",
        "message": "the same device connected again",
        "reconnect": False,
    }
    return latency


async def test_ws_on_one_gateway_replaced_by_tcp_on_the_other_and_back(cluster: LocalCluster) -> None:
    """WebSocket on gateway 1, then TCP on gateway 2, then WebSocket on gateway 1 again; then two
    connections of another device at once, one on each gateway."""
    alice, bob = await asyncio.gather(register(cluster.api, "alice"), register(cluster.api, "bob"))
    b = on(cluster, "gw-1", bob, "laptop")
    assert (await b.connect())["t"] == "auth_ok"
    conv = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"

    ws = on(cluster, "gw-1", alice, "phone")
    assert (await ws.connect())["t"] == "auth_ok"
    tcp = on(cluster, "gw-2", alice, "phone", tcp=True)
    latencies = [await replace(ws, tcp)]
    assert await b.send("to the tcp one", to=alice.uid) is not None
    assert [m["body"] for m in await tcp.wait_messages(1, conv=conv)] == ["to the tcp one"]
    assert tcp.closed_reason is None
    assert ws.messages == []  # the replaced connection got nothing

    # The reverse: TCP on gateway 2 replaced by WebSocket on gateway 1.
    ws_again = on(cluster, "gw-1", alice, "phone")
    latencies.append(await replace(tcp, ws_again))
    assert await b.send("to the ws one", to=alice.uid) is not None
    assert [m["body"] for m in await ws_again.wait_messages(2, conv=conv)] == ["to the tcp one", "to the ws one"]
    assert [m["body"] for m in tcp.messages] == ["to the tcp one"]  # nothing after its bye
    print(f"bye replaced across gateways after {', '.join(f'{s * 1000:.0f} ms' for s in latencies)}")
    assert max(latencies) < PROMPT, latencies

    # Near-simultaneous connections of another device on both gateways: exactly one survives.
    clients = [on(cluster, "gw-1", alice, "tablet"), on(cluster, "gw-2", alice, "tablet", tcp=True)]
    firsts: list[dict[str, Any]] = list(await asyncio.gather(*(c.connect() for c in clients)))

    def ended(i: int) -> dict[str, Any] | None:
        """The bye a client got: as the answer to its auth (replaced while authenticating), or later."""
        return firsts[i] if firsts[i]["t"] == "bye" else clients[i].closed_reason

    await eventually(lambda: ended(0) or ended(1), lambda: str(firsts), timeout=10)
    (loser,) = [i for i in (0, 1) if ended(i)]
    assert (ended(loser) or {}).get("code") == "replaced"
    survivor = clients[1 - loser]
    assert firsts[1 - loser]["t"] == "auth_ok"
    assert await b.send("who is left", to=alice.uid) is not None
    assert [m["body"] for m in await survivor.wait_messages(3)][-1] == "who is left"
    assert survivor.closed_reason is None and ended(1 - loser) is None
    for c in (b, ws, tcp, ws_again, *clients):
        await c.close()
