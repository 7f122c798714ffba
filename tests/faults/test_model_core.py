"""A model-based test of the sans-I/O session core, with no event loop and no sockets.

Hypothesis drives devices whose clients are the SDK's :class:`~im.client.session.ClientSession` and whose
server ends are :class:`~im.protocol.session.ServerSession`, joined by an in-memory network and a small
reference of the core (:class:`Core`: the log, cmid deduplication, membership, cursors, join points, with
the semantics of the real store and committer). Each step is one thing a real deployment does, in any
order Hypothesis picks:

- a client sends (to a conversation it may or may not be a member of), resends an acked cmid (to the same
  conversation: a ``dup`` ack; to another: ``invalid``), retries after a retryable refusal;
- frames travel (some, not all) in either direction; a connection drops with frames in flight (lost sends,
  lost acks); a device reconnects stating its cursors, or restarts from what it persisted (its exact
  cursors, its lagging ``recv``-ed cursors, or none);
- the committer commits a queued send (its answer and its routed copies travel separately), the store
  answers a replay page (of any size), authentication registers the connection before the sync points are
  read (what commits in between arrives early);
- routed copies are handed over late, out of order, or twice (broker redelivery);
- an owner adds a member to a group or removes one;
- now and then one connection gets a fair stretch (everything it has in flight goes through, in order),
  so runs reach deep states and not only the adversarial ones.

Invariants after every step: each device's application applies, per conversation, a gap-free,
duplicate-free run of the log matching it entry for entry (tests/support/model.py); never a message of a
group where its account was not a member, unless a member since a later seq (members read the earlier
history); a conversation not named in its first ``auth`` starts at a join point of its account or later;
the server never makes the client see a gap; acks name the stored entry. At the end of each run the
network is healed and everything runs until quiet: every send is then acked or finally refused, and every
device holds each of its conversations up to the head.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence.memory import MemoryPresence
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.client.session import ClientSession, SendFailed
from im.client.session import State as ClientState
from im.core.committer import SendRequest
from im.model.chat import StoredMessage, SyncPoint
from im.model.errors import ErrorCode
from im.protocol import commands as cmd
from im.protocol.frames import Ack, Bye, Error, Msg, Send
from im.protocol.messages import EncodedCache
from im.protocol.session import ServerSession
from im.protocol.session import State as ServerState
from tests.support.chat import chat_core
from tests.support.model import Entry, Ledger

LONG = os.environ.get("IM_FAULTS_LONG", "") not in ("", "0")
#: Runs and steps: about 10 s in the suite; the long variant explores far more.
EXAMPLES, STEPS = (2000, 80) if LONG else (150, 50)
pytestmark = pytest.mark.timeout(3600 if LONG else 120)

OWNER = 1
USERS = (1, 2, 3)
DEVICES = ((1, "a1"), (1, "a2"), (2, "b1"), (3, "c1"))
GROUPS = ("g:1", "g:2")
CONVS = (*GROUPS, "d:1:2")
_clock_now = 1_000.0


def _clock() -> float:
    return _clock_now


class Core:
    """The reference of the core: what the committer, the store and the read side do, synchronously.

    The join point and the start cursor follow the real store (im.backends.chat): a member added later
    joins at the seq before its ``members_added``; a device with no saved cursor starts at the later of its
    saved cursor and its current join point (0 once it is no longer a member)."""

    def __init__(self) -> None:
        self.logs: dict[str, list[StoredMessage]] = {c: [] for c in CONVS}
        self.members: dict[str, set[int]] = {"g:1": {1, 2}, "g:2": {1, 2, 3}, "d:1:2": {1, 2}}
        self.joined: dict[tuple[int, str], int] = {}
        self.keys: dict[tuple[int, str, str], StoredMessage] = {}
        #: every join point each user had, per conversation (0: a member from the start)
        self.joins: dict[tuple[int, str], list[int]] = {(u, c): [0] for c, ms in self.members.items() for u in ms}
        self.cursors: dict[tuple[int, str, str], int] = {}
        #: per conv, per seq: the members before and after that entry
        self.sets: dict[str, list[tuple[frozenset[int], frozenset[int]]]] = {c: [] for c in CONVS}
        self._mid = 10_000
        for g in GROUPS:
            body = {"event": "group_created", "uids": sorted(self.members[g]), "by": OWNER}
            self._append(g, OWNER, "", None, "system", body, before=frozenset())

    def _append(
        self, conv: str, sender: int, device: str, cmid: str | None, type_: str, body: object, before: frozenset[int]
    ) -> StoredMessage:
        self._mid += 1
        log = self.logs[conv]
        m = StoredMessage(
            conv=conv,
            seq=len(log) + 1,
            mid=self._mid,
            sender=sender,
            device=device,
            cmid=cmid or f"sys-{self._mid}",
            ts=int(_clock_now * 1000),
            type=type_,
            body=json.dumps(body).encode(),
        )
        log.append(m)
        self.sets[conv].append((before, frozenset(self.members[conv])))
        return m

    def commit(self, uid: int, device: str, s: cmd.Submit) -> tuple[StoredMessage | None, bool, ErrorCode | None]:
        """(message, dup, refusal)."""
        conv = s.conv
        assert conv is not None
        key = (uid, device, s.cmid)
        original = self.keys.get(key)
        if original is not None:
            if original.conv != conv:
                return None, False, ErrorCode.INVALID
            return original, True, None
        if uid not in self.members[conv]:
            return None, False, ErrorCode.NOT_MEMBER
        members = frozenset(self.members[conv])
        m = self._append(conv, uid, device, s.cmid, s.type, json.loads(s.body), before=members)
        self.keys[key] = m
        return m, False, None

    def change(self, conv: str, uid: int, add: bool) -> tuple[StoredMessage, list[int]] | None:
        """Add or remove ``uid``: the system message and its recipients (members before and after)."""
        if (uid in self.members[conv]) == add:
            return None
        before = frozenset(self.members[conv])
        if add:
            self.members[conv].add(uid)
            self.joined[(uid, conv)] = len(self.logs[conv])
            self.joins.setdefault((uid, conv), []).append(len(self.logs[conv]))
            body: dict[str, object] = {"event": "members_added", "uids": [uid], "by": OWNER}
        else:
            self.members[conv].discard(uid)
            self.joined.pop((uid, conv), None)
            body = {"event": "member_removed", "uid": uid, "by": OWNER}
        m = self._append(conv, OWNER, "", None, "system", body, before=before)
        return m, sorted(before | self.members[conv])

    def start_cursor(self, uid: int, device: str, conv: str) -> int:
        join = self.joined.get((uid, conv), 0) if uid in self.members[conv] else 0
        return max(join, self.cursors.get((uid, device, conv), 0))

    def sync_points(self, uid: int, device: str) -> list[SyncPoint]:
        out = []
        for conv, members in self.members.items():
            if uid in members:
                last = len(self.logs[conv])
                out.append(SyncPoint(conv, last, min(self.start_cursor(uid, device, conv), last)))
        return out

    def replay(
        self, uid: int, device: str, conv: str, after: int | None, upto: int, limit: int
    ) -> tuple[int, list[StoredMessage]]:
        if after is None:
            after = self.start_cursor(uid, device, conv)
            if after < upto and uid not in self.members[conv]:
                after = upto  # no longer a member: no join point to start from (im.core.reads)
        if upto <= after:
            return after, []
        return after, self.logs[conv][after : min(upto, after + limit)]

    def entries(self) -> dict[str, list[Entry]]:
        return {
            conv: [Entry(m.seq, str(m.mid), m.sender, m.device, m.cmid) for m in log] for conv, log in self.logs.items()
        }


@dataclass
class Conn:
    """One connection: the server's session, the bytes in flight each way, the work it is waiting for."""

    uid: int
    device: str
    server: ServerSession
    c2s: list[bytes] = field(default_factory=list)
    s2c: list[bytes] = field(default_factory=list)
    auth: cmd.Authenticate | None = None
    registered: bool = False
    fetches: list[cmd.Fetch] = field(default_factory=list)
    waits: list[cmd.AwaitLive] = field(default_factory=list)  # waits for live messages, each ends once
    results: list[tuple[str, StoredMessage | None, bool, ErrorCode | None]] = field(default_factory=list)
    deliveries: list[StoredMessage] = field(default_factory=list)
    open: bool = True


class SessionModel(RuleBasedStateMachine):
    #: What the runs did, summed over all of them (the test asserts the model reached each kind of step).
    stats: Counter[str] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.core = Core()
        self.cache = EncodedCache()
        self.ledger = Ledger()
        self.clients: dict[tuple[int, str], ClientSession] = {}
        self.conns: dict[tuple[int, str], Conn] = {}
        self.hub: dict[int, dict[str, Conn]] = defaultdict(dict)  # registered connections by user
        self.committer: list[tuple[Conn, cmd.Submit]] = []
        self.lives: dict[tuple[int, str], int] = defaultdict(int)
        self.reused: dict[tuple[int, str, str], str] = {}  # an acked cmid sent again to another conv

    @initialize()
    def start_clients(self) -> None:
        for uid, device in DEVICES:
            self._new_client(uid, device, {})

    def _new_client(self, uid: int, device: str, cursors: dict[str, int], outbox: tuple[Send, ...] = ()) -> None:
        key = (uid, device)
        self.lives[key] += 1
        self.clients[key] = ClientSession(
            device, cursors=cursors, outbox=outbox, max_in_flight=4, cmid_prefix=f"{device}-L{self.lives[key]}"
        )
        self.ledger.start(uid, device, cursors)

    # --- plumbing ----------------------------------------------------------------------------------------

    def _live(self, key: tuple[int, str]) -> Conn | None:
        conn = self.conns.get(key)
        return conn if conn is not None and conn.open else None

    def _client_out(self, key: tuple[int, str]) -> None:
        frames = self.clients[key].data_to_send()
        conn = self._live(key)
        if conn is not None:
            conn.c2s.extend(frames)  # (else written to a closing connection: lost)

    def _server_out(self, conn: Conn) -> None:
        if conn.open:
            conn.s2c.extend(conn.server.data_to_send())

    def _run(self, conn: Conn, commands: list[cmd.Command]) -> None:
        for c in commands:
            if isinstance(c, cmd.Authenticate):
                conn.auth = c
            elif isinstance(c, cmd.Submit):
                self.committer.append((conn, c))
            elif isinstance(c, cmd.Fetch):
                conn.fetches.append(c)
            elif isinstance(c, cmd.AwaitLive):
                conn.waits.append(c)
                self.stats["waited_live"] += 1
            elif isinstance(c, cmd.SaveCursor):
                k = (conn.uid, conn.device, c.conv)
                self.core.cursors[k] = max(self.core.cursors.get(k, 0), c.seq)
            elif isinstance(c, cmd.Close):
                self._server_out(conn)
                conn.open = False  # the client reads what was written, then the end of the stream
        self._server_out(conn)

    def _route(self, m: StoredMessage, uids: list[int]) -> None:
        for uid in uids:
            for conn in self.hub[uid].values():
                conn.deliveries.append(m)

    def _drop(self, key: tuple[int, str]) -> None:
        conn = self.conns.get(key)
        if conn is not None and conn.open:
            self.stats["lost_in_flight"] += len(conn.c2s) + len(conn.s2c) + len(conn.results)
        if conn is not None:
            conn.open = False
            conn.server.state = ServerState.CLOSED
            if self.hub[conn.uid].get(conn.device) is conn:
                del self.hub[conn.uid][conn.device]
        self.clients[key].connection_lost()

    def _may_read(self, uid: int, conv: str, seq: int) -> bool:
        """A member at ``seq`` (its membership message included), or one since a later seq (members read
        the earlier history: docs/protocol.md section 9)."""
        return any(uid in before or uid in after for before, after in self.core.sets[conv][seq - 1 :])

    def _applied(self, uid: int, device: str, conv: str, seq: int, mid: str) -> None:
        life = self.ledger.life(uid, device)
        if not life.applied[conv] and conv not in life.cursors:
            # Not named in the first auth: the device starts at a join point of its account or later.
            joins = self.core.joins.get((uid, conv), [])
            assert joins and seq - 1 >= min(joins), f"{uid}/{device} started {conv} at {seq}; joins {joins}"
        self.ledger.applied(uid, device, conv, seq, mid, member=self._may_read(uid, conv, seq))

    def _receive(self, key: tuple[int, str], data: bytes) -> None:
        uid, device = key
        client = self.clients[key]
        held = dict(client.cursors)
        event = client.receive(data)
        assert client.reconnect_reason is None, f"{key}: the server made a gap: {client.reconnect_reason}"
        if isinstance(event, Msg):
            self._applied(uid, device, event.conv, event.seq, event.mid)
        elif isinstance(event, Ack):
            self.stats["dup_acks"] += event.dup
            self.ledger.acked(uid, device, event.cmid, event.conv, event.seq, event.mid)
            if client.cursors.get(event.conv, 0) > held.get(event.conv, 0):
                self._applied(uid, device, event.conv, event.seq, event.mid)
        elif isinstance(event, SendFailed):
            k = (uid, device, event.send.cmid)
            if k in self.reused and self.reused[k] == event.send.conv:
                assert event.code == ErrorCode.INVALID, event
                self.stats["reused_refused"] += 1
            else:
                assert event.code == ErrorCode.NOT_MEMBER, event
                self.ledger.failed(uid, device, event.send.cmid, event.code)
        elif isinstance(event, Error):
            raise AssertionError(f"{key}: unexpected error {event}")
        elif isinstance(event, Bye):
            raise AssertionError(f"{key}: unexpected bye {event}")
        self._client_out(key)

    # --- which devices a rule applies to (rules run only where they do something) ------------------------

    def _eligible(self, what: str) -> list[tuple[int, str]]:
        out = []
        for dev in DEVICES:
            conn = self.conns.get(dev)
            if what in ("connect", "retry", "acked"):
                ok = {
                    "connect": conn is None or not conn.open,
                    "retry": self.clients[dev].wants_retry,
                    "acked": any(k[:2] == dev and k not in self.reused for k in self.ledger.acks),
                }[what]
            elif conn is None:
                ok = False
            elif what == "s2c":  # frames to read, or a close the client has yet to see
                ok = (
                    bool(conn.s2c)
                    or (conn.open and conn.server.has_output)
                    or (not conn.open and self.clients[dev].state is not ClientState.IDLE and self.conns[dev] is conn)
                )
            else:
                ok = (
                    conn.open
                    and {
                        "live": True,
                        "c2s": bool(conn.c2s),
                        "register": conn.auth is not None and not conn.registered,
                        "auth": conn.auth is not None and conn.registered,
                        "results": bool(conn.results),
                        "fetches": bool(conn.fetches),
                        "waits": bool(conn.waits),
                        "deliveries": bool(conn.deliveries),
                    }[what]
                )
            if ok:
                out.append(dev)
        return out

    def _pick(self, what: str, pick: int) -> tuple[int, str]:
        devs = self._eligible(what)
        return devs[pick % len(devs)]

    # --- rules: clients ---------------------------------------------------------------------------------

    @rule(dev=st.sampled_from(DEVICES), conv=st.sampled_from(CONVS), n=st.integers(1, 3))
    def send(self, dev: tuple[int, str], conv: str, n: int) -> None:
        client = self.clients[dev]
        for _ in range(n):
            s = client.send({"n": len(self.ledger.sent)}, conv=conv)
            self.ledger.sending(*dev, s.cmid, conv)
        self._client_out(dev)

    @precondition(lambda self: self._eligible("acked"))
    @rule(pick=st.integers(0, 1000), which=st.integers(0, 1000), other=st.booleans())
    def resend_acked(self, pick: int, which: int, other: bool) -> None:
        """The application sends an acked cmid again: to its conversation (the original's ack, ``dup``
        or not), or to another one (``invalid``)."""
        dev = self._pick("acked", pick)
        done = sorted(k for k in self.ledger.acks if k[:2] == dev and k not in self.reused)
        key = done[which % len(done)]
        conv = self.ledger.sent[key]
        if other:
            conv = next(c for c in CONVS if c != conv)
            self.reused[key] = conv
        self.clients[dev].send({"again": True}, conv=conv, cmid=key[2])
        self._client_out(dev)

    @precondition(lambda self: self._eligible("retry"))
    @rule(pick=st.integers(0, 1000))
    def retry(self, pick: int) -> None:
        dev = self._pick("retry", pick)
        self.clients[dev].retry()
        self._client_out(dev)

    @precondition(lambda self: self._eligible("live"))
    @rule(pick=st.integers(0, 1000))
    def report_received(self, pick: int) -> None:
        """The application persisted what it applied: ``recv`` for it (the server saves the cursor)."""
        dev = self._pick("live", pick)
        client = self.clients[dev]
        for conv, seq in client.cursors.items():
            client.handled(conv, seq)
        client.flush_recv()
        self._client_out(dev)

    @precondition(lambda self: self._eligible("connect"))
    @rule(pick=st.integers(0, 1000), through=st.booleans())
    def connect(self, pick: int, through: bool) -> None:
        """A device connects stating its cursors; ``through``: the whole handshake happens at once."""
        self._connect(self._pick("connect", pick), through)

    def _connect(self, dev: tuple[int, str], through: bool) -> None:
        uid, device = dev
        conn = Conn(uid, device, ServerSession(self.cache, clock=_clock))
        self.conns[dev] = conn
        conn.c2s.append(self.clients[dev].connect(f"token-{uid}"))
        if through:
            self._to_server(dev, 1)
            self._register(dev)
            self._authenticated(dev)
            self._to_client(dev, 1)

    @precondition(lambda self: self._eligible("live"))
    @rule(pick=st.integers(0, 1000))
    def drop(self, pick: int) -> None:
        """The connection is lost with whatever was in flight, both ways."""
        self._drop(self._pick("live", pick))

    @rule(dev=st.sampled_from(DEVICES), cursors=st.sampled_from(("held", "recv", "none")))
    def restart(self, dev: tuple[int, str], cursors: str) -> None:
        """The client process restarts from what it persisted: its outbox, and its exact cursors, the
        cursors it reported with ``recv`` (lagging), or none (the server's saved cursors decide)."""
        self._drop(dev)
        old = self.clients[dev]
        start = {"held": old.cursors, "recv": old.handled_cursors, "none": {}}[cursors]
        self._new_client(*dev, dict(start), tuple(old.outbox.values()))

    # --- rules: the network ----------------------------------------------------------------------------

    @precondition(lambda self: self._eligible("c2s"))
    @rule(pick=st.integers(0, 1000), n=st.integers(1, 8))
    def to_server(self, pick: int, n: int) -> None:
        self._to_server(self._pick("c2s", pick), n)

    def _to_server(self, dev: tuple[int, str], n: int) -> None:
        conn = self._live(dev)
        assert conn is not None
        for _ in range(min(n, len(conn.c2s))):
            self._run(conn, conn.server.receive(conn.c2s.pop(0), False))

    @precondition(lambda self: self._eligible("s2c"))
    @rule(pick=st.integers(0, 1000), n=st.integers(1, 12))
    def to_client(self, pick: int, n: int) -> None:
        self._to_client(self._pick("s2c", pick), n)

    def _to_client(self, dev: tuple[int, str], n: int) -> None:
        conn = self.conns[dev]
        self._server_out(conn)
        for _ in range(min(n, len(conn.s2c))):
            self._receive(dev, conn.s2c.pop(0))
        if not conn.open and not conn.s2c and self.clients[dev].state is not ClientState.IDLE:
            self._drop(dev)  # the server closed: the client reaches the end of the stream

    # --- rules: the server's work ----------------------------------------------------------------------

    @precondition(lambda self: self._eligible("register"))
    @rule(pick=st.integers(0, 1000))
    def register(self, pick: int) -> None:
        """Authentication: the connection registers (live messages reach it from now on)..."""
        self._register(self._pick("register", pick))

    def _register(self, dev: tuple[int, str]) -> None:
        conn = self._live(dev)
        if conn is None or conn.auth is None or conn.registered:
            return
        conn.registered = True
        old = self.hub[conn.uid].get(conn.device)
        assert old is None or not old.open
        self.hub[conn.uid][conn.device] = conn

    @precondition(lambda self: self._eligible("auth"))
    @rule(pick=st.integers(0, 1000))
    def authenticated(self, pick: int) -> None:
        """...then the sync points are read and the session opens."""
        self._authenticated(self._pick("auth", pick))

    def _authenticated(self, dev: tuple[int, str]) -> None:
        conn = self._live(dev)
        if conn is None or not conn.registered or conn.auth is None:
            return
        auth, conn.auth = conn.auth, None
        points = self.core.sync_points(conn.uid, conn.device)
        self._run(conn, conn.server.auth_succeeded(conn.uid, conn.device, points, auth.cursors))

    @precondition(lambda self: self.committer)
    @rule(pick=st.integers(0, 1000))
    def commit(self, pick: int) -> None:
        """The committer stores one queued send (each connection's sends in their order)."""
        heads: dict[int, int] = {}
        for i, (conn, _) in enumerate(self.committer):
            heads.setdefault(id(conn), i)
        i = sorted(heads.values())[pick % len(heads)]
        conn, s = self.committer.pop(i)
        m, dup, err = self.core.commit(conn.uid, conn.device, s)
        if m is not None and not dup:
            self._route(m, sorted(self.core.sets[m.conv][m.seq - 1][1]))
        if conn.open:
            conn.results.append((s.cmid, m, dup, err))

    @precondition(lambda self: self._eligible("results"))
    @rule(pick=st.integers(0, 1000), which=st.integers(0, 1000))
    def answer_send(self, pick: int, which: int) -> None:
        self._answer_send(self._pick("results", pick), which)

    def _answer_send(self, dev: tuple[int, str], which: int) -> None:
        conn = self.conns[dev]
        cmid, m, dup, err = conn.results.pop(which % len(conn.results))
        if err is not None:
            conn.server.send_failed(cmid, err, "refused")
            self._server_out(conn)
        else:
            assert m is not None
            self._run(conn, conn.server.send_done(cmid, m, dup))

    @precondition(lambda self: self._eligible("fetches"))
    @rule(pick=st.integers(0, 1000), which=st.integers(0, 1000), page=st.integers(1, 4))
    def answer_fetch(self, pick: int, which: int, page: int) -> None:
        self._answer_fetch(self._pick("fetches", pick), which, page)

    def _answer_fetch(self, dev: tuple[int, str], which: int, page: int) -> None:
        conn = self.conns[dev]
        f = conn.fetches.pop(which % len(conn.fetches))
        start, messages = self.core.replay(conn.uid, conn.device, f.conv, f.after, f.upto, page)
        self._run(conn, conn.server.fetched(f.conv, start, messages))

    @precondition(lambda self: self._eligible("waits"))
    @rule(pick=st.integers(0, 1000), which=st.integers(0, 1000))
    def end_wait(self, pick: int, which: int) -> None:
        """A wait for live messages ends (``live_wait`` passed), whether they came meanwhile or not."""
        self._end_wait(self._pick("waits", pick), which)

    def _end_wait(self, dev: tuple[int, str], which: int) -> None:
        conn = self.conns[dev]
        wait = conn.waits.pop(which % len(conn.waits))
        self._run(conn, conn.server.live_wait_over(wait.conv, wait.seq))

    @precondition(lambda self: self._eligible("deliveries"))
    @rule(pick=st.integers(0, 1000), which=st.integers(0, 1000), again=st.booleans())
    def hand_over(self, pick: int, which: int, again: bool) -> None:
        """A routed copy reaches the connection: any of those waiting (late, out of order), and maybe
        once more later (redelivery)."""
        self._hand_over(self._pick("deliveries", pick), which, again)

    def _hand_over(self, dev: tuple[int, str], which: int, again: bool) -> None:
        conn = self.conns[dev]
        i = which % len(conn.deliveries)
        m = conn.deliveries[i] if again else conn.deliveries.pop(i)
        self.stats["redelivered"] += again
        self._run(conn, conn.server.deliver(m))

    @precondition(lambda self: self._eligible("live"))
    @rule(pick=st.integers(0, 1000))
    def settle(self, pick: int) -> None:
        """A fair stretch for one connection: everything it has in flight goes through, in order."""
        dev = self._pick("live", pick)
        conn = self.conns[dev]
        self._to_server(dev, len(conn.c2s))
        self._register(dev)
        self._authenticated(dev)
        mine = [item for item in self.committer if item[0] is conn]
        self.committer = [item for item in self.committer if item[0] is not conn]
        for _, s in mine:
            m, dup, err = self.core.commit(conn.uid, conn.device, s)
            if m is not None and not dup:
                self._route(m, sorted(self.core.sets[m.conv][m.seq - 1][1]))
            conn.results.append((s.cmid, m, dup, err))
        while conn.open and (conn.fetches or conn.results or conn.deliveries or conn.waits):
            if conn.deliveries:
                self._hand_over(dev, 0, False)
            if conn.open and conn.results:
                self._answer_send(dev, 0)
            if conn.open and conn.fetches:
                self._answer_fetch(dev, 0, 100)
            if conn.open and conn.waits and not conn.deliveries:
                self._end_wait(dev, 0)
        self._to_client(dev, len(conn.s2c) + 1000)

    @rule(conv=st.sampled_from(GROUPS), uid=st.sampled_from(USERS[1:]), add=st.booleans())
    def change_members(self, conv: str, uid: int, add: bool) -> None:
        changed = self.core.change(conv, uid, add)
        if changed is not None:
            self._route(*changed)

    # --- invariants ---------------------------------------------------------------------------------------

    @invariant()
    def streams_are_prefixes(self) -> None:
        assert not self.ledger.problems, self.ledger.problems

    @invariant()
    def acks_name_the_stored_entry(self) -> None:
        for key, acks in self.ledger.acks.items():
            stored = self.core.keys.get(key)
            assert stored is not None and acks == {(stored.conv, stored.seq, str(stored.mid))}, (key, acks, stored)

    def teardown(self) -> None:
        """Heal everything and run until quiet; then every send has its answer and every device its log."""
        self.stats["runs"] += 1
        self.stats["acked_mid_run"] += len(self.ledger.acks)
        self.stats["applied_mid_run"] += sum(
            len(r) for ls in self.ledger.lives.values() for x in ls for r in x.applied.values()
        )
        for _ in range(200):
            before = self._progress()
            for dev in self._eligible("connect"):
                self._connect(dev, through=False)
            while self.committer:
                self.commit(0)
            for dev in DEVICES:
                conn = self._live(dev)
                if conn is None:
                    continue
                self._to_server(dev, len(conn.c2s))
                self._register(dev)
                self._authenticated(dev)
                while conn.open and (conn.fetches or conn.results or conn.deliveries or conn.waits):
                    if conn.fetches:
                        self._answer_fetch(dev, 0, 100)
                    if conn.open and conn.results:
                        self._answer_send(dev, 0)
                    if conn.open and conn.deliveries:
                        self._hand_over(dev, 0, False)
                    if conn.open and conn.waits:
                        self._end_wait(dev, 0)
                self._to_client(dev, len(conn.s2c) + 1000)
                if self.clients[dev].wants_retry:
                    self.clients[dev].retry()
                    self._client_out(dev)
            if self._progress() == before:
                break
        else:
            raise AssertionError("the system did not become quiet")
        got = self.ledger.check(self.core.entries(), final=True)
        self.stats.update(got)
        self.stats["restarts"] += sum(self.lives.values()) - len(DEVICES)
        for uid, device in DEVICES:
            client = self.clients[(uid, device)]
            assert not client.outbox, f"{uid}/{device} still has unanswered sends {list(client.outbox)}"
            for conv, members in self.core.members.items():
                if uid in members:  # (a life that applied nothing of conv started at the saved cursor)
                    held = client.cursors.get(conv, self.core.start_cursor(uid, device, conv))
                    assert held == len(self.core.logs[conv]), (uid, device, conv, held)

    def _progress(self) -> tuple[int, ...]:
        return (
            sum(
                len(c.c2s) + len(c.s2c) + len(c.fetches) + len(c.results) + len(c.deliveries) + len(c.waits)
                for c in self.conns.values()
            ),
            len(self.committer),
            sum(len(log) for log in self.core.logs.values()),
            sum(sum(c.cursors.values()) + len(c.outbox) for c in self.clients.values()),
            len(self.ledger.acks),
            len(self.ledger.failures),
        )


def test_session_core_model() -> None:
    SessionModel.stats = Counter()
    started = time.monotonic()
    run_state_machine_as_test(
        SessionModel,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=not LONG,  # the suite replays the same runs (stable coverage); long runs explore anew
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    stats = SessionModel.stats
    print(f"model of the session core: {dict(stats)} in {time.monotonic() - started:.1f}s")
    # the runs reached what they are for (else the model tests nothing)
    for what in (
        "applied_mid_run",
        "acked_mid_run",
        "dup_acks",
        "lost_in_flight",
        "redelivered",
        "reused_refused",
        "waited_live",
    ):
        assert stats[what] > 0, (what, dict(stats))


# --- the bug this model found, pinned on the real read side and store ------------------------------------


async def test_first_sight_after_removal_replays_nothing_before_the_join(tmp_path: Path) -> None:
    """A user added to a group and removed again before its connection read where to start (the
    ``Fetch(after=None)`` of a conversation first seen live) started at 0, not at its join point: the
    replay gave it the group's whole history from before it joined. It now starts at the live message."""
    db = SqliteDatabase(tmp_path / "im.db")
    chat, accounts = SqliteChatStore(db), SqliteAccountStore(db)
    await chat.start()
    await accounts.start()
    core = chat_core(chat, accounts, MemoryRouter(), MemoryPresence())
    core.committer.start()
    try:
        for name in ("ann", "ben", "cat"):
            await accounts.create_user(name, name, "hash", 0)
        group = await core.groups.create_group(1, "g", [2])  # seq 1
        conv = f"g:{group.gid}"
        for cmid in ("before-1", "before-2"):  # seqs 2, 3
            await core.committer.send(SendRequest(1, "phone", cmid, conv, None, "text", b'"x"'))
        await core.groups.add_members(1, group.gid, [3])  # seq 4: cat joins at 3
        await core.groups.remove_member(1, group.gid, 3)  # seq 5
        log, _ = await core.reads.history(1, conv, after=0, before=None, limit=10)
        # cat's connection saw seq 4 first (its members_added) and asks where to start; cat is gone by now
        session = ServerSession(EncodedCache(), clock=_clock)
        assert session.receive(b'{"t":"auth","token":"t","device":"tab"}', False)
        session.auth_succeeded(3, "tab", [], {})
        session.data_to_send()
        fetch = session.deliver(log[3])
        assert fetch == [cmd.Fetch(conv, None, 3)]
        assert session.deliver(log[4]) == []
        start, messages = await core.reads.replay(3, "tab", conv, None, 3, 500)
        assert (start, messages) == (3, [])
        session.fetched(conv, start, messages)
        assert [json.loads(f)["seq"] for f in session.data_to_send()] == [4, 5]
        # a current member first seeing the group still gets it from its join point (0 here)
        start, messages = await core.reads.replay(2, "tab", conv, None, 3, 500)
        assert (start, [m.seq for m in messages]) == (0, [1, 2, 3])
    finally:
        await core.committer.stop()
        await accounts.close()
        await chat.close()


def test_a_cmid_reused_for_another_conversation_is_not_acked_by_the_earlier_message() -> None:
    """A device's send ``c`` stored in d:1:2, then the same cmid sent to g:1 (refused ``invalid`` by the
    core): the replay of d:1:2 carried the stored ``c`` and the session took it for the answer to the
    g:1 send, acking it as d:1:2 seq 1 (then came the refusal too). The session now matches both the
    cmid and the conversation."""
    session = ServerSession(EncodedCache(), clock=_clock)
    session.receive(b'{"t":"auth","token":"t","device":"a2"}', False)
    fetches = session.auth_succeeded(1, "a2", [SyncPoint("d:1:2", 1, 0), SyncPoint("g:1", 0, 0)], {})
    assert fetches == [cmd.Fetch("d:1:2", 0, 1)]
    submit = session.receive(b'{"t":"send","cmid":"c","conv":"g:1","body":1}', False)
    assert [type(c) for c in submit] == [cmd.Submit]
    stored = StoredMessage("d:1:2", 1, 77, 1, "a2", "c", 5, "text", b"1")
    session.fetched("d:1:2", 0, [stored])
    session.send_failed("c", ErrorCode.INVALID, "cmid was already used for another conversation")
    frames = [json.loads(f) for f in session.data_to_send()]
    assert [(f["t"], f.get("conv"), f.get("ref")) for f in frames] == [
        ("auth_ok", None, None),
        ("msg", "d:1:2", None),
        ("synced", None, None),
        ("error", None, "c"),
    ]


def test_a_group_joined_while_connected_starts_after_the_cursor_the_auth_named() -> None:
    """A device holding g:2 up to seq 1 from an earlier membership connects while not a member (the cursor
    is ignored then) and is added back (seq 3): the session started it at the join point (seq 2), so the
    device, holding 1, saw 3 next: a gap, and had to reconnect. It now starts after the named cursor."""
    session = ServerSession(EncodedCache(), clock=_clock)
    session.receive(b'{"t":"auth","token":"t","device":"c1","cursors":{"g:2":1}}', False)
    assert session.auth_succeeded(3, "c1", [], {"g:2": 1}) == []
    added = StoredMessage("g:2", 3, 78, 1, "", "sys-78", 5, "system", b'{"event":"members_added","uids":[3]}')
    assert session.deliver(added) == [cmd.Fetch("g:2", 1, 2)]
    removed = StoredMessage("g:2", 2, 76, 1, "", "sys-76", 5, "system", b'{"event":"member_removed","uid":3}')
    session.fetched("g:2", 1, [removed])
    assert [json.loads(f).get("seq") for f in session.data_to_send()] == [None, None, 2, 3]  # auth_ok, synced


def test_a_resent_send_below_the_start_point_of_an_untracked_conversation_is_answered() -> None:
    """A device no longer in g:3 resends a send stored there at seq 4 (its ack was lost); its saved cursor
    is 5. The answer (a dup) made the session fetch from the store's start point (5): the message, below
    it, was dropped from the waiting ones and the send was never answered, its cmid held in flight for
    good (every resend on the connection ignored). It is now acked, as a dup."""
    session = ServerSession(EncodedCache(), clock=_clock)
    session.receive(b'{"t":"auth","token":"t","device":"b1"}', False)
    session.auth_succeeded(2, "b1", [], {})
    assert [type(c) for c in session.receive(b'{"t":"send","cmid":"x","conv":"g:3","body":1}', False)] == [cmd.Submit]
    stored = StoredMessage("g:3", 4, 79, 2, "b1", "x", 5, "text", b"1")
    assert session.send_done("x", stored, True) == [cmd.Fetch("g:3", None, 3)]
    session.fetched("g:3", 5, [])
    frames = [json.loads(f) for f in session.data_to_send()]
    assert [(f["t"], f.get("seq"), f.get("dup")) for f in frames][-1] == ("ack", 4, True)
    assert session.in_flight == 0
