"""Server message ids (``mid``): 64-bit, time-ordered, unique across the cluster.

An id is 41 bits of milliseconds since 2026, 10 bits of node id, 12 bits of counter. Within one
:class:`Snowflake` (one process) ids strictly increase, also across a change of node id. Across processes
they are unique because no two processes mint under the same node id over the same span of milliseconds:

- with etcd (the distributed roles) every process that mints ids (transfer and API nodes) claims one of the
  1,024 node ids through :class:`im.backends.node_ids.NodeIdClaims`, never derived from its name;
- a claim hands over ``after_ms`` (the last millisecond the previous holder of that id used or reserved:
  the ids minted here start above it, even when this machine's clock reads earlier) and ``until_ms`` (how
  far this holder has reserved the id: nothing is minted beyond it until the reservation is extended);
- a lost claim (:meth:`Snowflake.revoke`) stops minting at once: :meth:`can_mint` is False and the
  committer refuses sends with the retryable ``unavailable`` until a new claim arrives;
- ``im serve`` with the in-memory registry holds one fixed node id (``registry.fixed_node_id``).

What remains: the 12-bit counter allows 4,096 ids per millisecond; beyond that the next millisecond is
borrowed (ids keep increasing but run ahead of the clock). Ids are ordered by time only roughly across
nodes (clocks differ); within a conversation the order is ``seq``, never ``mid``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from im.model.ids import MAX_NODE_IDS
from im.mypyc_options import mypyc_attr

_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' recording minter subclasses it
class Snowflake:
    """41 bits of milliseconds since 2026, 10 bits of node, 12 bits of counter (4,096 ids per millisecond;
    past that the next millisecond is borrowed, so ids keep increasing).

    ``node``: a fixed node id, or None for one that a claim assigns later (:meth:`assign`). Milliseconds
    here are Unix milliseconds (``time.time() * 1000``)."""

    def __init__(self, node: int | None = 0) -> None:
        self._node: int | None = None
        self._last_ms = 0
        self._counter = 0
        self._until_ms: int | None = None
        self._token = 0
        #: Called when a store refused this holder's token (:meth:`refused`): set by the claim that drives
        #: this minter, which then treats its claim as lost and claims again.
        self.on_refused: Callable[[], None] | None = None
        if node is not None:
            self.assign(node)

    @property
    def node(self) -> int | None:
        """The node id minted under now; None: none held (no id can be minted)."""
        return self._node

    @property
    def last_ms(self) -> int:
        """The millisecond of the last id minted (0: none yet): what a release records."""
        return self._last_ms

    def assign(self, node: int, *, after_ms: int = 0, until_ms: int | None = None, token: int = 0) -> None:
        """Mint under ``node`` from now on, in milliseconds after ``after_ms`` (0: none) and up to
        ``until_ms`` (None: no bound). ``token``: the claim's fencing token (larger for every later claim
        of any node id; 0: none, commits are not fenced).
        Ids still increase across the change: the next one is in a later millisecond than any before."""
        if not 0 <= node < MAX_NODE_IDS:
            raise ValueError(f"a node id is 0..{MAX_NODE_IDS - 1}: {node}")
        before = max(after_ms, self._last_ms)  # the last millisecond that may already carry ids
        if before:
            self._last_ms, self._counter = before + 1, -1  # the next id: in before + 1 (or later), counter 0
        self._node, self._until_ms, self._token = node, until_ms, token

    @property
    def fence(self) -> tuple[int, int] | None:
        """(node id, fencing token) of the claim minted under now, for the store to check; None when no
        node id is held or the claim has no token."""
        if self._node is None or not self._token:
            return None
        return self._node, self._token

    def refused(self, token: int) -> None:
        """A store refused a commit fenced by ``token``: another process holds this node id now. Stops
        minting (if ``token`` is still this holder's) and tells the claim (:attr:`on_refused`)."""
        if self._node is None or token != self._token:
            return
        self._node = None
        if self.on_refused is not None:
            self.on_refused()

    def extend(self, until_ms: int | None) -> None:
        """The reservation of the node id held now reaches ``until_ms``."""
        self._until_ms = until_ms

    def revoke(self) -> None:
        """The claim is lost: mint nothing until :meth:`assign`."""
        self._node = None

    def can_mint(self, now_ms: int, count: int = 1) -> bool:
        """True if ``count`` ids can be minted at ``now_ms``: a node id is held and its reservation
        covers them (borrowed milliseconds included)."""
        if self._node is None:
            return False
        if self._until_ms is None:
            return True
        return max(now_ms, self._last_ms) + 1 + count // 4096 <= self._until_ms

    def next(self, now_ms: int | None = None) -> int:
        """The next id. Call :meth:`can_mint` first: without a node id this raises RuntimeError."""
        node = self._node
        if node is None:
            raise RuntimeError("no node id is held: no message id can be minted")
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        if ms <= self._last_ms:
            ms = self._last_ms
            self._counter += 1
            if self._counter > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                ms += 1
                self._counter = 0
        else:
            self._counter = 0
        self._last_ms = ms
        return ((ms - _EPOCH_MS) << 22) | (node << 12) | self._counter
