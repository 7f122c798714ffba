"""``im bench`` over TLS, against ``im serve`` speaking TLS itself: a server reached over https:// with
``--ca-file`` (load and idle), refused without the CA, ``--insecure-skip-verify`` warned once; ``--spawn
--tls`` makes its own CA and certificate, gives them to the spawned server's ``tls`` settings, and its
clients trust them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from im.bench import cli as bench_cli
from im.bench import load as bench_load
from im.bench.server import SpawnedServer
from im.config import TlsConfig
from tests.support.tls_server import TlsServer, running_tls_server

pytestmark = pytest.mark.timeout(240)

SHORT = ["--pairs", "2", "--window", "4", "--duration", "2", "--warmup", "0.5", "--procs", "1", "--no-progress"]


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsServer]:
    # The bench registers accounts from one address: the relaxed test rates allow it.
    with running_tls_server(tmp_path, ["--set", "limits.max_connections_per_address=0"]) as srv:
        yield srv


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "im", "bench", *args, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    return proc, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.parametrize("transport", ["mixed"])
def test_load_over_tls_with_a_ca_file(tmp_path: Path, tls: TlsServer, transport: str) -> None:
    proc, r = _bench(tmp_path, *SHORT, "--transport", transport, "--server", tls.http, "--ca-file", str(tls.ca.cert))
    assert r is not None, proc.stderr
    assert proc.returncode == 0 and r["ok"], (proc.stderr, r["problems"])
    assert r["config"]["tls"] is True
    assert all(v == 0 for v in r["checks"].values()), r["problems"]
    assert r["delivered"] > 0 and r["totals"]["delivered"] == r["totals"]["acked"] == r["totals"]["sent"]
    assert "verification is OFF" not in proc.stderr


def test_idle_over_tls_with_a_ca_file(tmp_path: Path, tls: TlsServer) -> None:
    args = ["idle", "--connections", "6", "--transport", "mixed", "--settle", "0.2", "--no-progress"]
    proc, r = _bench(tmp_path, *args, "--server", tls.http, "--ca-file", str(tls.ca.cert))
    assert r is not None, proc.stderr
    assert proc.returncode == 0 and r["ok"], proc.stderr
    assert r["connected"] == 6, r


def test_without_the_ca_the_run_is_refused_with_a_clear_error(tmp_path: Path, tls: TlsServer) -> None:
    proc, r = _bench(tmp_path, *SHORT, "--server", tls.http)
    assert proc.returncode != 0 and r is None
    assert "TlsVerificationError" in proc.stderr and "certificate" in proc.stderr, proc.stderr[-2000:]


def test_insecure_skip_verify_runs_and_warns_once(tmp_path: Path, tls: TlsServer) -> None:
    proc, r = _bench(tmp_path, *SHORT, "--transport", "tcp", "--server", tls.http, "--insecure-skip-verify")
    assert r is not None and proc.returncode == 0 and r["ok"], proc.stderr
    assert proc.stderr.count("verification is OFF") == 1, proc.stderr


def test_tls_flags_are_checked() -> None:
    for argv in (
        ["--tls", "--server", "https://h"],
        ["--ca-file", "ca.crt"],  # with --spawn: the spawned server's own CA is trusted
        ["--server", "https://h", "--ca-file", "ca.crt", "--insecure-skip-verify"],
    ):
        with pytest.raises(SystemExit) as exc:
            bench_cli.main(argv)
        assert exc.value.code == 2, argv


def test_spawn_with_tls_trusts_its_own_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SpawnedServer] = []
    real_run = bench_load._run

    def run(opts: bench_load.LoadOptions, base: str, *args: Any) -> dict[str, Any]:
        seen.append(args[-1])
        assert base.startswith("https://") and opts.tls.ca_file is not None
        return real_run(opts, base, *args)

    monkeypatch.setattr(bench_load, "_run", run)
    out = tmp_path / "r.json"
    code = bench_cli.main([*SHORT, "--transport", "mixed", "--spawn", "--tls", "--json", str(out)])
    r = json.loads(out.read_text())
    assert code == 0 and r["ok"], r["problems"]
    assert r["config"]["tls"] is True
    assert r["delivered"] > 0 and all(v == 0 for v in r["checks"].values())
    spawned = seen[0]
    assert spawned.tls and spawned.ca_file is not None and spawned.ca_file.endswith("ca.crt")
    # The server itself speaks TLS: the addresses it printed (and /gateway hands out) are its own.
    assert spawned.http.startswith("https://") and spawned.ws.startswith("wss://"), (spawned.http, spawned.ws)
    assert spawned.tcp.startswith("tls://"), spawned.tcp
    assert not Path(spawned.ca_file).exists(), "the run's certificates are removed with its temporary directory"


def test_many_connections_over_tls_stay_within_the_servers_handshake_cap(tmp_path: Path) -> None:
    """80 connections from one address to a server with the default ``tls.max_handshakes_per_address``
    (32): the bench opens at most that many at once over all its processes. It opened 64 per process and
    the server closed the rest in their handshake (the run ended in ``ConnectionResetError``)."""
    assert TlsConfig().max_handshakes_per_address == bench_load.TLS_CONNECTS
    out = tmp_path / "r.json"
    args = ["--pairs", "40", "--window", "2", "--duration", "1", "--warmup", "0.5", "--procs", "2"]
    code = bench_cli.main([*args, "--no-progress", "--spawn", "--tls", "--json", str(out)])
    r = json.loads(out.read_text())
    assert code == 0 and r["ok"], r["problems"]
    assert r["delivered"] > 0 and all(v == 0 for v in r["checks"].values())
