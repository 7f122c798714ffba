"""OpenTelemetry tracing exported to Zipkin (docs/operations.md, "Tracing").

Off by default and free: while :data:`ON` is False no tracer provider exists and every hot-path site
tests ``tracing.ON`` (a module attribute) before anything else, so a message costs one attribute check.

On: a resource naming the service (``im-gateway``, ``im-transfer``, ``im-api``, ``im``) and the node,
one :class:`BatchSpanProcessor` feeding the Zipkin v2 JSON exporter, and ``ParentBased`` sampling. Chat
messages are sampled at the gateway with one ``random()`` per message (:func:`sampled`; an unsampled
message makes no span at all, anywhere); a commit batch has a span only when it carries a sampled
message. Everything else that starts a trace (HTTP requests, SQL or Redis outside a span) is sampled by
trace-id ratio. A trace started elsewhere keeps its caller's decision. Errors are not kept beyond the
ratio: the SDK decides at a span's start, and keeping every failing span would mean recording every
span.

Context crosses processes as W3C ``traceparent`` (and B3 single ``b3`` in HTTP and AMQP headers): in the
transfer link's ``Send``/``Delivery`` fields, in the outbox row, in RabbitMQ message headers and in the
webhook POST. Within one process, routing hands the commit span of a message to the delivery through
:data:`ROUTING` (mid -> span context), filled only while a batch with sampled messages is routed.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from im.config import TracingConfig
from im.observability import spans
from im.observability.spans import MessageSpan
from im.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

#: The hot-path guard: True only while a provider is installed (:func:`setup` .. :func:`shutdown`).
ON = False
#: mid -> the span context deliveries of that message continue (filled by the committer around its
#: routing of a batch with sampled messages; read by the transfer link's outbox and the hub).
ROUTING: dict[int, SpanContext] = {}
#: How many trace ids a commit batch span names in its ``im.linked_traces`` tag (Zipkin has no links).
MAX_LINK_TAGS = 64

_ratio = 0.0
_random = random.random
_provider: Any = None  # the instrumentations' (sampled by trace-id ratio)
_root_sampler: Any = None  # that provider's TraceIdRatioBased (its ratio changes live)
_message_provider: Any = None  # the message path's (its roots sampled by :func:`sampled`)
_tracer: trace.Tracer = trace.NoOpTracer()
_instrumented: list[Any] = []
_lock = threading.Lock()
#: True while the committer commits a batch that has a span (:func:`commit_batch`).
_in_batch: contextvars.ContextVar[bool] = contextvars.ContextVar("im_tracing_in_batch", default=False)


# --- sampling ------------------------------------------------------------------------------------------


def sampled() -> bool:
    """Whether to trace a new chat message (one ``random()``; call only when :data:`ON`)."""
    return _random() < _ratio


def set_sample_ratio(ratio: float) -> None:
    """A new ``tracing.sample_ratio`` while running (im.live_config): new chat messages and new traces of
    the instrumentations are sampled at it; traces already started keep their decision."""
    global _ratio
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"a sample ratio is between 0 and 1, not {ratio}")
    with _lock:
        _ratio = ratio
        root = _root_sampler
        if root is not None:  # TraceIdRatioBased keeps its rate and bound in these two fields
            root._rate, root._bound = ratio, root.get_bound_for_rate(ratio)


# --- propagation ---------------------------------------------------------------------------------------


class B3SingleFormat(TextMapPropagator):
    """Zipkin's single ``b3`` header: ``{trace_id}-{span_id}-{sampled}`` (the ``-{parent}`` part is
    ignored when read). opentelemetry-propagator-b3 is not in the lock file; this is its single format."""

    KEY = "b3"

    def extract(
        self, carrier: CarrierT, context: otel_context.Context | None = None, getter: Getter[CarrierT] = default_getter
    ) -> otel_context.Context:
        ctx = context if context is not None else otel_context.Context()
        values = getter.get(carrier, self.KEY)
        if not values:
            return ctx
        span_context = parse_b3(values[0])
        if span_context is None:
            return ctx
        return trace.set_span_in_context(NonRecordingSpan(span_context), ctx)

    def inject(
        self, carrier: CarrierT, context: otel_context.Context | None = None, setter: Setter[CarrierT] = default_setter
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            setter.set(carrier, self.KEY, format_b3(span_context))

    @property
    def fields(self) -> set[str]:
        return {self.KEY}


PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), B3SingleFormat()])


def format_traceparent(c: SpanContext) -> str:
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def parse_traceparent(value: str) -> SpanContext | None:
    """A remote span context from a W3C ``traceparent`` (version 00 layout); None if malformed."""
    parts = value.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or parts[0] == "ff":
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))


def format_b3(c: SpanContext) -> str:
    return f"{c.trace_id:032x}-{c.span_id:016x}-{1 if c.trace_flags.sampled else 0}"


def parse_b3(value: str) -> SpanContext | None:
    parts = value.strip().split("-")
    if len(parts) < 2 or len(parts[0]) not in (16, 32) or len(parts[1]) != 16:
        return None
    try:
        trace_id, span_id = int(parts[0], 16), int(parts[1], 16)
    except ValueError:
        return None
    sampled_flag = parts[2] if len(parts) > 2 else "1"
    if not trace_id or not span_id:
        return None
    flags = TraceFlags(TraceFlags.SAMPLED if sampled_flag in ("1", "d") else TraceFlags.DEFAULT)
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


def remote(traceparent: str) -> Span | None:
    """A carried context as a (non-recording) span to parent or link to; None if malformed."""
    c = parse_traceparent(traceparent)
    return None if c is None else NonRecordingSpan(c)


def inject_headers(span: Span, headers: MutableMapping[str, Any]) -> None:
    """Write ``traceparent`` and ``b3`` for ``span`` into ``headers`` (HTTP or AMQP)."""
    PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))


def extract_headers(headers: Mapping[str, Any] | None) -> otel_context.Context | None:
    """The context carried by ``traceparent`` or ``b3`` headers (None: neither)."""
    if not headers:
        return None
    carrier = {k.lower(): v.decode() if isinstance(v, bytes) else str(v) for k, v in headers.items()}
    if "traceparent" not in carrier and "b3" not in carrier:
        return None
    ctx = PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


# --- set up and shut down ------------------------------------------------------------------------------


def setup(cfg: TracingConfig, service: str, node: str, *, fastapi_app: Any = None) -> bool:
    """Install tracing for this process when ``cfg.enabled`` (else nothing, returns False).

    Two tracer providers share one resource and one span processor: the instrumentations' samples new
    traces by ``ParentBased(TraceIdRatioBased(sample_ratio))``; the message path's by
    ``ParentBased(ALWAYS_ON)``, because its roots are only started for a message :func:`sampled` chose
    (a sampler call per message would cost every message, not one in a hundred)."""
    global ON, _provider, _message_provider, _tracer, _ratio, _root_sampler
    if not cfg.enabled:
        return False
    from opentelemetry.exporter.zipkin.json import ZipkinExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    with _lock:
        if _provider is not None:
            raise RuntimeError("tracing is set up already in this process")
        # Not Resource.create: its telemetry.sdk.* attributes would be three more tags on every span.
        resource = Resource({"service.name": cfg.service_name or service, "service.instance.id": node})
        exporter = ZipkinExporter(endpoint=cfg.zipkin_url, timeout=max(1, int(cfg.export_timeout)))
        exporter.encoder = _strict_v2_encoder()
        processor = BatchSpanProcessor(
            _quiet(exporter),
            max_queue_size=cfg.queue_size,
            schedule_delay_millis=cfg.schedule_delay * 1000,
            max_export_batch_size=min(512, cfg.queue_size),
            export_timeout_millis=cfg.export_timeout * 1000,
        )
        _root_sampler = TraceIdRatioBased(cfg.sample_ratio)
        provider = TracerProvider(resource=resource, sampler=ParentBased(_root_sampler), shutdown_on_exit=False)
        provider.add_span_processor(processor)
        messages = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False)
        messages.add_span_processor(processor)
        _provider, _message_provider, _ratio = provider, messages, cfg.sample_ratio
        spans.install(resource, processor)  # the message path's own spans (im.observability.spans)
        _tracer = messages.get_tracer("im")
        propagate.set_global_textmap(PROPAGATOR)  # the instrumentations read and write traceparent and b3
        _instrument(provider, fastapi_app)
        ON = True
    log.info("tracing on: %s at ratio %s to %s", cfg.service_name or service, cfg.sample_ratio, cfg.zipkin_url)
    return True


def _quiet(inner: Any) -> Any:
    """The Zipkin exporter, with a collector that is down or refuses costing at most one counted log line
    per 10 s (im.throttled_log) instead of the SDK's traceback per export."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    failures = ThrottledLog(log, "span exports to Zipkin that failed (spans dropped)")
    # The exporter logs an error per refused POST itself: the counted line replaces it.
    logging.getLogger("opentelemetry.exporter.zipkin.json").setLevel(logging.CRITICAL)

    class QuietExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            try:
                result: SpanExportResult = inner.export(spans)
            except Exception as exc:
                failures.hit(f"{type(exc).__name__}: {str(exc)[:200]}")
                return SpanExportResult.FAILURE
            if result is SpanExportResult.FAILURE:
                failures.hit("the collector refused a POST")
            return result

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(inner.force_flush(timeout_millis))

    return QuietExporter()


def _strict_v2_encoder() -> Any:
    """A Zipkin v2 JSON encoder for the exporter, about three times faster than its own (the export
    thread shares the GIL with the event loop) and strict to the v2 schema:

    - an internal span has no ``kind`` (the exporter writes ``"kind": null``, which the schema's enum
      does not allow);
    - no ``debug``: the exporter marks every sampled span ``debug: true``, which would make Zipkin keep
      it whatever the collector's own sampling says;
    - tags: the span's attributes, the resource's (``service.name``, ``service.instance.id``),
      ``otel.scope.name`` (which instrumentation made it), ``otel.status_code`` and ``error``.
    """
    import msgspec
    from opentelemetry.exporter.zipkin.json.v2 import JsonV2Encoder
    from opentelemetry.trace import StatusCode

    _json_encode = msgspec.json.Encoder().encode
    kinds = {
        SpanKind.SERVER: "SERVER",
        SpanKind.CLIENT: "CLIENT",
        SpanKind.PRODUCER: "PRODUCER",
        SpanKind.CONSUMER: "CONSUMER",
    }

    class StrictJsonV2Encoder(JsonV2Encoder):
        def _encode_span(self, span: Any, encoded_local_endpoint: Any) -> dict[str, Any]:
            c = span.context
            start = span.start_time
            out: dict[str, Any] = {
                "traceId": f"{c.trace_id:032x}",
                "id": f"{c.span_id:016x}",
                "name": span.name,
                "timestamp": (start + 500) // 1000,
                "duration": (span.end_time - start + 500) // 1000,
                "localEndpoint": encoded_local_endpoint,
            }
            kind = kinds.get(span.kind)
            if kind is not None:
                out["kind"] = kind
            parent = span.parent
            if parent is not None:
                out["parentId"] = f"{parent.span_id:016x}"
            tags: dict[str, str] = {}
            for attributes in (span.attributes, span.resource.attributes):
                for key, value in attributes.items():
                    t = type(value)
                    if t is str:
                        tags[key] = value
                    elif t is bool:
                        tags[key] = "true" if value else "false"
                    elif t is int or t is float:
                        tags[key] = str(value)
                    else:  # sequences: as the exporter writes them (a JSON array)
                        tags.update(self._extract_tags_from_dict({key: value}))
            scope = span.instrumentation_scope
            if scope is not None:
                tags["otel.scope.name"] = scope.name
            status = span.status
            if status.status_code is not StatusCode.UNSET:
                tags["otel.status_code"] = status.status_code.name
                if status.status_code is StatusCode.ERROR:
                    tags["error"] = status.description or ""
            if tags:
                out["tags"] = tags
            if span.events:
                out["annotations"] = self._extract_annotations_from_events(span.events)
            return out

        def serialize(self, spans: Any, local_endpoint: Any) -> Any:
            endpoint = self._encode_local_endpoint(local_endpoint)
            return _json_encode([self._encode_span(span, endpoint) for span in spans])  # 10 x json.dumps

        @staticmethod
        def _encode_local_endpoint(local_endpoint: Any) -> Any:
            # Zipkin keys services by lowercase name
            return {"serviceName": str(local_endpoint.service_name or "im").lower()}

    return StrictJsonV2Encoder()


def _instrument(provider: Any, fastapi_app: Any) -> None:
    """asyncpg, redis and aio-pika instrumentations, and the FastAPI app's requests (without FastAPI's
    internal receive/send spans)."""
    from opentelemetry.instrumentation.aio_pika import AioPikaInstrumentor
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (AsyncPGInstrumentor(), RedisInstrumentor(), AioPikaInstrumentor()):  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
            _instrumented.append(instrumentor)
    if fastapi_app is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(fastapi_app, tracer_provider=provider, exclude_spans=["receive", "send"])


def shutdown() -> None:
    """Flush what is queued (bounded by the exporter's timeout) and uninstall. Call in the role's stop,
    before the process exits: the exporter posts from its own thread."""
    global ON, _provider, _message_provider, _tracer, _root_sampler
    with _lock:
        provider, _provider, _message_provider, _root_sampler = _provider, None, None, None
        ON = False
        _tracer = trace.NoOpTracer()
        spans.install(None, None)
        ROUTING.clear()
        for instrumentor in _instrumented:
            with contextlib.suppress(Exception):
                instrumentor.uninstrument()
        _instrumented.clear()
    if provider is not None:
        provider.shutdown()


def tracer() -> trace.Tracer:
    return _tracer


def installed() -> bool:
    """Whether a provider is installed in this process (tests)."""
    return _provider is not None


# --- the message path ----------------------------------------------------------------------------------


def start_send(transport: str) -> Span:
    """The sender's gateway span of one sampled chat message (ended by :func:`end`). Few tags: the SDK
    spends microseconds on each."""
    return MessageSpan("im.send", None, SpanKind.SERVER, {"im.transport": transport})


def end(span: Span, error: Any = None, mid: int | None = None, dup: bool = False) -> None:
    """End ``span``; ``error`` (an ImError or exception) marks it failed."""
    if mid is not None:
        span.set_attribute("im.mid", str(mid))
    if dup:
        span.set_attribute("im.dup", True)
    if error is not None:
        code = getattr(error, "code", None)
        span.set_status(Status(StatusCode.ERROR, f"{getattr(code, 'value', type(error).__name__)}"))
    span.end()


@contextlib.contextmanager
def commit_batch(traces: Sequence[Span], size: int) -> Iterator[Span]:
    """The committer's span of one batch that carries sampled messages (``traces``), linked to their
    traces and current while it commits (SQL and Redis spans nest in it). A batch without a sampled
    message gets no span: that would cost a span per batch for nothing anyone follows."""
    contexts = [s.get_span_context() for s in traces]
    links = [Link(c) for c in contexts]
    attributes: dict[str, Any] = {"im.batch.size": size, "im.batch.traced": len(contexts)}
    if contexts:
        attributes["im.linked_traces"] = ",".join(f"{c.trace_id:032x}" for c in contexts[:MAX_LINK_TAGS])
    span = MessageSpan("im.commit.batch", None, SpanKind.INTERNAL, attributes, links)
    token = _in_batch.set(True)
    try:
        with trace.use_span(span, end_on_exit=True):
            yield span
    finally:
        _in_batch.reset(token)


def message_span(
    name: str, parent: Span, *, kind: SpanKind = SpanKind.INTERNAL, start_time: int | None = None, **attributes: Any
) -> Span:
    """A child span of a carried message context (``parent``), linked to the current span when that is
    another trace's (the commit batch)."""
    current = trace.get_current_span().get_span_context()
    links = [Link(current)] if current.is_valid and current.trace_id != parent.get_span_context().trace_id else None
    return _tracer.start_span(
        name,
        context=trace.set_span_in_context(parent),
        kind=kind,
        links=links,
        attributes=attributes or None,
        start_time=start_time,
    )


def committed(acks: Sequence[tuple[Any, Any, bool, Any]]) -> list[tuple[Span, int]]:
    """The committer answered a pass: one ``im.commit`` span per sampled send (child of its carried
    context, from the batch's start), its context put in :data:`ROUTING` for the routing that follows."""
    out: list[tuple[Span, int]] = []
    if not _in_batch.get():
        return out
    batch = trace.get_current_span()
    start = getattr(batch, "start_time", None)
    batch_id = f"{batch.get_span_context().span_id:016x}"
    for item, m, dup, err in acks:
        parent = item.req.trace
        if parent is None:
            continue
        attributes: dict[str, Any] = {"im.batch": batch_id}
        if m is not None:
            attributes["im.mid"], attributes["im.seq"] = str(m.mid), m.seq
            if dup:
                attributes["im.dup"] = True
        # No link to the batch span: ``im.batch`` names it, and Zipkin would drop a link anyway.
        span = MessageSpan("im.commit", parent.get_span_context(), SpanKind.INTERNAL, attributes, (), start)
        if m is not None:
            ROUTING[m.mid] = span.get_span_context()
            out.append((span, m.mid))
        else:
            end(span, err)
    return out


def routed(spans: Sequence[tuple[Span, int]]) -> None:
    """The pass was routed: end its ``im.commit`` spans and forget their routing contexts."""
    for span, mid in spans:
        ROUTING.pop(mid, None)
        span.end()


def untraced() -> contextlib.AbstractContextManager[object]:
    """Work that must make no spans, the instrumentations' included: readiness probes run every second or
    so on every node, and a trace each would bury the ones that matter."""
    if not ON:
        return contextlib.nullcontext()
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()


def use_span(span: Span, *, end_on_exit: bool = False) -> contextlib.AbstractContextManager[Span]:
    """``span`` current while in the block; an exception marks it failed (and is re-raised)."""
    return trace.use_span(span, end_on_exit=end_on_exit, record_exception=True, set_status_on_exception=True)


@contextlib.contextmanager
def consumer_span(name: str, ctx: otel_context.Context, **attributes: Any) -> Iterator[Span]:
    """A CONSUMER span continuing a context read from headers, current while it runs; an exception
    marks it failed (and is re-raised)."""
    span = _tracer.start_span(
        name, context=ctx, kind=SpanKind.CONSUMER, attributes={f"im.{k}": v for k, v in attributes.items()}
    )
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


@contextlib.contextmanager
def client_span(name: str, parent: Span, headers: MutableMapping[str, str], url: str) -> Iterator[Span]:
    """A CLIENT span for an outgoing HTTP request, its context written into ``headers``."""
    span = _tracer.start_span(
        name,
        context=trace.set_span_in_context(parent),
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": "POST", "url.full": url},
    )
    inject_headers(span, headers)
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


def deliver_spans(messages: Sequence[Any], local_recipients: Sequence[Sequence[int]]) -> list[Span]:
    """Delivery spans at a recipient's gateway for the messages in ``ROUTING`` (ended by the caller)."""
    out: list[Span] = []
    for m, uids in zip(messages, local_recipients, strict=True):
        c = ROUTING.get(m.mid)
        if c is not None:
            attributes = {"im.mid": str(m.mid), "im.recipients": len(uids)}
            out.append(MessageSpan("im.deliver", c, SpanKind.CONSUMER, attributes))
    return out
