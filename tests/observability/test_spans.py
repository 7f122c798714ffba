"""MessageSpan: the message path's light spans carry what the exporter reads, and end once."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind, StatusCode

from im.observability import spans
from im.observability.spans import MessageSpan


class Recorder:
    def __init__(self) -> None:
        self.ended: list[Any] = []

    def on_end(self, span: Any) -> None:
        self.ended.append(span)


@pytest.fixture
def recorder() -> Any:
    r = Recorder()
    spans.install(Resource({"service.name": "im-test"}), r)
    yield r
    spans.install(None, None)


def test_a_child_shares_the_trace_and_names_its_parent(recorder: Recorder) -> None:
    root = MessageSpan("im.send", None, SpanKind.SERVER, {"im.transport": "Ws"})
    child = MessageSpan("im.commit", root.get_span_context(), attributes={"im.seq": 3}, start_time=123)
    assert root.parent is None and root.context.trace_flags.sampled and root.context.is_valid
    assert child.context.trace_id == root.context.trace_id and child.context.span_id != root.context.span_id
    assert child.parent == root.get_span_context() and child.start_time == 123
    child.end()
    child.end()  # a second end exports nothing more
    assert recorder.ended == [child] and child.end_time is not None and not child.is_recording()
    assert root.is_recording() and root.resource.attributes["service.name"] == "im-test"


def test_status_events_and_use_as_current_span(recorder: Recorder) -> None:
    span = MessageSpan("im.commit.batch", None)
    with pytest.raises(ValueError), trace.use_span(span, end_on_exit=True):
        assert trace.get_current_span() is span
        raise ValueError("boom")
    assert recorder.ended == [span]
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert span.events[0].attributes["exception.type"] == "ValueError"


def test_without_a_processor_a_span_ends_quietly() -> None:
    spans.install(None, None)
    span = MessageSpan("im.deliver", None)
    span.end()
    assert span.end_time is not None
