"""Node id claims: which of the 1,024 node ids of message ids (im.core.ids) this process mints under.

Implementations: :mod:`.memory` (one process: ``im serve``, a fixed id), :mod:`.etcd` (leased claims
shared by the cluster, on the registry's etcd connection).

A claim drives a :class:`Minter` (the committer's ``Snowflake``): ``assign`` when an id is held,
``extend`` when its reservation moves on, ``revoke`` when it is lost. Nothing else decides node ids.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol

from im.backends.lifecycle import Service
from im.model.ids import MAX_NODE_IDS

__all__ = ["MAX_NODE_IDS", "Minter", "NodeIdClaims", "NodeIdUnavailable"]


class NodeIdUnavailable(Exception):
    """No node id could be claimed (all taken, or the claims' engine unreachable); the message is one
    line that says why and what to do."""


class Minter(Protocol):
    """What a claim drives: im.core.ids.Snowflake."""

    #: Called when a store refuses a commit under this claim's token (someone else holds the id now):
    #: the claim sets it, and on the call treats its claim as lost and claims again.
    on_refused: Callable[[], None] | None

    def assign(self, node: int, *, after_ms: int = 0, until_ms: int | None = None, token: int = 0) -> None:
        """Mint under ``node``, in milliseconds after ``after_ms`` and up to ``until_ms`` (None: no bound);
        ``token`` is the claim's fencing token: every later claim (of any id) has a larger one."""

    def extend(self, until_ms: int | None) -> None:
        """The reservation reaches ``until_ms`` now."""

    def revoke(self) -> None:
        """Mint nothing until the next ``assign``."""

    @property
    def last_ms(self) -> int:
        """The millisecond of the last id minted (recorded when the id is given back)."""
        ...


class NodeIdClaims(Service, abc.ABC):
    """One node id for this process (``owner`` names it: its node name), held from :meth:`start` to
    :meth:`close`, driving ``minter``.

    Guarantees, for every implementation:

    - :meth:`start` returns once an id is held and ``minter.assign`` was called; it raises
      :class:`NodeIdUnavailable` when none can be claimed (every id held by someone, or the engine not
      answering), and then nothing is held.
    - Two holders never mint the same id: while one holds an id no one else is assigned it, and whoever
      is assigned an id next gets ``after_ms`` at or above every millisecond the previous holder minted
      in or reserved (a holder mints only up to its ``until_ms``, which it extends while it holds the id).
      So a holder whose clock reads earlier than its predecessor's still mints new ids.
    - A claim lost (taken away, its lease expired, the engine unreachable past the reservation) stops
      minting: ``minter.revoke`` is called when the loss is found, and the reservation (``until_ms``)
      bounds minting before that. The implementation claims again in the background (any free id, its
      old one first) and calls ``minter.assign`` once it holds one.
    - Claims shared by several processes hand the minter a fencing token larger than that of any earlier
      claim of the same id (etcd: the claim key's create revision); the committer records it in the chat
      store before minting under it and every commit carries it, so the store refuses the commits of a
      holder that lost its id (paused past its lease, say) whatever that holder believes. A refusal
      (``minter.on_refused``) is a loss: the claim is made again. In-process claims (one process, one
      writer) give no token: nothing to fence off.
    - A new claim takes this owner's previous id when it is free, else the lowest free one.
    - :meth:`close` revokes the minter, records how far the id was used and gives it back: free at
      once for the next claimant.
    """

    @property
    @abc.abstractmethod
    def node_id(self) -> int | None:
        """The id held now; None: none (before start, after a loss until the next claim, after close)."""
