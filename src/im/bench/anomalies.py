"""The bench's delivery checker: lost, duplicated and out-of-order messages, counted rather than asserted.

It follows the rules of docs/protocol.md section 8 (and checks C4/C5 of ``tests/support/checker.py``) on
the live stream, without reading the stored log back:

- per receiving device and conversation, the seqs of ``msg`` frames and of non-``dup`` ``ack`` frames must
  arrive as start+1, start+2, ... A seq that skips ahead opens a *gap*; a seq that fills a gap later is
  *out of order*; a seq seen before is a *duplicate*;
- at the end, every acked send must have been received by every other member device that was online:
  gaps never filled, and acked seqs a recipient never reached, are *lost*.

>>> c = AnomalyCounter()
>>> c.member("d:1:2", "a"); c.member("d:1:2", "b")
>>> c.seq("a", "d:1:2", 1); c.acked("d:1:2", 1, "a")
True
>>> c.seq("b", "d:1:2", 1), c.seq("b", "d:1:2", 1)     # the second one is a duplicate
(True, False)
>>> c.finish().as_dict()["duplicated"]
1
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field

__all__ = ["Anomalies", "AnomalyCounter"]


@dataclass
class Anomalies:
    """What :meth:`AnomalyCounter.finish` found. All must be zero for a correct run."""

    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    #: A few human-readable examples of each problem, for the report.
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.lost + self.duplicated + self.out_of_order

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d.pop("examples")
        return d

    def add(self, other: Anomalies) -> None:
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.out_of_order += other.out_of_order
        self.examples.extend(other.examples[: max(0, 20 - len(self.examples))])


class _Stream:
    __slots__ = ("last", "missing")

    def __init__(self, start: int) -> None:
        self.last = start
        self.missing: set[int] = set()


class AnomalyCounter:
    """Feed it every seq each device receives, every acked send and the members; then :meth:`finish`.

    ``device`` keys are any hashable naming one connected device (the bench uses small integers).
    Streams start at seq 0 (a fresh conversation, or one the device starts from the beginning) unless
    :meth:`start` says otherwise.
    """

    MAX_EXAMPLES = 20

    def __init__(self) -> None:
        self._streams: dict[tuple[Hashable, str], _Stream] = {}
        self._members: dict[str, list[Hashable]] = defaultdict(list)
        self._acked: dict[str, list[tuple[int, Hashable]]] = defaultdict(list)
        self.duplicated = 0
        self.out_of_order = 0
        self.examples: list[str] = []

    def _example(self, text: str) -> None:
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(text)

    def member(self, conv: str, device: Hashable) -> None:
        """``device`` is online and a member of ``conv``: it must receive every acked send of the others."""
        self._members[conv].append(device)

    def start(self, device: Hashable, conv: str, seq: int) -> None:
        """``device`` starts ``conv`` after ``seq`` (its resume point) rather than after 0."""
        self._streams[(device, conv)] = _Stream(seq)

    def seq(self, device: Hashable, conv: str, seq: int) -> bool:
        """``device`` received ``seq`` of ``conv`` (a ``msg``, or an ``ack`` with ``dup`` false).

        Returns False for a duplicate (the caller should not count the message again), else True.
        """
        key = (device, conv)
        s = self._streams.get(key)
        if s is None:
            s = self._streams[key] = _Stream(0)
        last = s.last
        if seq == last + 1:
            s.last = seq
        elif seq > last:
            s.missing.update(range(last + 1, seq))
            s.last = seq
            self._example(f"gap: device {device} got {conv} seq {seq} after {last}")
        elif seq in s.missing:
            s.missing.discard(seq)
            self.out_of_order += 1
            self._example(f"out of order: device {device} got {conv} seq {seq} after {last}")
        else:
            self.duplicated += 1
            self._example(f"duplicate: device {device} got {conv} seq {seq} again (holding {last})")
            return False
        return True

    def acked(self, conv: str, seq: int, sender: Hashable) -> None:
        """``sender``'s send was acked as ``seq`` of ``conv``: every other member must receive it."""
        self._acked[conv].append((seq, sender))

    def received(self, device: Hashable, conv: str, seq: int) -> bool:
        s = self._streams.get((device, conv))
        return s is not None and seq <= s.last and seq not in s.missing

    def finish(self) -> Anomalies:
        """Count what is lost now: gaps never filled, and acked sends some member device never received."""
        out = Anomalies(duplicated=self.duplicated, out_of_order=self.out_of_order, examples=list(self.examples))
        lost = 0
        for (device, conv), s in self._streams.items():
            if s.missing:
                lost += len(s.missing)
                if len(out.examples) < self.MAX_EXAMPLES:
                    out.examples.append(f"lost: device {device} never got {conv} seqs {sorted(s.missing)[:10]}")
        for conv, acks in self._acked.items():
            for device in self._members.get(conv, ()):
                stream = self._streams.get((device, conv))
                last = stream.last if stream is not None else 0
                missed = [seq for seq, sender in acks if sender != device and seq > last]
                if missed:
                    lost += len(missed)
                    if len(out.examples) < self.MAX_EXAMPLES:
                        out.examples.append(
                            f"lost: device {device} never got acked {conv} seqs {missed[:10]} (holding {last})"
                        )
        out.lost = lost
        return out
