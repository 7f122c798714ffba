"""Structured logs (im.observability.logs): one format for every line, uvicorn's included, and errors a
client causes at will counted into one line per window, never a line (or a traceback) each."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import socket
import struct
import time
from pathlib import Path

import httpx
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from im.observability.logs import ImFormatter, setup
from im.throttled_log import ThrottledLog
from tests.support.client import ChatClient, register
from tests.support.server import running_server


def _record(msg: str, *args: object, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("im.test", logging.WARNING, __file__, 1, msg, args, None)
    if exc is not None:
        rec.exc_info = (type(exc), exc, exc.__traceback__)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_node_role_extra_traceback_and_the_current_span() -> None:
    fmt = ImFormatter("json", node="gw-7", role="gateway")
    try:
        raise ValueError("boom")
    except ValueError as e:
        err = e
    out = json.loads(fmt.format(_record("sent %d", 3, exc=err, conv_count=2)))
    assert out["message"] == "sent 3" and out["level"] == "WARNING" and out["logger"] == "im.test"
    assert (out["node"], out["role"], out["conv_count"]) == ("gw-7", "gateway", 2)
    assert out["ts"].endswith("Z") and out["ts"][10] == "T"
    assert "ValueError: boom" in out["exc"] and "Traceback" in out["exc"]
    assert "trace_id" not in out  # no span is current
    ctx = SpanContext(0x1234, 0x56, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with trace.use_span(NonRecordingSpan(ctx)):
        out = json.loads(fmt.format(_record("in a span")))
        line = ImFormatter("text", node="gw-7", role="gateway").format(_record("in a span"))
    assert out["trace_id"] == f"{0x1234:032x}" and out["span_id"] == f"{0x56:016x}"
    assert " WARNING gw-7 gateway im.test: in a span trace=" in line and f"span={0x56:016x}" in line


def test_setup_routes_every_logger_through_one_handler() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers), root.level
    handler = setup(level="info", fmt="json", role="api", node="api-3", client_error_interval=2.5, stream=stream)
    try:
        logging.getLogger("uvicorn.error").warning("from uvicorn")
        logging.getLogger("im.x").info("from im")
        assert ThrottledLog.default_window == 2.5
    finally:
        root.removeHandler(handler)
        root.handlers[:] = before[0]
        root.setLevel(before[1])
        ThrottledLog.default_window = 10.0
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(o["logger"], o["message"], o["role"], o["node"]) for o in lines] == [
        ("uvicorn.error", "from uvicorn", "api", "api-3"),
        ("im.x", "from im", "api", "api-3"),
    ]


def _log_objects(text: str) -> list[dict[str, object]]:
    """The server's log lines (its stdout's "im: ..." banner lines aside): each must be one JSON object."""
    out = []
    for line in text.splitlines():
        if line.startswith("im: ") or not line.strip():
            continue
        out.append(json.loads(line))  # a line in any other format fails here
    return out


def _malformed_http(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        with contextlib.suppress(OSError):
            s.recv(4096)


async def test_a_flood_of_bad_frames_and_requests_leaves_a_handful_of_counted_lines(tmp_path: Path) -> None:
    extra = ["--set", "logs.format=json", "--set", "logs.client_error_interval=1"]
    with running_server(tmp_path / "data", extra) as server:
        alice, carol = await register(server.api, "alice"), await register(server.api, "carol")
        # Malformed HTTP requests: uvicorn would write a warning for each.
        for _ in range(300):
            await asyncio.to_thread(_malformed_http, server.http_port)
        # TCP frames with an unknown encoding byte and undecodable JSON, before and after auth.
        bad_tcp = (struct.pack(">I", 2) + b"\x07x") * 1000 + (struct.pack(">I", 6) + b"\x01{nope") * 1000
        reader, writer = await asyncio.open_connection(*server.tcp)
        writer.write(bad_tcp)
        await writer.drain()
        assert len(await asyncio.wait_for(reader.read(4), 10)) == 4  # answered (errors), not crashed
        # WebSocket: garbage text frames from an authenticated client, then a real send on it is acked.
        client = ChatClient(server.ws, alice, "flood")
        assert (await client.connect())["t"] == "auth_ok"
        for _ in range(1000):
            await client.send_frame("{this is not json")
        await client.send_frame({"t": "nonsense", "x": 1})
        await client.wait_for(lambda: len(client.errors) >= 1001)  # each refused with an error frame
        ack = await client.send("still served", to=carol.uid)
        assert ack is not None and ack["t"] == "ack", client.errors[-1]
        await client.close()
        writer.close()
        # The window (1 s) ends; the next malformed request writes the count of the flood.
        time.sleep(1.2)
        await asyncio.to_thread(_malformed_http, server.http_port)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{server.api}/health")).status_code == 200
        bob = ChatClient(server.ws, await register(server.api, "bob"), "after")
        assert (await bob.connect())["t"] == "auth_ok"
        await bob.close()
        logs = _log_objects(server.log())
    malformed = [o for o in logs if "malformed HTTP requests" in str(o["message"])]
    # Each event is in exactly one line: written alone (the first of a window) or in a window's count.
    counted = 0
    for o in malformed:
        text = str(o["message"])
        m = re.match(r"refused ([\d,]+) malformed HTTP requests in the last 1 s; last: Invalid HTTP", text)
        counted += int(m.group(1).replace(",", "")) if m else 1
    assert counted == 301, malformed
    assert 2 <= len(malformed) <= 8, malformed  # a few windows' worth, not 301 lines
    assert all(o["role"] == "serve" and o["node"] == "gw-1" for o in logs)
    assert not any("exc" in o for o in logs), [o for o in logs if "exc" in o][:2]
    assert len(logs) < 40, "\n".join(str(o["message"]) for o in logs)  # a handful, not one per bad frame
