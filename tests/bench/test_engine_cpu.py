"""The engines' CPU beside the server's in ``im bench``: :class:`EngineCpu` on real processes (named as an
engine through ``/proc/self/comm``), and a real run on a spawned server whose store is PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from im.bench import server
from im.bench.server import EngineCpu
from tests.support.postgres import DSN, PgSchema

pytestmark = pytest.mark.timeout(180)

NAME = "imtestengine"  # a process name no real engine has (comm: at most 15 characters)

#: Names itself NAME, then for each line read burns that many CPU seconds and says so.
BURNER = f"""
import sys, time
open("/proc/self/comm", "w").write("{NAME}")
print("named", flush=True)
for line in sys.stdin:
    start = time.process_time()
    while time.process_time() - start < float(line):
        pass
    print("burnt", flush=True)
"""


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(server.ENGINES, NAME, "Test engine")
    yield


class Burner:
    def __init__(self) -> None:
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen([sys.executable, "-c", BURNER], stdin=pipe, stdout=pipe, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "named\n"

    def burn(self, seconds: float) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "burnt\n"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.communicate()  # waits, and closes its pipes


def test_an_engine_process_counts_what_it_spent_since_the_snapshot(engine: None) -> None:
    """A process running at the snapshot counts only what it spent after it; one started after it
    counts whole; this (non-engine) process's own CPU does not count."""
    old = Burner()
    try:
        old.burn(0.3)
        start = EngineCpu.snapshot()
        assert any(e == "Test engine" for e, _ in start.values())
        old.burn(0.2)
        new = Burner()
        try:
            new.burn(0.2)
            t = time.process_time()
            while time.process_time() - t < 0.2:  # this process burns too: not an engine
                pass
            spent = EngineCpu.since(start)
        finally:
            new.stop()
    finally:
        old.stop()
    # 0.2 + 0.2 burnt (and the new one's start-up); not the old one's first 0.3, nor this process's 0.2
    assert 0.38 <= spent["Test engine"] <= 0.65, spent


def test_a_run_on_postgresql_reports_its_cpu_beside_the_server_s(tmp_path: Path) -> None:
    schema = PgSchema()
    out = tmp_path / "result.json"
    cmd = [
        sys.executable, "-m", "im", "bench", "--pairs", "4", "--window", "8", "--duration", "3",
        "--warmup", "0.5", "--procs", "1", "--spawn", "--no-progress", "--json", str(out),
        "--server-set", "store.kind=postgres", "--server-set", f"store.postgres_dsn={DSN}",
        "--server-set", f"store.postgres_schema={schema.name}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    finally:
        asyncio.run(schema.drop())
    assert out.exists(), f"no results; exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    r = json.loads(out.read_text())
    assert r["ok"] is True and r["delivered"] > 0, r["problems"]
    pg = r["engines_cpu_ms_per_1k"]["PostgreSQL"]
    assert pg > 0
    assert r["server_and_engines_cpu_ms_per_1k"] >= r["server_cpu_ms_per_1k"] + pg - 1e-6
    assert r["engines_cpu_pct"] > 0
    assert "PostgreSQL CPU-ms per 1k delivered" in proc.stdout
    assert "server + engines CPU-ms per 1k delivered" in proc.stdout
