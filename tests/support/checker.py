"""The history checker: what every client saw, checked against the server's stored log.

C1 one message per (conversation, seq)                 C4 every acked send is in the log
C2 one seq per (sender device, client message id)      C5 each device receives strictly increasing seqs,
C3 no holes in any conversation's seqs                    with no gap, across reconnects too
                                                       C6 all members see the same log
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.support.client import Account, ChatClient
    from tests.support.server import ServerProcess


class History:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.clients: list[ChatClient] = []
        # (uid, device, conv) -> seqs in arrival order (msg frames and first acks together)
        self.streams: dict[tuple[int, str, str], list[int]] = defaultdict(list)
        self.seen: dict[tuple[str, int], dict[str, Any]] = {}  # (conv, seq) -> first msg/ack seen
        self.ack_seqs: dict[tuple[int, str, str], set[int]] = defaultdict(set)  # (uid, device, cmid) -> seqs
        self.ack_frames: list[tuple[int, str, dict[str, Any]]] = []
        self.accounts: dict[int, Account] = {}
        self.problems: list[str] = []

    def client(self, account: Account, device: str, tcp: bool = False) -> ChatClient:
        from tests.support.client import ChatClient

        c = ChatClient(self.server.ws, account, device, history=self, tcp=self.server.tcp if tcp else None)
        self.clients.append(c)
        self.accounts[account.uid] = account
        return c

    # --- called by the clients -----------------------------------------------------------------------

    def connected(self, c: ChatClient) -> None:
        pass

    def sending(self, c: ChatClient, cmid: str) -> None:
        pass

    def received(self, c: ChatClient, frame: dict[str, Any]) -> None:
        self._stream(c, frame["conv"], frame["seq"])
        self._seen(frame["conv"], frame["seq"], frame["mid"], frame["from"], frame["cmid"], frame.get("body"))

    def acked(self, c: ChatClient, frame: dict[str, Any]) -> None:
        uid = c.account.uid
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

    async def close_all(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()

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
        """Run C1-C6; raise AssertionError listing every violation. Returns counts for reports."""
        problems = list(self.problems)
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
        assert not problems, "history check failed:\n" + "\n".join(problems[:50])
        return {"conversations": len(logs), "messages": len(by_seq), "acks": len(self.ack_frames)}
