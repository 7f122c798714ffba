"""What the model-based tests (tests/faults/test_model_*.py) expect of every device, written once.

A :class:`Ledger` records, per device and per *life* of its client (a client restarted from what it had
persisted starts a new life), the seqs of each conversation the application applied, in order, and the
answers to its sends. :meth:`Ledger.check` then judges them against the conversations' logs:

- each life applies, per conversation, a gap-free, duplicate-free run of the log (seq n+1 after n), each
  entry exactly the logged one (mid, sender, device, cmid);
- a conversation named in the life's first ``auth`` cursors starts right after that cursor;
- every acked cmid is in the log exactly once, at the acked seq, and all its acks agree;
- every send is answered in the end (acked, or refused for good), none both;
- a device applies a group's message only where its account was a member, or was a member when it got it
  (current members read the earlier history, docs/protocol.md section 9).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Entry:
    """One logged message, as the tests compare it."""

    seq: int
    mid: str
    sender: int
    device: str
    cmid: str


@dataclass
class Life:
    """One run of a device's client, from its (re)start."""

    cursors: dict[str, int]  # what its first auth named
    applied: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    mids: dict[tuple[str, int], str] = field(default_factory=dict)


@dataclass
class Ledger:
    #: (uid, device) -> its lives, the current one last
    lives: dict[tuple[int, str], list[Life]] = field(default_factory=dict)
    #: (uid, device, cmid) -> conv it was sent to
    sent: dict[tuple[int, str, str], str] = field(default_factory=dict)
    #: (uid, device, cmid) -> every (conv, seq, mid) it was acked with
    acks: dict[tuple[int, str, str], set[tuple[str, int, str]]] = field(default_factory=lambda: defaultdict(set))
    #: (uid, device, cmid) -> the final refusal's code
    failures: dict[tuple[int, str, str], str] = field(default_factory=dict)
    #: problems found as events came (raised by :meth:`check`, or at once by :meth:`applied`)
    problems: list[str] = field(default_factory=list)

    def start(self, uid: int, device: str, cursors: Mapping[str, int]) -> None:
        """A new life of the device's client, whose first ``auth`` names ``cursors``."""
        self.lives.setdefault((uid, device), []).append(Life(dict(cursors)))

    def life(self, uid: int, device: str) -> Life:
        return self.lives[(uid, device)][-1]

    def applied(self, uid: int, device: str, conv: str, seq: int, mid: str, *, member: bool = True) -> None:
        """The application took ``seq`` of ``conv`` (a ``msg``, or the non-dup ``ack`` that advanced it).
        ``member``: the account may read it now (the caller's own judgement, see the module docstring)."""
        life = self.life(uid, device)
        run = life.applied[conv]
        where = f"{uid}/{device} life {len(self.lives[(uid, device)])} {conv}"
        if run and seq != run[-1] + 1:
            self.problems.append(f"{where}: applied seq {seq} after {run[-1]} (gap or repeat)")
        if not run and conv in life.cursors and seq != life.cursors[conv] + 1:
            self.problems.append(f"{where}: started at {seq}, its auth named cursor {life.cursors[conv]}")
        if not member:
            self.problems.append(f"{where}: applied seq {seq} where its account is not a member")
        run.append(seq)
        life.mids[(conv, seq)] = mid

    def sending(self, uid: int, device: str, cmid: str, conv: str) -> None:
        self.sent.setdefault((uid, device, cmid), conv)

    def acked(self, uid: int, device: str, cmid: str, conv: str, seq: int, mid: str) -> None:
        self.acks[(uid, device, cmid)].add((conv, seq, mid))

    def failed(self, uid: int, device: str, cmid: str, code: str) -> None:
        self.failures[(uid, device, cmid)] = code

    def check(self, logs: Mapping[str, list[Entry]], *, final: bool) -> dict[str, int]:
        """Judge everything recorded against ``logs`` (conv -> its whole log, seq 1 first). ``final``: the
        run is over and every send must have its answer. Raises AssertionError listing the problems."""
        problems = list(self.problems)
        by_key: dict[tuple[int, str, str], list[tuple[str, Entry]]] = defaultdict(list)
        for conv, entries in logs.items():
            for e in entries:
                by_key[(e.sender, e.device, e.cmid)].append((conv, e))
        applied = 0
        for (uid, device), lives in self.lives.items():
            for n, life in enumerate(lives, 1):
                for (conv, seq), mid in life.mids.items():
                    applied += 1
                    log = logs.get(conv, [])
                    if not 1 <= seq <= len(log) or log[seq - 1].mid != mid:
                        got = log[seq - 1] if 1 <= seq <= len(log) else None
                        problems.append(f"{uid}/{device} life {n} applied {conv} seq {seq} mid {mid}; log: {got}")
        for key, acks in self.acks.items():
            stored = by_key.get(key, [])
            if len(acks) != 1:
                problems.append(f"send {key} acked differently: {sorted(acks)}")
            if len(stored) != 1:
                problems.append(f"send {key} acked but stored {len(stored)} times")
            elif (stored[0][0], stored[0][1].seq, stored[0][1].mid) not in acks:
                problems.append(f"send {key} acked as {sorted(acks)}, stored as {stored[0]}")
            if key in self.failures:
                problems.append(f"send {key} both acked and refused ({self.failures[key]})")
        for key, code in self.failures.items():
            if by_key.get(key) and self.sent.get(key) == by_key[key][0][0]:
                problems.append(f"send {key} refused ({code}) but stored in its conversation")
        for key, places in by_key.items():
            if len(places) > 1:
                problems.append(f"{key} stored {len(places)} times")
        if final:
            for key in self.sent:
                if key not in self.acks and key not in self.failures:
                    problems.append(f"send {key} never answered")
        assert not problems, "model check failed:\n" + "\n".join(problems[:40])
        return {"sends": len(self.sent), "acked": len(self.acks), "refused": len(self.failures), "applied": applied}
