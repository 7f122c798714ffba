"""The message path's spans: OpenTelemetry API spans that skip the SDK's per-span machinery.

A sampled chat message makes three to four spans in a process (``im.send``, ``im.commit.batch``,
``im.commit``, ``im.deliver``). The SDK's ``Tracer.start_span`` spends 30-50 µs on each on this machine: a
sampler call, attribute validation into a locked bounded dict, the processors' start hooks, context
objects. None of it is needed here: the decision to trace was made once per message (every span of the
path is sampled), the attributes are im's own (str, int, bool, few), and the only processor is the batch
exporter. :class:`MessageSpan` records the same fields as the SDK's ``ReadableSpan`` (what the exporter
and the Zipkin encoder read) and hands itself to that processor when it ends, so the spans go out in the
same batches, to the same collector, as the instrumentations' spans; one costs a few µs.

It is still an OpenTelemetry ``Span``: ``trace.use_span`` makes it current, and the instrumentations'
spans (SQL, Redis) made while it is current are its children.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util import types

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NO_STATE = TraceState()
_SCOPE = InstrumentationScope("im")
_UNSET = Status(StatusCode.UNSET)
_bits = random.getrandbits
_now = time.time_ns


class MessageSpan(trace.Span):
    """One span of the message path; duck-types the SDK's ``ReadableSpan`` for the exporter."""

    __slots__ = (
        "attributes",
        "context",
        "end_time",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start_time",
        "status",
    )

    #: Set by :func:`install`: the process's resource, and what receives ended spans (the span processor).
    resource: Any = None
    processor: Any = None
    instrumentation_scope = _SCOPE
    dropped_attributes = dropped_events = dropped_links = 0

    def __init__(
        self,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, Any] | None = None,
        links: Sequence[Link] = (),
        start_time: int | None = None,
    ) -> None:
        if parent is not None and parent.is_valid:
            trace_id, state = parent.trace_id, parent.trace_state
        else:
            trace_id, state, parent = _bits(128) or 1, _NO_STATE, None
        self.context = SpanContext(trace_id, _bits(64) or 1, False, _SAMPLED, state)
        self.name = name
        self.parent = parent
        self.kind = kind
        self.attributes = attributes if attributes is not None else {}
        self.links = tuple(links)
        self.events: tuple[Any, ...] = ()
        self.start_time = start_time if start_time is not None else _now()
        self.end_time: int | None = None
        self.status = _UNSET

    # --- trace.Span ---

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        self.attributes.update(attributes)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        from opentelemetry.sdk.trace import Event

        self.events = (*self.events, Event(name, attributes, timestamp or _now()))

    def update_name(self, name: str) -> None:
        self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        self.status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        details = {"exception.type": type(exception).__name__, "exception.message": str(exception)}
        self.add_event("exception", {**details, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time if end_time is not None else _now()
        processor = self.processor
        if processor is not None:
            processor.on_end(self)


def install(resource: Any, processor: Any) -> None:
    """Export the message spans through ``processor`` (None: drop them, after a shutdown)."""
    MessageSpan.resource = resource
    MessageSpan.processor = processor
