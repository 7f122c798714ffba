"""Debian's real Prometheus against im: the alert rules pass ``promtool check rules``, the dashboard and the
rules use only metrics the code exports, and a Prometheus scraping a real cluster (API, two gateways on
their operations listeners, a transfer node) reports exactly the sends, acks and deliveries of a known run."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from im.cluster import LocalCluster
from im.observability import metrics
from im.procs import free_port, stop_process
from tests.cluster.conftest import make_cluster, stop_checked
from tests.support.client import ChatClient, register

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "im-dashboard.json"
EXAMPLE_CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"
#: Series Prometheus itself makes for every target.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (Debian package prometheus; scripts/test.sh installs it)"
    return path


def test_promtool_accepts_the_rules_and_the_example_config() -> None:
    r = subprocess.run([_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    r = subprocess.run(
        [_tool("promtool"), "check", "config", str(EXAMPLE_CONFIG)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _exported() -> set[str]:
    """Every series name this code exports (the im_* collector and the process collector)."""
    metrics.install(True)
    text = metrics.render()
    assert text is not None
    return {line.split("{")[0].split(" ")[0] for line in text.decode().splitlines() if line and line[0] != "#"}


def _used(expressions: list[str]) -> set[str]:
    return {n for e in expressions for n in re.findall(r"\b((?:im|process)_[a-z_]+|up)\b", e)}


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    exported = _exported() | PROMETHEUS_OWN
    rules = [r["expr"] for r in _yaml_rules(ALERTS)]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(rules) >= 6 and len(panels) >= 10
    for where, exprs in (("alerts.yml", rules), ("im-dashboard.json", panels)):
        used = _used(exprs)
        assert used, where
        assert used <= exported, f"{where} uses metrics nobody exports: {sorted(used - exported)}"
    # What the issue asks to watch is there.
    for name in ("im_ack_latency_seconds_bucket", "im_relay_lag_seconds", "im_engine_errors_total", "up"):
        assert name in _used(rules), name
    for name in ("im_commit_batch_size_bucket", "process_open_fds", "process_max_fds", "im_connections"):
        assert name in _used(panels), name


def _yaml_rules(path: Path) -> list[dict[str, str]]:
    import yaml

    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# --- a real cluster scraped by a real Prometheus ---------------------------------------------------------


class Prometheus:
    """``prometheus`` as a plain process on a free port, its data in a temporary directory."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "im", "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}
            ],
        }
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log_path = directory / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Prometheus:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    _tool("prometheus"),
                    f"--config.file={self.directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"prometheus not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def query(self, expr: str) -> float | None:
        """The value of a query giving one sample (None: no sample yet)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        body = r.json()
        assert body["status"] == "success", body
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expected: dict[str, float], deadline: float) -> dict[str, float | None]:
        """Poll the queries until each gives its expected value, or the deadline passes; the last values."""
        last: dict[str, float | None] = {}
        while True:
            last = {expr: self.query(expr) for expr in expected}
            if last == expected or time.monotonic() > deadline:
                return last
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 10, raise_on_timeout=False)


@pytest.fixture
def small_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path / "cluster", gateways=2, transfers=1)  # free ports, ops listeners' included
    c.start()
    yield c
    stop_checked(c)


async def test_prometheus_counts_a_known_run_on_a_cluster(small_cluster: LocalCluster, tmp_path: Path) -> None:
    c = small_cluster
    urls = c.metrics_urls()
    assert set(urls) == {"api-1", "gw-1", "gw-2", "tr-1"}
    # Each operations listener answers before Prometheus is involved.
    for name in ("gw-1", "gw-2", "tr-1"):
        base = urls[name].removesuffix("/metrics")
        assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200
        ready = httpx.get(f"{base}/health/ready", timeout=5)
        assert ready.status_code == 200 and ready.json()["ready"] is True, (name, ready.text)
    targets = [u.removeprefix("http://").removesuffix("/metrics") for u in urls.values()]
    prom = Prometheus(tmp_path / "prometheus", targets)
    prom.start()
    try:
        n = 40
        alice = await register(c.api, "alice")
        bob = await register(c.api, "bob")
        gw1, gw2, tr1 = c.nodes["gw-1"].ports, c.nodes["gw-2"].ports, c.nodes["tr-1"].ports
        a = ChatClient(f"ws://127.0.0.1:{gw1['ws']}/ws", alice, "phone")  # WebSocket on gateway 1
        b = ChatClient("", bob, "laptop", tcp=("127.0.0.1", gw2["tcp"]))  # TCP on gateway 2
        await a.connect()
        await b.connect()
        for i in range(n):
            ack = await a.send({"text": f"m{i}"}, to=bob.uid, cmid=f"c{i}")
            assert ack is not None and not ack.get("dup"), a.errors
        await b.wait_messages(n)
        expected = {
            'count(up{job="im"} == 1)': 4.0,
            "sum(im_sends_received_total)": float(n),
            "sum(im_acks_total)": float(n),
            "sum(im_deliveries_total)": float(n),
            "sum(im_messages_committed_total)": float(n),
            "sum(im_sends_refused_total)": 0.0,
            "sum(im_connections)": 2.0,
            "sum(im_sessions_authenticated)": 2.0,
            f'sum(im_deliveries_total{{instance="127.0.0.1:{gw2["ops"]}"}})': float(n),  # all on bob's gateway
            f'sum(im_messages_committed_total{{instance="127.0.0.1:{tr1["ops"]}"}})': float(n),
        }
        found = prom.wait_for(expected, time.monotonic() + 25)
        assert found == expected, prom.log_path.read_text()[-2000:]
        # Then a known `im bench` run through the cluster's API: the sums grow by exactly its totals.
        report = tmp_path / "bench.json"
        args = ["--server", c.api.removesuffix("/api/v1"), "--pairs", "3", "--window", "4", "--duration", "2"]
        args += ["--warmup", "0", "--drain", "5", "--procs", "1", "--no-progress", "--json", str(report)]
        bench = subprocess.run(
            [sys.executable, "-m", "im", "bench", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
        totals = json.loads(report.read_text())["totals"]
        assert totals["sent"] > 0 and totals["retried"] == 0 and totals["dup_acks"] == 0, totals
        after = {
            "sum(im_sends_received_total)": float(n + totals["sent"]),
            "sum(im_acks_total)": float(n + totals["acked"]),
            "sum(im_deliveries_total)": float(n + totals["delivered"]),
            "sum(im_messages_committed_total)": float(n + totals["sent"]),
        }
        found = prom.wait_for(after, time.monotonic() + 25)
        assert found == after, (totals, prom.log_path.read_text()[-2000:])
        # The latency histograms were filled where they are measured.
        # One send in LATENCY_SAMPLE is timed, by each gateway's own count (every one was acked).
        assert prom.query("sum(im_ack_latency_seconds_count)") == prom.query(
            f"sum(floor(im_sends_received_total / {metrics.LATENCY_SAMPLE}))"
        )
        assert (prom.query("sum(im_delivery_latency_seconds_count)") or 0) > 0
        assert prom.query("sum(im_commit_batch_size_sum)") == n + totals["sent"]
        assert (prom.query('max(process_open_fds{job="im"})') or 0) > 0
        await a.close()
        await b.close()
    finally:
        prom.stop()
    # A stopping node says so: /health/ready answers 503 while it drains, before its listener closes. A
    # connection that ignores the bye keeps gateway 1 draining for up to a second.
    node = c.nodes["gw-1"]
    ready_url = urls["gw-1"].removesuffix("/metrics") + "/health/ready"
    assert node.proc is not None
    with socket.create_connection(("127.0.0.1", node.ports["tcp"]), timeout=5), httpx.Client(timeout=2) as http:
        assert http.get(ready_url).status_code == 200
        node.proc.send_signal(signal.SIGTERM)
        seen: list[int] = []
        deadline = time.monotonic() + 10
        while node.running and 503 not in seen and time.monotonic() < deadline:
            try:
                seen.append(http.get(ready_url).status_code)
            except httpx.TransportError:
                break  # the listener closed (it stops last)
    assert seen and seen[-1] == 503, seen[-20:]
    assert set(seen) <= {200, 503}, seen
    assert node.proc.wait(20) == 0, node.log()[-3000:]
