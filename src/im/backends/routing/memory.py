"""In-process router (direct calls to the attached sinks): what ``im serve`` runs on one node.

Same guarantees as the gRPC-linked routers, within one process: switch to it when gateways run in more
than one process."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from im.backends.routing import DeliverySink, Router, holders_in
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation


class MemoryRouter(Router):
    """Calls the local sinks directly: in order, and never blocking the publisher for long. A node with
    no local sink goes to :meth:`elsewhere` / :meth:`event_elsewhere` (dropped here; a subclass may
    carry it to another process)."""

    def __init__(self) -> None:
        self._sinks: dict[str, DeliverySink] = {}

    def attach(self, node: str, sink: DeliverySink) -> None:
        self._sinks[node] = sink

    def detach(self, node: str) -> None:
        self._sinks.pop(node, None)

    def holders(self, uids: Collection[int]) -> dict[int, set[str]] | None:
        """The local sinks are every node this router reaches: the users each of them holds, read in
        this process (a user a sink took in before this call is routed to it). None when a sink does
        not report its users (presence then has them)."""
        tables = [(node, sink.held_users()) for node, sink in self._sinks.items()]
        if any(held is None for _, held in tables):
            return None
        return holders_in(tables, uids)  # type: ignore[arg-type]  # no None left

    def publish(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        sink = self._sinks.get(node)
        if sink is not None:
            sink.deliver(messages, recipients)
        else:
            self.elsewhere(node, messages, recipients)

    def publish_event(self, node: str, frame: object, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        sink = self._sinks.get(node)
        if sink is not None:
            sink.deliver_event(frame, uids, skip)
        else:
            self.event_elsewhere(node, frame, uids, skip)

    def publish_replaced(self, node: str, connections: Sequence[DeviceLocation]) -> None:
        sink = self._sinks.get(node)
        if sink is not None:
            sink.close_replaced(connections)
        else:
            self.replaced_elsewhere(node, connections)

    def elsewhere(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        """Messages for a node with no sink in this process (at most once: nothing is kept)."""

    def event_elsewhere(self, node: str, frame: object, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        """An event for a node with no sink in this process."""

    def replaced_elsewhere(self, node: str, connections: Sequence[DeviceLocation]) -> None:
        """Connections to close on a node with no sink in this process."""
