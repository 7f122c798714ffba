"""Routing committed messages to the gateway nodes that hold their recipients.

Implementations: :mod:`.memory` (one process); the gRPC-linked routers of :mod:`im.transfer`
(``GrpcRouter`` on a transfer node, ``LinkRouter`` on a gateway)."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Collection, Iterable, Sequence

from im.backends.lifecycle import Service
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation


class DeliverySink(abc.ABC):
    """What a gateway node exposes to the router: messages and events for its local sessions."""

    @abc.abstractmethod
    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        """``messages[i]`` goes to every local device of the users ``recipients[i]``."""

    @abc.abstractmethod
    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        """An ephemeral frame (typing, receipt) to the users' local devices, except ``skip`` (uid, device)."""

    def close_replaced(self, connections: Sequence[DeviceLocation]) -> None:  # noqa: B027 - a default, not abstract
        """Close these connections (``bye replaced``) if this node still holds exactly them (``conn``): a
        newer connection of their device took over elsewhere. A sink that holds no connections ignores it."""

    def catch_up(self) -> None:  # noqa: B027 - a default, not abstract
        """Deliveries to this node may have been dropped on the way (routers are at most once): a path that
        carries them came up (again, or for the first time) after a core routed here while it was down,
        or a core dropped some for this node because too many were waiting. A sink that holds sessions has
        them check the log for what they missed; one that holds none ignores it."""

    def held_users(self) -> Collection[int] | None:
        """The users with a connection on this node, for the table of them that transfer nodes route
        by (a link's hello: ``TransferLink``); None: this sink reports none, and transfer nodes find
        its users in Presence. A sink that reports them announces each change through its router
        (:meth:`Router.announce`) once this answer includes it."""
        return None


def holders_in(tables: Iterable[tuple[str, Collection[int]]], uids: Collection[int]) -> dict[int, set[str]]:
    """``Router.holders`` from (node, users it holds) pairs: each of ``uids`` held somewhere, with its
    nodes."""
    found: dict[int, set[str]] = {}
    for node, held in tables:
        for uid in uids:
            if uid in held:
                nodes = found.get(uid)
                if nodes is None:
                    found[uid] = {node}
                else:
                    nodes.add(node)
    return found


class Router(Service, abc.ABC):
    """Carries committed messages to the gateway nodes that hold recipients.

    Guarantee: per (sending core, gateway node), batches arrive in the order published; at most once
    (a lost batch is recovered by the recipient session from the log, never by the router)."""

    @abc.abstractmethod
    def attach(self, node: str, sink: DeliverySink) -> None:
        """Register a local gateway node."""

    @abc.abstractmethod
    def detach(self, node: str) -> None: ...

    def announce(self, uid: int, held: bool) -> list[asyncio.Future[None]]:
        """This process's gateway node now holds ``uid`` (its first connection opened) or no longer
        does (its last closed), for the committers that route by the gateways' own tables (transfer
        nodes: :meth:`holders`). For ``held``: a future per such committer, done once it routes by the
        change (or once its link broke: the next link's hello carries it, and its sessions catch up);
        a waiter that gives up cancels it, and that committer's link then has every session catch up
        once the change is in. Default: none (committers find users in Presence)."""
        return []

    def holders(self, uids: Collection[int]) -> dict[int, set[str]] | None:
        """The gateway nodes holding each of ``uids`` (users held by none left out), from the tables the
        linked gateway nodes keep here; None when this router has no complete table (a linked node does
        not report one): the committer then looks the users up in Presence. Default: None."""
        return None

    @abc.abstractmethod
    def publish(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        """Send one batch to ``node``; never blocks, never raises for an unreachable node."""

    @abc.abstractmethod
    def publish_event(self, node: str, frame: object, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        """Send an ephemeral event to ``node``."""

    @abc.abstractmethod
    def publish_replaced(self, node: str, connections: Sequence[DeviceLocation]) -> None:
        """Ask ``node`` to close these connections of its own (:meth:`DeliverySink.close_replaced`); at most
        once, like the rest (a refresh of presence catches what is lost), never blocks."""
