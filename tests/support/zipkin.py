"""A Zipkin collector stand-in: accepts Zipkin v2 JSON POSTs at ``/api/v2/spans``, validates every span
against the v2 span schema (zipkin2-api.yaml, ``Span`` and ``Endpoint``) and keeps them for queries.

No Zipkin server is installable here, so the tests run this real HTTP/1.1 receiver (stdlib asyncio,
keep-alive, Content-Length or chunked bodies). A POST with a span that breaks the schema is answered
400 and recorded in ``errors``: tests assert that list is empty, so a bad span fails loudly.

As a script (for ``im bench`` at 100 % sampling): ``python -m tests.support.zipkin --port 9411`` prints
the number of spans received every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX16_32 = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_KINDS = {"CLIENT", "SERVER", "PRODUCER", "CONSUMER"}
_SPAN_FIELDS = {
    "traceId",
    "name",
    "parentId",
    "id",
    "kind",
    "timestamp",
    "duration",
    "debug",
    "shared",
    "localEndpoint",
    "remoteEndpoint",
    "annotations",
    "tags",
}
_ENDPOINT_FIELDS = {"serviceName", "ipv4", "ipv6", "port"}
_IPV4 = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")


class SchemaError(ValueError):
    pass


def _int(value: Any, what: str, minimum: int) -> None:
    if type(value) is not int or value < minimum:  # bool is not an int here
        raise SchemaError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _endpoint(value: Any, what: str, *, service_required: bool) -> None:
    if not isinstance(value, dict):
        raise SchemaError(f"{what} must be an object, got {value!r}")
    unknown = set(value) - _ENDPOINT_FIELDS
    if unknown:
        raise SchemaError(f"{what} has fields outside the schema: {sorted(unknown)}")
    name = value.get("serviceName")
    if service_required and not (isinstance(name, str) and name):
        raise SchemaError(f"{what}.serviceName is required (a non-empty string), got {name!r}")
    if name is not None and (not isinstance(name, str) or name != name.lower()):
        raise SchemaError(f"{what}.serviceName must be a lowercase string, got {name!r}")
    if "ipv4" in value:
        m = _IPV4.fullmatch(str(value["ipv4"]))
        if not isinstance(value["ipv4"], str) or m is None or any(int(g) > 255 for g in m.groups()):
            raise SchemaError(f"{what}.ipv4 must be a dotted quad, got {value['ipv4']!r}")
    if "ipv6" in value and not (isinstance(value["ipv6"], str) and ":" in value["ipv6"]):
        raise SchemaError(f"{what}.ipv6 must be an IPv6 address string, got {value['ipv6']!r}")
    if "port" in value:
        _int(value["port"], f"{what}.port", 0)
        if value["port"] > 65535:
            raise SchemaError(f"{what}.port must be <= 65535")


def validate_span(span: Any) -> None:
    """Raise :class:`SchemaError` unless ``span`` is a valid Zipkin v2 span (and names its service)."""
    if not isinstance(span, dict):
        raise SchemaError(f"a span must be an object, got {type(span).__name__}")
    unknown = set(span) - _SPAN_FIELDS
    if unknown:
        raise SchemaError(f"fields outside the schema: {sorted(unknown)}")
    trace_id = span.get("traceId")
    if not (isinstance(trace_id, str) and _HEX16_32.fullmatch(trace_id)) or set(trace_id) == {"0"}:
        raise SchemaError(f"traceId must be 16 or 32 lowercase hex (not all zero), got {trace_id!r}")
    span_id = span.get("id")
    if not (isinstance(span_id, str) and _HEX16.fullmatch(span_id)) or set(span_id) == {"0"}:
        raise SchemaError(f"id must be 16 lowercase hex (not all zero), got {span_id!r}")
    if "parentId" in span:
        parent = span["parentId"]
        if not (isinstance(parent, str) and _HEX16.fullmatch(parent)):
            raise SchemaError(f"parentId must be 16 lowercase hex, got {parent!r}")
        if parent == span_id:
            raise SchemaError("a span cannot be its own parent")
    if "name" in span and not isinstance(span["name"], str):
        raise SchemaError(f"name must be a string, got {span['name']!r}")
    if "kind" in span and span["kind"] not in _KINDS:
        raise SchemaError(f"kind must be one of {sorted(_KINDS)}, got {span['kind']!r}")
    # Epoch microseconds: a millisecond or nanosecond value would be off by 1000x.
    if "timestamp" in span:
        _int(span["timestamp"], "timestamp", 1)
        if not 1_000_000_000_000_000 < span["timestamp"] < 10_000_000_000_000_000:
            raise SchemaError(f"timestamp must be epoch microseconds, got {span['timestamp']}")
    if "duration" in span:
        _int(span["duration"], "duration", 0)  # the exporter rounds to microseconds: 0 is possible
        if span["duration"] > 3_600_000_000:
            raise SchemaError(f"duration {span['duration']} us is over an hour: not microseconds?")
    for flag in ("debug", "shared"):
        if flag in span and not isinstance(span[flag], bool):
            raise SchemaError(f"{flag} must be a boolean, got {span[flag]!r}")
    if "localEndpoint" not in span:
        raise SchemaError("localEndpoint (with serviceName) is required here")
    _endpoint(span["localEndpoint"], "localEndpoint", service_required=True)
    if "remoteEndpoint" in span:
        _endpoint(span["remoteEndpoint"], "remoteEndpoint", service_required=False)
    if "annotations" in span:
        annotations = span["annotations"]
        if not isinstance(annotations, list):
            raise SchemaError("annotations must be an array")
        for a in annotations:
            if not isinstance(a, dict) or set(a) != {"timestamp", "value"}:
                raise SchemaError(f"an annotation is exactly {{timestamp, value}}, got {a!r}")
            _int(a["timestamp"], "annotations[].timestamp", 1)
            if not isinstance(a["value"], str):
                raise SchemaError(f"annotations[].value must be a string, got {a['value']!r}")
    if "tags" in span:
        tags = span["tags"]
        if not isinstance(tags, dict):
            raise SchemaError("tags must be an object")
        for k, v in tags.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise SchemaError(f"tags are string -> string, got {k!r}: {v!r}")


@dataclass
class ZipkinReceiver:
    """Run with ``await start()``; ``url`` is the span endpoint to configure (``tracing.zipkin_url``)."""

    host: str = "127.0.0.1"
    port: int = 0
    spans: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    posts: int = 0
    url: str = ""
    _server: asyncio.Server | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> ZipkinReceiver:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}/api/v2/spans"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- queries -------------------------------------------------------------------------------------

    def traces(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in self.spans:
            out[s["traceId"]].append(s)
        return dict(out)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s.get("name") == name]

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["traceId"] == trace_id]

    async def wait_for(self, predicate: Any, timeout: float = 15.0, what: str = "spans") -> None:
        """Until ``predicate()`` is true (re-checked after each POST), or fail with what was received."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                names = sorted({(s["localEndpoint"]["serviceName"], s.get("name", "")) for s in self.spans})
                raise AssertionError(f"timed out waiting for {what}; received {len(self.spans)} spans: {names}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    # --- HTTP ----------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, _, rest = lines[0].partition(" ")
                path = rest.split(" ", 1)[0]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    body = await self._chunked(reader)
                else:
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, answer = self._handle(method, path, headers, body)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Length: {len(answer)}\r\nContent-Type: text/plain\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        out = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return bytes(out)
            out += chunk[:-2]

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[str, bytes]:
        if path != "/api/v2/spans":
            return "404 Not Found", b"only /api/v2/spans"
        if method != "POST":
            return "405 Method Not Allowed", b"POST only"
        self.posts += 1
        try:
            if not headers.get("content-type", "").startswith("application/json"):
                raise SchemaError(f"content-type must be application/json, got {headers.get('content-type')!r}")
            spans = json.loads(body)
            if not isinstance(spans, list):
                raise SchemaError("the body must be a JSON array of spans")
            for span in spans:
                validate_span(span)
        except (ValueError, SchemaError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return "400 Bad Request", str(exc).encode()
        self.spans.extend(spans)
        self._changed.set()
        return "202 Accepted", b""


async def _main(port: int, interval: float) -> None:
    receiver = await ZipkinReceiver(port=port).start()
    print(f"listening on {receiver.url}", flush=True)
    try:
        while True:
            await asyncio.sleep(interval)
            print(f"spans={len(receiver.spans)} posts={receiver.posts} errors={len(receiver.errors)}", flush=True)
            if receiver.errors:
                print(receiver.errors[-1], flush=True)
            receiver.spans.clear()  # a long benchmark must not grow without bound; counts stay in the line
    finally:
        await receiver.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9411)
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args()
    asyncio.run(_main(args.port, args.interval))
