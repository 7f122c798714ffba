"""Live routing of committed messages to the gateway nodes holding their recipients, and the messages
whose routing failed (presence unreachable), kept to be routed again.

A message is durable before it is routed (and acked before, or, in a small batch on a transfer node,
with its routing: ``Committer.answer_wait``); routing only makes it arrive live. When the presence
lookup fails (Redis away or cut off), the committer used to drop the route: members then got the message
only with the conversation's next message (the gap makes their session fetch it) or at their next
reconnect, which for the last message of a conversation could be much later. :class:`Unrouted` keeps
those messages, bounded, so the committer routes them again: first thing on its next route (older ones
first, so they arrive ahead of newer ones) and, when no new commit comes, after a back-off.

Routing twice is harmless: sessions drop a seq they already hold (docs/protocol.md section 8).
:class:`Unrouted` does no I/O; :class:`LiveRoutes` does the lookups and publishes.
"""

from __future__ import annotations

import logging

from im.backends.presence import Presence
from im.backends.routing import Router
from im.model.chat import StoredMessage
from im.observability.metrics import METRICS
from im.throttled_log import ThrottledLog

log = logging.getLogger("im.core.committer")  # its lines belong to the committer's


class Unrouted:
    """Bounded: past ``max_messages`` the oldest are dropped (counted in :attr:`dropped`); their members
    still get them from the log, as before this queue existed."""

    def __init__(self, *, max_messages: int = 10_000, first_delay: float = 0.25, max_delay: float = 5.0) -> None:
        self.max_messages = max_messages
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.dropped = 0
        self._messages: list[StoredMessage] = []
        self._recipients: list[list[int]] = []
        self._delay = first_delay

    def __bool__(self) -> bool:
        return bool(self._messages)

    def __len__(self) -> int:
        return len(self._messages)

    def take(self) -> tuple[list[StoredMessage], list[list[int]]]:
        """Everything held, oldest first; the queue is empty afterwards."""
        out = self._messages, self._recipients
        self._messages, self._recipients = [], []
        return out

    def put(self, messages: list[StoredMessage], recipients: list[list[int]]) -> None:
        """Hold messages whose routing failed (after what is held), dropping the oldest past the bound,
        and wait longer before the next timed attempt."""
        self._messages.extend(messages)
        self._recipients.extend(recipients)
        excess = len(self._messages) - self.max_messages
        if excess > 0:
            del self._messages[:excess]
            del self._recipients[:excess]
            self.dropped += excess
        self._delay = min(self.max_delay, self._delay * 2) if self._messages else self.first_delay

    def routed(self) -> None:
        """A route went through: the next failure starts the back-off afresh."""
        self._delay = self.first_delay

    def delay(self) -> float:
        """How long to wait for a new commit before routing what is held on its own."""
        return self._delay


class LiveRoutes:
    """The committer's routing: the gateway nodes of all recipients of a batch from the router's table
    (``router.holders``: transfer nodes, whose linked gateways report their users) or else one
    ``presence.locate``, then one ``router.publish`` per gateway node, with the messages whose routing
    failed held (:class:`Unrouted`) and routed first the next time."""

    def __init__(self, presence: Presence, router: Router) -> None:
        self._presence = presence
        self._router = router
        self.held = Unrouted()
        #: Presence unreachable: one counted line per window; the messages are held and routed again.
        self._log = ThrottledLog(log, "live routes (presence unreachable; held, routed again)")

    async def route(self, messages: list[StoredMessage], recipients: list[list[int]]) -> None:
        """Hand committed messages to the gateway nodes holding any recipient, one batch per node
        (raises when presence cannot be read)."""
        if not messages:
            return
        uids = {u for rs in recipients for u in rs}
        nodes_of = self._router.holders(uids)
        if nodes_of is None:  # the router has no table of the gateways' users: Presence knows them
            located = await self._presence.locate(uids)
            nodes_of = {uid: {loc.node for loc in locs} for uid, locs in located.items()}
        if not nodes_of:
            return
        nodes = set().union(*nodes_of.values())
        if len(nodes) == 1 and len(nodes_of) == len(uids):
            # Every recipient is on the one node (im serve, or a single gateway): the batch goes as it is.
            self._router.publish(next(iter(nodes)), messages, recipients)
            return
        per_node: dict[str, tuple[list[StoredMessage], list[list[int]]]] = {}
        for m, rs in zip(messages, recipients, strict=True):
            targets: dict[str, list[int]] = {}
            for uid in rs:
                for node in nodes_of.get(uid, ()):
                    targets.setdefault(node, []).append(uid)
            for node, node_uids in targets.items():
                msgs, recs = per_node.setdefault(node, ([], []))
                msgs.append(m)
                recs.append(node_uids)
        for node, (msgs, recs) in per_node.items():
            self._router.publish(node, msgs, recs)

    async def route_or_hold(self, messages: list[StoredMessage], recipients: list[list[int]]) -> None:
        """Route what is held, then these (acked and stored already: routing is what makes them arrive
        live); a failure holds them all for another try. Never raises."""
        if self.held:
            held, held_to = self.held.take()
            messages, recipients = held + messages, held_to + recipients
        try:
            await self.route(messages, recipients)
            self.held.routed()
        except Exception as exc:
            self.held.put(messages, recipients)
            METRICS.engine_error(exc)
            self._log.hit(f"{len(self.held)} messages held: {type(exc).__name__}: {exc}")
