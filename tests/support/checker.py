"""The history checker: what every client saw, checked against the server's stored log.

C1 one message per (conversation, seq)                 C4 every acked send is in the log
C2 one seq per (sender device, client message id)      C5 each device receives strictly increasing seqs,
C3 no holes in any conversation's seqs                    with no gap, across reconnects too
                                                       C6 all members see the same log
C7 no send silently dropped: every send a client made is answered (``ack``, or an ``error`` with its cmid
   as ``ref``) on its connection, unless that connection ended first (the send is then *in doubt*: the
   client saw the connection go and must resend; counted, not a violation). At the end the checker waits
   up to ``settle_timeout`` seconds for the answers still due on open connections.
C8 membership is respected, judged from the group's own ``system`` messages (docs/protocol.md section 17):
   every stored message's sender was a member when it was stored, and a device receives a message only
   if its account was a member at that seq (the membership message that adds or removes it included), or
   became one later (members may read earlier history, section 9) by a change stored before the device
   got the message (its ``ts`` against the arrival time, ``membership_slack_ms`` of tolerance).
C9 one message id names one message: no ``mid`` at two places, in the stored logs or in what clients saw
   (a node id claimed twice, or a paused node minting under an id another took over, would show here).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.support.client import Account, ChatClient
    from tests.support.server import ServerProcess


class History:
    def __init__(self, server: ServerProcess, *, settle_timeout: float = 10.0, membership_slack_ms: int = 100) -> None:
        self.server = server
        #: C7: how long the check waits for the answers still due on open connections.
        self.settle_timeout = settle_timeout
        #: C8: tolerance between a membership message's ``ts`` and a client's clock reading at arrival.
        self.membership_slack_ms = membership_slack_ms
        self.clients: list[ChatClient] = []
        # (uid, device, conv) -> seqs in arrival order (msg frames and first acks together)
        self.streams: dict[tuple[int, str, str], list[int]] = defaultdict(list)
        self.seen: dict[tuple[str, int], dict[str, Any]] = {}  # (conv, seq) -> first msg/ack seen
        self.ack_seqs: dict[tuple[int, str, str], set[int]] = defaultdict(set)  # (uid, device, cmid) -> seqs
        self.ack_frames: list[tuple[int, str, dict[str, Any]]] = []
        self.accounts: dict[int, Account] = {}
        self.problems: list[str] = []
        # C7: (id(client), cmid) -> (client, its connection count when the send was made), until answered
        self.unanswered: dict[tuple[int, str], tuple[ChatClient, int]] = {}
        self.generation: dict[int, int] = defaultdict(int)  # id(client) -> connections that got auth_ok
        self.sends = 0
        self.refusals = 0
        self._late: dict[tuple[int, str], str] = {}  # C7 violations found so far
        # C8: (uid, conv, seq) -> earliest arrival (ms since the epoch) at any device of the account
        self.arrivals: dict[tuple[int, str, int], float] = {}

    def client(self, account: Account, device: str, tcp: bool = False) -> ChatClient:
        from tests.support.client import ChatClient

        c = ChatClient(self.server.ws, account, device, history=self, tcp=self.server.tcp if tcp else None)
        self.clients.append(c)
        self.accounts[account.uid] = account
        return c

    # --- called by the clients -----------------------------------------------------------------------

    def connected(self, c: ChatClient) -> None:
        self.generation[id(c)] += 1

    def sending(self, c: ChatClient, cmid: str) -> None:
        self.sends += 1
        self.unanswered[(id(c), cmid)] = (c, self.generation[id(c)])

    def refused(self, c: ChatClient, frame: dict[str, Any]) -> None:
        """An ``error`` frame: with a ``ref``, the answer to that send."""
        if frame.get("ref") is not None:
            self.refusals += 1
            self.unanswered.pop((id(c), frame["ref"]), None)

    def received(self, c: ChatClient, frame: dict[str, Any]) -> None:
        key = (c.account.uid, frame["conv"], frame["seq"])
        if key not in self.arrivals:
            self.arrivals[key] = time.time() * 1000
        self._stream(c, frame["conv"], frame["seq"])
        self._seen(frame["conv"], frame["seq"], frame["mid"], frame["from"], frame["cmid"], frame.get("body"))

    def acked(self, c: ChatClient, frame: dict[str, Any]) -> None:
        uid = c.account.uid
        self.unanswered.pop((id(c), frame["cmid"]), None)
        self.ack_seqs[(uid, c.device, frame["cmid"])].add(frame["seq"])
        self.ack_frames.append((uid, c.device, frame))
        if not frame.get("dup"):
            self._stream(c, frame["conv"], frame["seq"])
        self._seen(frame["conv"], frame["seq"], frame["mid"], uid, frame["cmid"], None)

    def _stream(self, c: ChatClient, conv: str, seq: int) -> None:
        stream = self.streams[(c.account.uid, c.device, conv)]
        if stream and seq != stream[-1] + 1:
            self.problems.append(f"C5: device {c.account.uid}/{c.device} got {conv} seq {seq} after {stream[-1]}")
        stream.append(seq)

    def _seen(self, conv: str, seq: int, mid: str, sender: int, cmid: str, body: Any) -> None:
        entry = self.seen.setdefault((conv, seq), {"mid": mid, "from": sender, "cmid": cmid, "body": body})
        if (entry["mid"], entry["from"], entry["cmid"]) != (mid, sender, cmid):
            self.problems.append(f"C1/C6: {conv} seq {seq} seen as {entry} and as {mid}/{sender}/{cmid}")

    # --- the check -----------------------------------------------------------------------------------

    def _due(self) -> list[tuple[ChatClient, str]]:
        """Unanswered sends made on a connection that is still open."""
        gen = self.generation
        return [(c, cmid) for (_, cmid), (c, g) in self.unanswered.items() if c.live and g == gen[id(c)]]

    async def settle(self) -> None:
        """C7: wait (at most ``settle_timeout``) for the answers still due on open connections; those that do
        not come are violations. Called by :meth:`close_all` (before closing) and :meth:`check`."""
        deadline = time.monotonic() + self.settle_timeout
        while self._due() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c, cmid in self._due():
            self._late.setdefault(
                (id(c), cmid),
                f"C7: send {cmid} of {c.account.uid}/{c.device} got no ack or error in {self.settle_timeout:g}s "
                "while its connection stayed open",
            )

    async def close_all(self) -> None:
        await self.settle()
        await self._close_clients()

    async def _close_clients(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()

    async def __aenter__(self) -> History:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Every client closed, whatever ended the block: a failed test must not leave sockets for the
        garbage collector to find during a later test (ResourceWarning, an error there). A block that
        ends well has usually called :meth:`close_all` and :meth:`check` itself; closing again is a no-op."""
        await self._close_clients()

    async def _log(self, conv: str) -> list[dict[str, Any]] | None:
        """The whole stored log of ``conv``, read through the API as some current member."""
        async with httpx.AsyncClient(timeout=30) as http:
            for account in self.accounts.values():
                out: list[dict[str, Any]] = []
                after = 0
                while True:
                    r = await http.get(
                        f"{self.server.api}/conversations/{conv}/messages",
                        params={"after": after, "limit": 200},
                        headers=account.auth,
                    )
                    if r.status_code != 200:
                        break
                    page = r.json()
                    out.extend(page["messages"])
                    if not page["has_more"] or not page["messages"]:
                        return out
                    after = page["messages"][-1]["seq"]
        return None

    async def check(self) -> dict[str, int]:
        """Run C1-C9; raise AssertionError listing every violation. Returns counts for reports."""
        await self.settle()
        problems = list(self.problems)
        problems += list(self._late.values())
        problems += [f"client reader crashed: {c.reader_error!r}" for c in self.clients if c.reader_error]
        # C2: one seq per (sender device, cmid), as acked
        for key, acked in self.ack_seqs.items():
            if len(acked) > 1:
                problems.append(f"C2: {key} acked with seqs {sorted(acked)}")
        convs = sorted({conv for conv, _ in self.seen})
        logs: dict[str, list[dict[str, Any]]] = {}
        for conv in convs:
            entries = await self._log(conv)
            if entries is None:
                problems.append(f"log of {conv} unreadable by any recorded account")
                continue
            logs[conv] = entries
            seqs = [e["seq"] for e in entries]
            # C1 and C3: one entry per seq, 1..N dense
            if len(seqs) != len(set(seqs)):
                problems.append(f"C1: {conv} has repeated seqs")
            if seqs != list(range(1, len(seqs) + 1)):
                problems.append(f"C3: {conv} seqs are not 1..{len(seqs)}: {seqs[:20]}...")
            # C2 in the log: one entry per (sender, device, cmid)
            keys = [(e["from"], e["dev"], e["cmid"]) for e in entries]
            if len(keys) != len(set(keys)):
                problems.append(f"C2: {conv} stores a (sender, device, cmid) twice")
        by_seq = {(conv, e["seq"]): e for conv, entries in logs.items() for e in entries}
        # C4: every ack names a stored entry with its cmid and sender
        for uid, device, ack in self.ack_frames:
            e = by_seq.get((ack["conv"], ack["seq"]))
            if e is None or (e["cmid"], e["from"], e["dev"], e["mid"]) != (ack["cmid"], uid, device, ack["mid"]):
                problems.append(f"C4: ack {ack} of {uid}/{device} does not match the log entry {e}")
        # C6: what devices saw is what the log holds
        for (conv, seq), seen in self.seen.items():
            e = by_seq.get((conv, seq))
            if e is None:
                if conv in logs:
                    problems.append(f"C6: {conv} seq {seq} was delivered but is not in the log")
                continue
            if (e["mid"], e["from"], e["cmid"]) != (seen["mid"], seen["from"], seen["cmid"]) or (
                seen["body"] is not None and e["body"] != seen["body"]
            ):
                problems.append(f"C6: {conv} seq {seq} delivered as {seen}, stored as {e}")
        membership_checked = self._check_membership(logs, problems)
        self._check_mids(logs, problems)
        assert not problems, "history check failed:\n" + "\n".join(problems[:50])
        in_doubt = sum(1 for key in self.unanswered if key not in self._late)
        return {
            "conversations": len(logs),
            "messages": len(by_seq),
            "acks": len(self.ack_frames),
            "sends": self.sends,
            "refusals": self.refusals,
            "in_doubt": in_doubt,
            "membership_checked": membership_checked,
        }

    def _check_membership(self, logs: dict[str, list[dict[str, Any]]], problems: list[str]) -> int:
        """C8; returns the number of conversations whose membership could be followed."""
        followed: dict[str, list[tuple[frozenset[int], frozenset[int]]]] = {}
        for conv, entries in logs.items():
            if [e["seq"] for e in entries] != list(range(1, len(entries) + 1)):
                continue  # C3 reports it; membership needs the whole log
            sets = member_sets(conv, entries)
            if sets is None:
                continue  # a membership message that cannot be read: the log cannot be judged
            followed[conv] = sets
            for e, (before, _after) in zip(entries, sets, strict=True):
                if e["type"] != "system" and e["from"] not in before:
                    problems.append(f"C8: {conv} seq {e['seq']} stored from {e['from']}, not a member then")
        for (uid, conv, seq), arrived in self.arrivals.items():
            sets = followed.get(conv)
            if sets is None or not 1 <= seq <= len(sets):
                continue  # C6 reports what is not in the log
            before, after = sets[seq - 1]
            if uid in before or uid in after:
                continue
            entries = logs[conv]
            joins = [entries[i]["ts"] for i in range(seq, len(entries)) if uid in sets[i][1]]
            if joins and min(joins) <= arrived + self.membership_slack_ms:
                continue  # a member since a later seq reads the earlier history (docs/protocol.md section 9)
            problems.append(f"C8: uid {uid} received {conv} seq {seq}, where it was not a member")
        return len(followed)

    def _check_mids(self, logs: dict[str, list[dict[str, Any]]], problems: list[str]) -> None:
        """C9: every mid names one (conversation, seq), across the logs and what clients saw."""
        where: dict[str, tuple[str, int]] = {}
        places = [((conv, e["seq"]), e["mid"]) for conv, entries in logs.items() for e in entries]
        places += [(key, seen["mid"]) for key, seen in self.seen.items()]
        for place, mid in places:
            first = where.setdefault(mid, place)
            if first != place:
                problems.append(f"C9: mid {mid} names {first[0]} seq {first[1]} and {place[0]} seq {place[1]}")


def member_sets(conv: str, entries: list[dict[str, Any]]) -> list[tuple[frozenset[int], frozenset[int]]] | None:
    """Per entry of a conversation's whole log (seq 1 first): the members before it and after it.

    A direct conversation ``d:<a>:<b>`` always has its two users. A group's members follow its ``system``
    messages (docs/protocol.md section 17); None when they cannot be followed (a membership message that
    does not read as one, e.g. ``undecryptable``: every entry with ``dev`` "" is the server's).
    """
    if conv.startswith("d:"):
        pair = frozenset(int(u) for u in conv.split(":")[1:])
        return [(pair, pair)] * len(entries)
    members: set[int] = set()
    out: list[tuple[frozenset[int], frozenset[int]]] = []
    for i, e in enumerate(entries):
        before = frozenset(members)
        if e["dev"] == "":
            body = e.get("body")
            if e["type"] != "system" or not isinstance(body, dict):
                return None
            event = body.get("event")
            if event == "group_created":
                if i != 0:
                    return None
                members.update(body["uids"])
            elif event == "members_added":
                members.update(body["uids"])
            elif event in ("member_removed", "member_left"):
                members.discard(body["uid"])
        out.append((before, frozenset(members)))
    if entries and (entries[0]["dev"] != "" or not out[0][1]):
        return None  # not a group log from its start
    return out
