"""The model-based test against a real server: Hypothesis drives SDK clients of a real ``im serve``.

The same steps as tests/faults/test_model_core.py, but every device is the SDK's sans-I/O
:class:`~im.client.session.ClientSession` pumped over a real WebSocket to a real ``im serve`` subprocess,
and every membership change is a real HTTP call. Hypothesis picks, in any order: sends (to groups the
sender is or is not in), resends of acked cmids (same conversation: the original ack; another: ``invalid``),
retries, reading some or all of what arrived (frames left unread are late), dropping a connection with
frames in flight (lost sends, lost acks), reconnecting with cursors, restarting a client from its persisted
cursors (exact, ``recv``-ed, or none), adding and removing members.

Reading never waits on a timer: a ``ping`` goes out and frames are read up to its ``pong`` (everything
the server wrote before it). After each run everything is healed and pumped until every outbox is empty
and every device holds each of its conversations up to the head; then the stored log (read over HTTP)
judges the run: tests/support/model.py's ledger (each device life applies a gap-free, duplicate-free run of
each log, acked sends stored once where acked, every send answered) and membership (a device applies a
group's message only where its account was a member, or a member since a later seq; a device that did
not name the group in its cursors starts at a join point). The history checker (C1-C9) judges the same
run from what the connections carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from im.client.session import ClientSession, SendFailed
from im.model.errors import ErrorCode
from im.protocol.frames import Ack, Bye, Error, Msg, Send
from tests.support.checker import History, member_sets
from tests.support.client import Account, register
from tests.support.model import Entry, Ledger
from tests.support.server import ServerProcess, running_server

LONG = os.environ.get("IM_FAULTS_LONG", "") not in ("", "0")
#: Runs and steps: about 30 s in the suite on this 2-core box; the long variant explores far more.
EXAMPLES, STEPS = (300, 80) if LONG else (40, 40)
pytestmark = pytest.mark.timeout(3600 if LONG else 120)
WAIT = 20.0  # the most any one step may wait for the server (a failure beyond it, never a pass)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("model"), ["--set", "auth.access_ttl=7200"]) as proc:
        yield proc


@dataclass
class Recorder:
    """What the history checker needs of a client (tests/support/checker.py's ChatClient calls)."""

    account: Account
    device: str
    live: bool = False
    reader_error: Exception | None = None

    async def close(self) -> None:
        pass


@dataclass
class Device:
    account: Account
    name: str
    client: ClientSession
    recorder: Recorder
    ws: Any = None
    lives: int = 1
    pings: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def key(self) -> tuple[int, str]:
        return (self.account.uid, self.name)


class ServerModel(RuleBasedStateMachine):
    """One run: two new groups, four new devices of three accounts (names new per run)."""

    server: ServerProcess
    stats: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(base_url=self.server.api, timeout=WAIT)
        self.ledger = Ledger()
        self.history = History(self.server)
        self.devices: list[Device] = []
        self.groups: list[str] = []
        self.members: dict[str, set[int]] = {}
        self.reused: dict[tuple[int, str, str], str] = {}
        self.reported: dict[tuple[tuple[int, str], str], int] = {}  # the most a device said it holds (recv)
        self.accounts: list[Account] = []
        self.counts: dict[str, int] = dict.fromkeys(
            ("drops", "in_flight_lost", "restarts", "member_changes", "dup_acks"), 0
        )

    def run(self, coro: Any, timeout: float = WAIT) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    @initialize()
    def start(self) -> None:
        """New accounts each run: their conversations are this run's groups and nothing else."""
        tag = secrets.token_hex(3)
        self.accounts = [self.run(register(self.server.api, f"{name}{tag}")) for name in ("ann", "ben", "cat")]
        owner, bob, carol = self.accounts
        for initial in ([bob.uid], [bob.uid, carol.uid]):
            r = self.run(self.http.post("/groups", json={"name": "model", "members": initial}, headers=owner.auth))
            assert r.status_code == 201, r.text
            conv = f"g:{r.json()['gid']}"
            self.groups.append(conv)
            self.members[conv] = {owner.uid, *initial}
        run = secrets.token_hex(3)
        for account, name in ((owner, "a1"), (owner, "a2"), (bob, "b1"), (carol, "c1")):
            device = f"{name}-{run}"
            rec = Recorder(account, device)
            self.history.clients.append(rec)  # type: ignore[arg-type]
            self.history.accounts[account.uid] = account
            self.devices.append(Device(account, device, ClientSession(device, cmid_prefix=f"{device}-L1"), rec))
            self.ledger.start(account.uid, device, {})

    # --- plumbing ---------------------------------------------------------------------------------------

    async def _write(self, d: Device) -> None:
        frames = d.client.data_to_send()
        if d.ws is None:
            return
        try:
            for f in frames:
                await d.ws.send(f.decode())
        except websockets.ConnectionClosed:
            self._lost(d)

    def _lost(self, d: Device) -> None:
        if d.ws is not None:
            d.ws.transport.abort()
        d.ws = None
        d.recorder.live = False
        d.client.connection_lost()

    async def _read(self, d: Device, limit: int) -> None:
        """Read up to ``limit`` frames, stopping at the pong of a ping sent first (all the server wrote
        before it); frames beyond ``limit`` stay unread (late)."""
        if d.ws is None:
            return
        ping = d.client.ping()
        await self._write(d)
        for _ in range(limit):
            if d.ws is None:
                return
            try:
                raw = await d.ws.recv()
            except websockets.ConnectionClosed:
                self._lost(d)
                return
            frame = json.loads(raw)
            if frame["t"] == "pong" and frame["id"] == ping:
                return
            self._receive(d, raw, frame)
            await self._write(d)

    def _receive(self, d: Device, raw: str, frame: dict[str, Any]) -> None:
        uid, name = d.key
        held = dict(d.client.cursors)
        event = d.client.receive(raw.encode())
        assert d.client.reconnect_reason is None, f"{d.key}: the server made a gap: {d.client.reconnect_reason}"
        high = self._high(d, frame["conv"]) if frame["t"] in ("msg", "ack") else 0
        if frame["t"] in ("msg", "ack") and (frame["seq"] == high + 1 or (not high and frame["seq"] > 0)):
            # the checker follows each device's stream across lives while it continues (a life restarted
            # from older cursors gets what it had again; one restarted without cursors may start further
            # on, at the saved cursor or a join point): the ledger judges those, per life
            (self.history.received if frame["t"] == "msg" else self.history.acked)(d.recorder, frame)  # type: ignore[arg-type]
        elif frame["t"] == "ack":
            self.history.unanswered.pop((id(d.recorder), frame["cmid"]), None)  # answered all the same (C7)
        if isinstance(event, Msg):
            self.ledger.applied(uid, name, event.conv, event.seq, event.mid)
        elif isinstance(event, Ack):
            self.counts["dup_acks"] += event.dup
            self.ledger.acked(uid, name, event.cmid, event.conv, event.seq, event.mid)
            if d.client.cursors.get(event.conv, 0) > held.get(event.conv, 0):
                self.ledger.applied(uid, name, event.conv, event.seq, event.mid)
        elif isinstance(event, SendFailed):
            self.history.refused(d.recorder, frame)  # type: ignore[arg-type]
            k = (uid, name, event.send.cmid)
            if self.reused.get(k) == event.send.conv:
                assert event.code == ErrorCode.INVALID, event
            else:
                assert event.code == ErrorCode.NOT_MEMBER, event
                self.ledger.failed(uid, name, event.send.cmid, event.code)
        elif isinstance(event, Error):
            assert event.ref is None and event.code == ErrorCode.RATE_LIMITED, f"{d.key}: unexpected {event}"
        elif isinstance(event, Bye):
            assert event.code == ErrorCode.REPLACED, f"{d.key}: unexpected {event}"
        if frame["t"] == "error" and frame.get("ref") and event is None:
            self.history.refused(d.recorder, frame)  # type: ignore[arg-type]  # retryable: the SDK retries

    def _high(self, d: Device, conv: str) -> int:
        stream = self.history.streams.get((d.account.uid, d.name, conv))
        return stream[-1] if stream else 0

    async def _connect(self, d: Device, through: bool) -> None:
        d.ws = await websockets.connect(self.server.ws, max_size=None)
        d.recorder.live = True
        self.history.connected(d.recorder)  # type: ignore[arg-type]
        await d.ws.send(d.client.connect(d.account.access).decode())
        if through:
            while d.ws is not None and d.client.auth_ok is None:
                await self._read(d, 1000)

    # --- rules ---------------------------------------------------------------------------------------

    @rule(i=st.integers(0, 3), to=st.integers(0, 1), n=st.integers(1, 3))
    def send(self, i: int, to: int, n: int) -> None:
        d = self.devices[i]
        for _ in range(n):
            s = d.client.send({"n": len(self.ledger.sent)}, conv=self.groups[to])
            self.ledger.sending(*d.key, s.cmid, self.groups[to])
            if d.ws is not None:
                self.history.sending(d.recorder, s.cmid)  # type: ignore[arg-type]
        self.run(self._write(d))

    @rule(i=st.integers(0, 3), which=st.integers(0, 1000), other=st.booleans())
    def resend_acked(self, i: int, which: int, other: bool) -> None:
        d = self.devices[i]
        done = sorted(k for k in self.ledger.acks if k[:2] == d.key and k not in self.reused)
        if not done:
            return
        key = done[which % len(done)]
        conv = self.ledger.sent[key]
        if other:
            conv = next(c for c in self.groups if c != conv)
            self.reused[key] = conv
        d.client.send({"again": True}, conv=conv, cmid=key[2])
        self.run(self._write(d))

    @rule(i=st.integers(0, 3))
    def retry(self, i: int) -> None:
        d = self.devices[i]
        if d.client.wants_retry:
            d.client.retry()
            self.run(self._write(d))

    @rule(i=st.integers(0, 3), n=st.integers(1, 30))
    def read(self, i: int, n: int) -> None:
        self.run(self._read(self.devices[i], n))

    @rule(i=st.integers(0, 3), through=st.booleans())
    def connect(self, i: int, through: bool) -> None:
        d = self.devices[i]
        if d.ws is None:
            self.run(self._connect(d, through))

    @rule(i=st.integers(0, 3))
    def drop(self, i: int) -> None:
        """The connection is lost with whatever was in flight both ways (sends, acks, messages)."""
        d = self.devices[i]
        if d.ws is not None:
            self.counts["drops"] += 1
            self.counts["in_flight_lost"] += d.client.in_flight
            self._lost(d)

    @rule(i=st.integers(0, 3), to=st.integers(0, 1))
    def lost_ack(self, i: int, to: int) -> None:
        """A send, then the connection is lost a moment later: most often after the server stored it and
        wrote the ack (lost), sometimes before (the send itself is lost). Either way the SDK resends the
        same cmid on the next connection, and the ledger expects one stored copy. (The pause only biases
        which of the two happens; both are valid runs.)"""
        d = self.devices[i]
        if d.ws is None or d.client.auth_ok is None:
            return
        s = d.client.send({"n": len(self.ledger.sent)}, conv=self.groups[to])
        self.ledger.sending(*d.key, s.cmid, self.groups[to])
        self.history.sending(d.recorder, s.cmid)  # type: ignore[arg-type]
        self.run(self._write(d))
        self.run(asyncio.sleep(0.02))
        self.counts["in_flight_lost"] += d.client.in_flight
        self._lost(d)

    @rule(i=st.integers(0, 3))
    def report_received(self, i: int) -> None:
        d = self.devices[i]
        for conv, seq in d.client.cursors.items():
            d.client.handled(conv, seq)
            self.reported[(d.key, conv)] = max(seq, self.reported.get((d.key, conv), 0))
        d.client.flush_recv()
        self.run(self._write(d))

    @rule(i=st.integers(0, 3), cursors=st.sampled_from(("held", "recv", "none")))
    def restart(self, i: int, cursors: str) -> None:
        """The client process restarts from what it persisted: its outbox, and its exact cursors, its
        ``recv``-ed ones (lagging), or none."""
        d = self.devices[i]
        if d.ws is not None:
            self._lost(d)
        start = dict({"held": d.client.cursors, "recv": d.client.handled_cursors, "none": {}}[cursors])
        d.lives += 1
        self.counts["restarts"] += 1
        outbox: tuple[Send, ...] = tuple(d.client.outbox.values())
        d.client = ClientSession(d.name, cursors=start, outbox=outbox, cmid_prefix=f"{d.name}-L{d.lives}")
        self.ledger.start(*d.key, start)

    @rule(g=st.integers(0, 1), who=st.integers(1, 2), add=st.booleans())
    def change_members(self, g: int, who: int, add: bool) -> None:
        conv, uid = self.groups[g], self.accounts[who].uid
        if (uid in self.members[conv]) == add:
            return
        owner, gid = self.accounts[0], conv.split(":")[1]
        if add:
            r = self.run(self.http.post(f"/groups/{gid}/members", json={"uids": [uid]}, headers=owner.auth))
            self.members[conv].add(uid)
        else:
            r = self.run(self.http.delete(f"/groups/{gid}/members/{uid}", headers=owner.auth))
            self.members[conv].discard(uid)
        assert r.status_code == 204, r.text
        self.counts["member_changes"] += 1

    @invariant()
    def streams_are_prefixes(self) -> None:
        assert not self.ledger.problems, self.ledger.problems

    # --- the end of a run ---------------------------------------------------------------------------------

    async def _logs(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for conv in self.groups:
            r = await self.http.get(
                f"/conversations/{conv}/messages", params={"after": 0, "limit": 200}, headers=self.accounts[0].auth
            )
            assert r.status_code == 200 and not r.json()["has_more"], r.text
            out[conv] = r.json()["messages"]
        return out

    async def _quiesce(self) -> dict[str, list[dict[str, Any]]]:
        deadline = time.monotonic() + 3 * WAIT
        while True:
            for d in self.devices:
                if d.ws is None:
                    await self._connect(d, through=True)
                if d.client.wants_retry:
                    await asyncio.sleep(d.client.retry_after)
                    d.client.retry()
                    await self._write(d)
                await self._read(d, 10_000)
            logs = await self._logs()
            behind = [
                (d.key, conv)
                for d in self.devices
                for conv in self.groups
                # (a life restarted without cursors starts at the device's saved cursor: at most what it reported)
                if d.account.uid in self.members[conv]
                and d.client.cursors.get(conv, self.reported.get((d.key, conv), 0)) < len(logs[conv])
            ]
            waiting = [d.key for d in self.devices if d.client.outbox]
            if not behind and not waiting:
                return logs
            assert time.monotonic() < deadline, (
                f"not quiet: behind {behind}, unanswered sends of {waiting}; "
                + str(
                    {
                        d.key: (d.client.state, d.client.cursors, list(d.client.outbox), d.client.wants_retry)
                        for d in self.devices
                    }
                )
                + f"; heads { ({c: len(v) for c, v in logs.items()}) }, members {self.members}"
            )
            await asyncio.sleep(0.02)

    def teardown(self) -> None:
        try:
            logs = self.run(self._quiesce(), 4 * WAIT)  # (its own deadline, 3 * WAIT, says what is stuck)
            entries = {
                conv: [Entry(e["seq"], e["mid"], e["from"], e["dev"], e["cmid"]) for e in log]
                for conv, log in logs.items()
            }
            got = self.ledger.check(entries, final=True)
            self._check_membership(logs)
            checked = self.run(self.history.check())
            assert checked["membership_checked"] == len(self.groups), checked
            for key, value in [*got.items(), *self.counts.items()]:
                self.stats[key] = self.stats.get(key, 0) + value
            self.stats["runs"] = self.stats.get("runs", 0) + 1
            self.stats["lives"] = self.stats.get("lives", 0) + sum(d.lives for d in self.devices)
        finally:
            for d in self.devices:
                if d.ws is not None:
                    self._lost(d)
            self.run(self.http.aclose())
            self.loop.run_until_complete(_finish_tasks())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def _check_membership(self, logs: dict[str, list[dict[str, Any]]]) -> None:
        for conv, log in logs.items():
            sets = member_sets(conv, log)
            assert sets is not None, f"{conv}: membership cannot be followed"
            for (uid, name), lives in self.ledger.lives.items():
                joins = [
                    0 if e["body"]["event"] == "group_created" else e["seq"] - 1
                    for e in log
                    if e["dev"] == "" and uid in (e["body"].get("uids") or [])
                ]
                for n, life in enumerate(lives, 1):
                    run = life.applied.get(conv, [])
                    for seq in run:
                        assert any(uid in b or uid in a for b, a in sets[seq - 1 :]), (
                            f"{uid}/{name} life {n} applied {conv} seq {seq}: never a member from there on"
                        )
                    if run and conv not in life.cursors:
                        assert joins and run[0] - 1 >= min(joins), (
                            f"{uid}/{name} life {n} started {conv} at {run[0]}, its joins are {joins}"
                        )


async def _finish_tasks() -> None:
    """Let the aborted connections finish closing, then end whatever is left on the run's loop."""
    await asyncio.sleep(0.01)
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def test_model_against_a_real_server(server: ServerProcess) -> None:
    ServerModel.server = server
    ServerModel.stats = {}
    started = time.monotonic()
    run_state_machine_as_test(
        ServerModel,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=not LONG,  # the suite replays the same runs (stable coverage); long runs explore anew
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    stats = ServerModel.stats
    # the runs reached what they are for (else the model tests nothing)
    for what in ("runs", "sends", "applied", "refused", "drops", "in_flight_lost", "restarts", "member_changes"):
        assert stats.get(what, 0) > 0, (what, stats)
    print(f"model vs im serve: {stats} in {time.monotonic() - started:.1f}s")
    with contextlib.suppress(Exception):
        Path(os.environ.get("IM_MODEL_STATS", "/dev/null")).write_text(json.dumps(stats))


async def test_checker_c7_c8_c9_catch_what_they_claim(server: ServerProcess) -> None:
    """The checker's new rules fail on a history that breaks them, over a real server's stored log: a send
    left unanswered on an open connection (C7), a message received by an account that never was a member
    (C8), a mid seen at two places (C9); a send whose connection ended is only counted (in doubt)."""
    tag = secrets.token_hex(3)
    ann, ben, cat = [await register(server.api, f"{name}{tag}") for name in ("ann", "ben", "cat")]
    async with httpx.AsyncClient(base_url=server.api, timeout=WAIT) as http:
        r = await http.post("/groups", json={"name": "c", "members": [ben.uid]}, headers=ann.auth)
        assert r.status_code == 201, r.text
    conv = f"g:{r.json()['gid']}"
    async with History(server, settle_timeout=0.5) as clean:
        a = clean.client(ann, "phone")
        await a.connect()
        for n in range(2):
            assert await a.send({"n": n}, conv=conv) is not None
        gone = Recorder(ben, "tab")  # a send made on a connection that then ended: in doubt, not a violation
        clean.connected(gone)  # type: ignore[arg-type]
        clean.sending(gone, "lost-1")  # type: ignore[arg-type]
        counts = await clean.check()
        assert counts["in_doubt"] == 1 and counts["membership_checked"] == 1 and counts["sends"] == 3, counts
        await clean.close_all()

        async with History(server, settle_timeout=0.5) as broken:
            b = broken.client(ben, "laptop")
            await b.connect()
            await b.wait_messages(3, conv)
            log = {m["seq"]: m for m in b.messages}
            open_ = Recorder(ann, "desk", live=True)
            broken.connected(open_)  # type: ignore[arg-type]
            broken.sending(open_, "never-answered")  # type: ignore[arg-type]  # C7
            broken.received(Recorder(cat, "web"), dict(log[2]))  # type: ignore[arg-type]  # C8: cat never was a member
            minted_twice = {**log[3], "seq": 4, "mid": log[2]["mid"]}  # a message under seq 2's mid (a zombie's id)
            broken.received(Recorder(ann, "old"), minted_twice)  # type: ignore[arg-type]  # C9
            with pytest.raises(AssertionError) as failed:
                await broken.check()
            text = str(failed.value)
            assert "C7: send never-answered" in text, text
            assert f"C8: uid {cat.uid} received {conv} seq 2" in text, text
            assert f"C9: mid {log[2]['mid']}" in text, text
            await broken.close_all()
