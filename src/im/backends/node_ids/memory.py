"""In-process node id claims: what ``im serve`` runs (one process, one fixed id).

Same guarantees as the etcd sibling among the claims that share one :class:`NodeIdTable` (one process).
Several processes minting ids need the etcd claims: a table here knows nothing of other processes.
"""

from __future__ import annotations

import logging

from im.backends.node_ids import MAX_NODE_IDS, Minter, NodeIdClaims, NodeIdUnavailable

log = logging.getLogger(__name__)


class NodeIdTable:
    """The node ids of one process: who holds which, and how far each was used (given back or taken)."""

    def __init__(self, size: int = MAX_NODE_IDS) -> None:
        self.size = size
        self.holders: dict[int, MemoryNodeIds] = {}
        #: node id -> (last owner, last millisecond used)
        self.marks: dict[int, tuple[str, int]] = {}

    def take_away(self, node_id: int) -> None:
        """End the claim on ``node_id`` under its holder (what an operator deleting an etcd key does): the
        holder stops minting at once and claims again."""
        holder = self.holders.get(node_id)
        if holder is not None:
            holder._lost()


class MemoryNodeIds(NodeIdClaims):
    """A claim on ``table`` (a private one when None). ``prefer``: the id to take when free (``im
    serve``'s ``registry.fixed_node_id``); otherwise this owner's previous id, else the lowest free."""

    def __init__(
        self, owner: str, minter: Minter, *, table: NodeIdTable | None = None, prefer: int | None = None
    ) -> None:
        self.owner = owner
        self.minter = minter
        self.table = NodeIdTable() if table is None else table
        self.prefer = prefer
        self._held: int | None = None

    @property
    def node_id(self) -> int | None:
        return self._held

    async def _acquire(self) -> None:
        self._claim()

    def _claim(self) -> None:
        t = self.table
        free = [n for n in range(t.size) if n not in t.holders]
        if not free:
            raise NodeIdUnavailable(f"all {t.size} node ids are held in this process")
        mine = [n for n in free if t.marks.get(n, ("", 0))[0] == self.owner]
        n = self.prefer if self.prefer in free else (mine or free)[0]
        assert n is not None
        t.holders[n] = self
        self._held = n
        # No fencing token (0): one process shares this table, its store has no other writer to fence off.
        self.minter.assign(n, after_ms=t.marks.get(n, ("", 0))[1])

    def _give_back(self) -> None:
        n, self._held = self._held, None
        if n is None:
            return
        self.minter.revoke()
        self.table.holders.pop(n, None)
        self.table.marks[n] = (self.owner, self.minter.last_ms)

    def _lost(self) -> None:
        lost = self._held
        self._give_back()
        log.warning("node id %s of %s was taken away: claiming one again", lost, self.owner)
        self._claim()

    async def _release(self) -> None:
        self._give_back()
