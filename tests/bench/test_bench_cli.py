"""``im bench`` as a real subprocess against a server it spawns: small loads over every transport and in
groups, asserting delivery and correctness from its ``--json`` output (never its speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(180)


def _bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "im", "bench", *args, "--spawn", "--no-progress", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert out.exists(), f"no results; exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(out.read_text())
    assert proc.returncode == (0 if result["ok"] else 1), proc.stderr
    result["_stdout"] = proc.stdout
    return result


def _assert_clean(r: dict[str, Any]) -> None:
    checks = r["checks"]
    assert checks["lost"] == 0, r["problems"]
    assert checks["duplicated"] == 0, r["problems"]
    assert checks["out_of_order"] == 0, r["problems"]
    assert all(v == 0 for v in checks.values()), (checks, r["problems"])
    assert r["delivered"] > 0
    assert r["acked"] > 0
    assert r["totals"]["delivered"] >= r["delivered"]
    assert r["ok"] is True
    lat = r["latency_ms"]
    assert lat["samples"] > 0 and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert r["server_cpu_ms_per_1k"] is not None and r["server_cpu_ms_per_1k"] > 0


@pytest.mark.parametrize("transport", ["ws", "tcp", "mixed"])
def test_pairs_closed_loop(tmp_path: Path, transport: str) -> None:
    r = _bench(
        tmp_path,
        "--pairs",
        "4",
        "--window",
        "8",
        "--duration",
        "3",
        "--warmup",
        "0.5",
        "--procs",
        "2",
        "--transport",
        transport,
    )
    _assert_clean(r)
    assert r["config"]["transport"] == transport and r["config"]["tls"] is False
    assert r["config"]["connections"] == 8
    # every pair is one sender and one receiver: each stored message is delivered once
    assert r["totals"]["delivered"] == r["totals"]["acked"] == r["totals"]["sent"]


def test_groups_mixed_with_png(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    r = _bench(
        tmp_path,
        "--groups",
        "2",
        "--group-size",
        "4",
        "--group-senders",
        "2",
        "--window",
        "4",
        "--duration",
        "3",
        "--warmup",
        "0.5",
        "--procs",
        "2",
        "--transport",
        "mixed",
        "--png",
        str(png),
    )
    _assert_clean(r)
    assert r["config"]["mode"] == "groups"
    # each stored message reaches the three other members
    assert r["totals"]["delivered"] == 3 * r["totals"]["acked"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fixed_rate(tmp_path: Path) -> None:
    r = _bench(
        tmp_path,
        "--pairs",
        "4",
        "--rate",
        "400",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--procs",
        "1",
        "--transport",
        "tcp",
    )
    _assert_clean(r)
    assert r["offered_per_s"] == 400


def test_a_run_held_back_by_the_server_s_limits_says_so(tmp_path: Path) -> None:
    """Sends the server refused ``rate_limited`` are resent by the clients and still delivered once, in
    order; the report counts them by code and says the figures are the limits', not the server's."""
    limited = "--pairs 2 --window 8 --duration 3 --warmup 0.5 --procs 1 --server-set rates.sends_per_user=400/2"
    r = _bench(tmp_path, *limited.split())
    _assert_clean(r)
    assert r["totals"]["retried_codes"].get("rate_limited", 0) > 0, r["totals"]
    assert sum(r["totals"]["retried_codes"].values()) == r["totals"]["retried"]
    assert "sends refused, then resent" in r["_stdout"] and "rate_limited" in r["_stdout"]
    assert "not its capacity" in " ".join(r["_stdout"].split()), r["_stdout"]


def test_idle_connections_report_memory_per_connection(tmp_path: Path) -> None:
    out = tmp_path / "idle.json"
    cmd = [
        sys.executable,
        "-m",
        "im",
        "bench",
        "idle",
        "--connections",
        "200",
        "--transport",
        "mixed",
        "--procs",
        "2",
        "--settle",
        "1",
        "--no-progress",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["connected"] == 200 and r["failed"] == 0 and r["dropped"] == 0
    assert r["rss_before"] > 0 and r["rss_after"] > 0
    assert isinstance(r["bytes_per_connection"], float)  # a number, whatever its size
    assert "memory per connection" in proc.stdout


def test_bad_arguments_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "im", "bench", "--window", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--window" in proc.stderr
