"""Server restarts under load: no acked message is lost, and a resent cmid is never stored twice.

Clients stream sends without waiting for acks while the server is stopped (SIGTERM: graceful; SIGKILL:
crash) and started again on the same data directory. Each client then reconnects as the same device,
resuming from the cursors it holds, and resends every cmid it has no ack for until it gets one. The
history checker then verifies C1-C6 (C4: every ack is in the log; C2: no cmid stored twice).
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets

from tests.support.checker import History
from tests.support.client import Account, ChatClient, register
from tests.support.server import ServerProcess

PER_CLIENT = 300


@dataclass(frozen=True)
class Planned:
    cmid: str
    body: str
    conv: str | None = None
    to: int | None = None


async def read_log(api: str, reader: Account, conv: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            r = await http.get(
                f"{api}/conversations/{conv}/messages",
                params={"after": out[-1]["seq"] if out else 0, "limit": 200},
                headers=reader.auth,
            )
            assert r.status_code == 200, r.text
            page = r.json()
            out.extend(page["messages"])
            if not page["has_more"]:
                return out


async def pump(c: ChatClient, plan: list[Planned]) -> int:
    """Send the plan without waiting for acks until the connection goes; returns how many were written."""
    for i, p in enumerate(plan):
        try:
            await c.send(p.body, conv=p.conv, to=p.to, cmid=p.cmid, wait=False)
        except websockets.ConnectionClosed:
            return i
        await asyncio.sleep(0.002)  # pacing only: the restart must land mid-stream
    return len(plan)


async def resend_until_acked(c: ChatClient, plan: list[Planned], acked_before: set[str]) -> None:
    for _ in range(10):
        todo = [p for p in plan if p.cmid not in acked_before and p.cmid not in c.acks]
        if not todo:
            return
        c.errors.clear()
        for p in todo:
            await c.send(p.body, conv=p.conv, to=p.to, cmid=p.cmid, wait=False)

        def answered(todo: list[Planned] = todo) -> bool:
            refused = {e.get("ref") for e in c.errors}
            return all(p.cmid in c.acks or p.cmid in refused for p in todo)

        await c.wait_for(answered, timeout=15)
        # only "try again" refusals are acceptable here
        assert {e["code"] for e in c.errors} <= {"unavailable", "rate_limited", "too_many_in_flight"}, c.errors
    raise AssertionError(f"{c.account.username}: sends still unacked after 10 rounds")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_no_acked_message_lost_across_restart(server: ServerProcess, history: History, sig: int) -> None:
    users = list(await asyncio.gather(*(register(server.api, f"user{i}") for i in range(4))))
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{server.api}/groups", json={"name": "g", "members": [u.uid for u in users[1:]]}, headers=users[0].auth
        )
    assert r.status_code == 201, r.text
    group = r.json()["conv"]

    # Each user alternates between the group and a direct conversation with the next user.
    plans = [
        [
            Planned(f"u{i}-{k}", f"u{i} #{k}", conv=group)
            if k % 2 == 0
            else Planned(f"u{i}-{k}", f"u{i} #{k}", to=users[(i + 1) % len(users)].uid)
            for k in range(PER_CLIENT)
        ]
        for i in range(len(users))
    ]
    old = [history.client(u, "dev") for u in users]
    for c in old:
        assert (await c.connect())["t"] == "auth_ok"
    pumps = [asyncio.create_task(pump(c, plan)) for c, plan in zip(old, plans, strict=True)]

    await old[0].wait_for(lambda: sum(len(c.acks) for c in old) >= 80)
    assert not all(t.done() for t in pumps), "the clients finished before the restart"
    await asyncio.to_thread(server.restart, sig)
    written = await asyncio.gather(*pumps)
    assert min(written) < PER_CLIENT, f"a restart mid-stream should have cut every pump short: {written}"

    if sig == signal.SIGTERM:
        for c in old:  # told to come back, before the connection went

            def told_to_go(c: ChatClient = c) -> bool:
                return c.closed_reason is not None

            await c.wait_for(told_to_go, timeout=5)
            assert c.closed_reason is not None
            assert (c.closed_reason["code"], c.closed_reason["reconnect"]) == ("shutdown", True)
            assert not [e for e in c.errors if e["code"] not in ("unavailable",)], c.errors

    acked_before = [set(c.acks) for c in old]
    assert all(acked_before), "every client should have had some sends acked before the restart"

    # Reconnect as the same devices, resuming from what each holds, and resend what was never acked.
    new: list[ChatClient] = []
    for c in old:
        n = history.client(c.account, c.device)
        n.cursors = dict(c.cursors)
        assert (await n.connect(resume=True))["t"] == "auth_ok"
        new.append(n)
    await asyncio.gather(
        *(resend_until_acked(n, plan, before) for n, plan, before in zip(new, plans, acked_before, strict=True))
    )

    # An ack from before the restart and one after it for the same cmid name the same message
    for c, n in zip(old, new, strict=True):
        for cmid, ack in n.acks.items():
            if cmid in c.acks:
                assert (ack["seq"], ack["mid"]) == (c.acks[cmid]["seq"], c.acks[cmid]["mid"])
                assert ack["dup"] is True

    half = PER_CLIENT // 2
    group_total = 1 + len(users) * half
    for n in new:  # every device ends up with the whole group log, with no gap (checker C5)

        def has_whole_log(n: ChatClient = n) -> bool:
            return n.cursors.get(group, 0) == group_total

        await n.wait_for(has_whole_log, timeout=15)

    log = await read_log(server.api, users[0], group)
    assert [e["seq"] for e in log] == list(range(1, group_total + 1))
    cmids = [e["cmid"] for e in log if e["type"] != "system"]
    assert len(cmids) == len(set(cmids))
    assert sorted(cmids) == sorted(p.cmid for plan in plans for p in plan if p.conv == group)
    for i, u in enumerate(users):
        peer = users[(i + 1) % len(users)]
        conv = f"d:{min(u.uid, peer.uid)}:{max(u.uid, peer.uid)}"
        dm = await read_log(server.api, u, conv)
        assert [e["cmid"] for e in dm] == [p.cmid for p in plans[i] if p.to is not None]  # once each, in order
        assert all(e["from"] == u.uid and e["dev"] == "dev" for e in dm)
