"""Soak: hold N connections on a local cluster for M minutes, with churn, a steady message rate and faults
on a timer, and watch every server process's memory, descriptors and asyncio tasks for growth.

    uv run python benchmarks/soak.py                                   # 2,000 connections, 15 minutes
    uv run python benchmarks/soak.py --connections 500 --minutes 2 --out /tmp/soak
    uv run python benchmarks/soak.py --faults none --churn-fraction 0  # a quiet baseline
    uv run python benchmarks/soak.py --api http://127.0.0.1:8080 --pid api=123 --pid gw=456 --faults none

By default it starts an ``im cluster`` (:class:`im.cluster.LocalCluster`: one API, two gateways, two
transfer nodes, a private etcd; the local PostgreSQL, Redis, and RabbitMQ with ``--amqp``) in a fresh
PostgreSQL schema and Redis prefix, registers ``N`` users (one device each, in direct pairs), and starts
client processes (benchmarks/soak_clients.py) that:

- hold every connection (half WebSocket, half TCP by default), pinging every 15 s;
- churn: every ``--churn-every`` seconds close ``--churn-fraction`` of their connections and open them
  again at once, resuming from their cursors through the gateway the API hands out;
- send ``--rate`` messages/s in total, each from a random device to its peer;
- check every frame (gaps, duplicates, order, one seq per cmid) and, at the end, the stored log.

Faults, one every ``--fault-every`` seconds, in turn from ``--faults`` (``ACTION:NODE``, comma-separated):
``kill:NODE`` (SIGKILL, back after ``--down`` seconds), ``pause:NODE`` (SIGSTOP for ``--pause`` seconds, then
SIGCONT), ``term:NODE`` (SIGTERM: a graceful drain, then back), ``cut:postgres`` and ``cut:redis`` (every
node reaches that engine through a :class:`tests.support.proxy.TcpProxy` in this process: the cut resets
every connection and refuses new ones for ``--cut`` seconds). The default kills gw-2 and tr-2, pauses gw-1
and tr-1 and cuts PostgreSQL and Redis, so that api-1, gw-1 and tr-1 run for the whole soak and their
figures are one series each.
Pauses stay shorter than the registry lease (``registry.ttl``): a stall, not a takeover (a node paused past
its lease is the fencing scenario of tests/faults/).

Every ``--interval`` seconds one line per process is printed and a row is appended to ``soak.csv``: RSS,
open descriptors (/proc/PID/fd), asyncio tasks and connections (the node's ``/metrics``:
``im_asyncio_tasks``, ``im_connections``), and the run's totals (connections held, messages sent, acked,
delivered, churned reconnects, faults). At the end: the checker's verdict (lost, duplicated, out of order,
stored-log mismatches: all must be 0), and for each process the least-squares slope of RSS (MiB/min) and
descriptors (/min) after ``--warmup`` seconds, over its longest uninterrupted life (a restarted process
starts a new series), and over the second half of that window; and how long devices took to be back after
a fault (disconnect to ``synced``). ``soak.svg`` plots the series, ``soak.json`` holds the summary. Exit
status 1 on any anomaly.

The default rate (200 messages/s) fills each transfer node's window of recent sends (the committer keeps
the last 50,000 for duplicate detection: about 0.7 KiB of Python objects each by tracemalloc, 0.8 KiB of
RSS, so about 40 MiB once full) after about 8 minutes (at about 105 commits/s per node), so the second
half shows whether memory levels off once every bounded structure is full. RSS still steps up by a few
MiB after an engine cut: the failed connection attempts leave cyclic garbage (exceptions with their
tracebacks, an ``SSLContext`` per attempt) that waits for the cyclic collector, which runs rarely under
``gc.set_threshold(50_000, ...)`` (im/cli.py), and glibc keeps the freed memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from im.bench.accounts import PASSWORD, create_users
from im.bench.server import BENCH_SERVER_SETTINGS, raise_nofile, rss_bytes
from im.cluster import LocalCluster
from im.procs import free_block
from soak_clients import ClientConfig, SoakUser, clients_main
from soak_plot import slope, slope_at_equal, write_svg

DSN = os.environ.get("IM_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
DEFAULT_FAULTS = "kill:gw-2,pause:tr-1,cut:postgres,kill:tr-2,pause:gw-1,cut:redis"
REDIS = "redis://127.0.0.1:6379/0"
#: Engines a ``cut:`` fault can cut off: every node reaches them through a TcpProxy in this process.
ENGINES = ("postgres", "redis")


@dataclass
class Proc:
    """One watched process: a cluster node, or a client process of the soak."""

    name: str
    pid: int
    metrics: str | None = None  # its /metrics URL


@dataclass
class Totals:
    started: float = field(default_factory=time.monotonic)
    faults: int = 0
    fault_log: list[tuple[float, str]] = field(default_factory=list)
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)

    def sum(self, key: str) -> int:
        return sum(int(c.get(key, 0)) for c in self.clients.values())


def _free_base() -> int:
    """A base port for the soak's cluster, from 20000 up to the ephemeral range."""
    return free_block((0, 5, 6, 11, 12, 13, 14, 17, 21, 22, 23, 24, 27), low=20_000)


def fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_mib(pid: int) -> float | None:
    try:
        return rss_bytes(pid) / 2**20
    except (OSError, RuntimeError):
        return None


def _sample(text: str, name: str) -> float | None:
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


async def scrape(http: httpx.AsyncClient, url: str | None) -> tuple[float | None, float | None, float | None]:
    """(im_asyncio_tasks, im_connections summed over transports, im_messages_committed_total) of one node,
    None where not answered."""
    if url is None:
        return None, None, None
    try:
        r = await http.get(url, timeout=2.0)
    except httpx.HTTPError:
        return None, None, None
    if r.status_code != 200:
        return None, None, None
    text = r.text
    committed = _sample(text, "im_messages_committed_total")
    return _sample(text, "im_asyncio_tasks"), _sample(text, "im_connections"), committed


# --- faults -------------------------------------------------------------------------------------------


def engine_proxies(args: argparse.Namespace) -> dict[str, Any]:
    """A :class:`tests.support.proxy.TcpProxy` per engine that a ``cut:`` fault names (started)."""
    wanted = {item.split(":", 1)[1] for item in args.faults.split(",") if item.startswith("cut:")}
    if not wanted:
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tests.support
    from tests.support.proxy import TcpProxy

    targets = {"postgres": _host_port(DSN, 5432), "redis": _host_port(REDIS, 6379)}
    return {name: TcpProxy(targets[name]).start() for name in sorted(wanted)}


def _host_port(url: str, default: int) -> tuple[str, int]:
    parsed = urlsplit(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default


def _via(url: str, proxy: Any) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parsed = urlsplit(url)
    user = f"{parsed.username}@" if parsed.username else ""
    return urlunsplit(parsed._replace(netloc=f"{user}{proxy.address}"))


async def fault_loop(
    args: argparse.Namespace,
    cluster: LocalCluster,
    proxies: dict[str, Any],
    totals: Totals,
    stop: asyncio.Event,
) -> None:
    plan = [] if args.faults == "none" else [tuple(f.split(":", 1)) for f in args.faults.split(",")]
    i = 0
    while plan:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.fault_every)
        if stop.is_set():
            return
        action, name = plan[i % len(plan)]
        i += 1
        t = time.monotonic() - totals.started
        totals.faults += 1
        totals.fault_log.append((t, f"{action}:{name}"))
        if action == "cut":
            what = f"every node cut off from {name} for {args.cut:g}s"
            print(f"soak: {t:7.1f}s fault {totals.faults}: {what}", flush=True)
            await asyncio.to_thread(proxies[name].stop)
            await asyncio.sleep(args.cut)
            await asyncio.to_thread(proxies[name].start)
            continue
        node = cluster.nodes[name]
        assert node.proc is not None
        print(f"soak: {t:7.1f}s fault {totals.faults}: {action} {name} (pid {node.proc.pid})", flush=True)
        if action == "pause":
            os.kill(node.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(args.pause)
            os.kill(node.proc.pid, signal.SIGCONT)
        else:
            sig = signal.SIGKILL if action == "kill" else signal.SIGTERM
            await asyncio.to_thread(node.stop, sig)
            await asyncio.sleep(args.down)
            await asyncio.to_thread(node.start, 60.0)
            assert node.proc is not None
            print(f"soak: {time.monotonic() - totals.started:7.1f}s {name} back (pid {node.proc.pid})", flush=True)


# --- the run ------------------------------------------------------------------------------------------


def drain_queue(out: Any, totals: Totals, results: dict[int, dict[str, Any]], workers: list[Any]) -> None:
    while True:
        try:
            kind, index, payload = out.get_nowait()
        except queue.Empty:
            return
        if kind == "stats":
            totals.clients[index] = payload
        elif kind == "result":
            results[index] = payload
            totals.clients[index] = payload
        elif kind == "error":
            raise RuntimeError(f"client process {index} failed:\n{payload}")


async def monitor(
    args: argparse.Namespace,
    procs: list[Proc],
    cluster: LocalCluster | None,
    totals: Totals,
    writer: Any,
    rows: list[dict[str, Any]],
    http: httpx.AsyncClient,
    phase: str,
) -> None:
    if cluster is not None:  # a restarted node has a new pid
        for p in procs:
            node = cluster.nodes.get(p.name)
            if node is not None and node.proc is not None:
                p.pid = node.proc.pid
    t = time.monotonic() - totals.started
    row: dict[str, Any] = {
        "t": round(t, 1),
        "phase": phase,
        "held": totals.sum("held"),
        "sent": totals.sum("sent"),
        "acked": totals.sum("acked"),
        "delivered": totals.sum("delivered"),
        "churned": totals.sum("churned"),
        "reconnects": totals.sum("reconnects"),
        "outbox": totals.sum("outbox"),
        "faults": totals.faults,
        "anomalies": totals.sum("duplicated") + totals.sum("out_of_order") + totals.sum("mismatched"),
    }
    scraped = await asyncio.gather(*(scrape(http, p.metrics) for p in procs))
    parts = []
    for p, (tasks, conns, committed) in zip(procs, scraped, strict=True):
        r, f = rss_mib(p.pid), fds(p.pid)
        row |= {f"{p.name}.pid": p.pid, f"{p.name}.rss_mib": r, f"{p.name}.fds": f}
        row |= {f"{p.name}.tasks": tasks, f"{p.name}.conns": conns, f"{p.name}.committed": committed}
        show = f"{p.name} {r or 0:5.0f}M {f or 0:5d}fd"
        if tasks is not None:
            show += f" {tasks:5.0f}t"
        if conns is not None:
            show += f" {conns:5.0f}c"
        parts.append(show)
    rows.append(row)
    writer.writerow(row)
    print(
        f"soak: {t:7.1f}s {phase:5} held {row['held']:5d} sent {row['sent']:7d} acked {row['acked']:7d} "
        f"deliv {row['delivered']:7d} churn {row['churned']:6d} reconn {row['reconnects']:5d} "
        f"faults {row['faults']:3d} anomalies {row['anomalies']}",
        flush=True,
    )
    print("        " + " | ".join(parts), flush=True)


def slopes(rows: list[dict[str, Any]], names: list[str], warmup: float) -> dict[str, dict[str, Any]]:
    """Per process: RSS and descriptor slopes per minute over its longest uninterrupted life (a restart
    starts a new one), leaving out its first ``warmup`` seconds and the run's; also over the second half of
    that window (growth that is slowing down shows a smaller second-half slope), and for gateways the slope
    of descriptors not held by a client connection (``fds - im_connections``) and of RSS at an equal number
    of connections (a gateway's memory follows the connections it holds, which faults move between
    gateways; what is left over is what a leak would show)."""
    out = {}
    for name in names:
        pts = [r for r in rows if r["phase"] == "load" and r.get(f"{name}.rss_mib") is not None]
        if not pts:
            continue
        lives: dict[int, list[dict[str, Any]]] = {}
        for r in pts:
            lives.setdefault(r[f"{name}.pid"], []).append(r)
        pid, life = max(lives.items(), key=lambda kv: kv[1][-1]["t"] - kv[1][0]["t"])
        born = life[0]["t"]
        seg = [r for r in life if r["t"] - born >= warmup and r["t"] >= warmup]
        xs = [r["t"] / 60 for r in seg]
        half = [r for r in seg if seg and r["t"] >= (seg[0]["t"] + seg[-1]["t"]) / 2]
        other = [r for r in seg if r.get(f"{name}.conns") is not None and r.get(f"{name}.fds") is not None]
        held = [r for r in other if r[f"{name}.conns"]]
        fit = slope_at_equal(
            [r["t"] / 60 for r in held], [float(r[f"{name}.conns"]) for r in held], [r[f"{name}.rss_mib"] for r in held]
        )
        out[name] = {
            "rss_mib_per_min_at_equal_connections": None if fit is None else round(fit[0], 4),
            "rss_kib_per_connection": None if fit is None else round(fit[1] * 1024, 2),
            "pid": pid,
            "lives": len(lives),
            "from_minute": round(xs[0], 2) if xs else None,
            "rss_mib_per_min_2nd_half": slope([r["t"] / 60 for r in half], [r[f"{name}.rss_mib"] for r in half]),
            "fds_not_connections_per_min": slope(
                [r["t"] / 60 for r in other], [r[f"{name}.fds"] - r[f"{name}.conns"] for r in other]
            )
            if any(r[f"{name}.conns"] for r in other)
            else None,
            "committed": (seg[-1].get(f"{name}.committed") if seg else None),
            "minutes": round((xs[-1] - xs[0]) if len(xs) > 1 else 0.0, 2),
            "rss_first_mib": seg[0][f"{name}.rss_mib"] if seg else None,
            "rss_last_mib": seg[-1][f"{name}.rss_mib"] if seg else None,
            "rss_mib_per_min": slope(xs, [r[f"{name}.rss_mib"] for r in seg]),
            "fds_first": seg[0][f"{name}.fds"] if seg else None,
            "fds_last": seg[-1][f"{name}.fds"] if seg else None,
            "fds_per_min": slope(xs, [r[f"{name}.fds"] for r in seg]),
            "tasks_per_min": slope(
                [r["t"] / 60 for r in seg if r[f"{name}.tasks"] is not None],
                [r[f"{name}.tasks"] for r in seg if r[f"{name}.tasks"] is not None],
            ),
        }
    return out


async def run(args: argparse.Namespace) -> int:
    raise_nofile()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cluster: LocalCluster | None = None
    proxies: dict[str, Any] = {}
    tmp: str | None = None
    procs: list[Proc] = []
    if args.api:
        api = args.api.rstrip("/")
        for item in args.pid:
            name, pid = item.split("=", 1)
            procs.append(Proc(name, int(pid)))
        for item in args.metrics:
            name, url = item.split("=", 1)
            for p in procs:
                if p.name == name:
                    p.metrics = url
    else:
        proxies = engine_proxies(args)
        tmp = tempfile.mkdtemp(prefix="im-soak-")
        tag = uuid.uuid4().hex[:8]
        extra = [x for s in BENCH_SERVER_SETTINGS for x in ("--set", s)]
        extra += ["--set", f"auth.access_ttl={args.minutes * 60 + 3600:.0f}"]
        extra += ["--set", f"registry.ttl={args.registry_ttl}", "--set", "presence.ttl=5", "--log-level", "warning"]
        extra += [x for s in args.set for x in ("--set", s)]
        cluster = LocalCluster(
            Path(tmp) / "cluster",
            postgres_dsn=_via(DSN, proxies["postgres"]) if "postgres" in proxies else DSN,
            redis_url=_via(REDIS, proxies["redis"]) if "redis" in proxies else REDIS,
            postgres_schema=f"im_soak_{tag}",
            redis_prefix=f"im-soak-{tag}:",
            amqp_url=args.amqp,
            base_port=_free_base(),
            extra=extra,
        )
        api = f"http://127.0.0.1:{cluster.base_port}"
    ctx = mp.get_context("spawn")
    workers: list[Any] = []
    control = ctx.Event()
    out: Any = ctx.Queue()
    totals = Totals()
    results: dict[int, dict[str, Any]] = {}
    csv_file = open(out_dir / "soak.csv", "w", newline="")  # noqa: SIM115  (closed in finally)
    try:
        if cluster is not None:
            print(f"soak: starting a cluster in {tmp} (schema {cluster.postgres_schema})", flush=True)
            cluster.start()
            urls = cluster.metrics_urls()
            for name, node in cluster.nodes.items():
                assert node.proc is not None
                procs.append(Proc(name, node.proc.pid, urls.get(name)))
            if cluster.etcd is not None and cluster.etcd.proc is not None:
                procs.append(Proc("etcd", cluster.etcd.proc.pid))
        n_users = args.connections - args.connections % 2
        print(f"soak: registering {n_users} users", flush=True)
        t = time.monotonic()
        made = await create_users(api, n_users, f"soak{uuid.uuid4().hex[:6]}_", concurrency=32)
        users = [SoakUser(u.uid, u.username, u.token) for u in made]
        print(f"soak: {n_users} users in {time.monotonic() - t:.1f}s; starting {args.procs} client processes")
        pairs = [(users[i], users[i + 1]) for i in range(0, n_users, 2)]
        for w in range(args.procs):
            cfg = ClientConfig(
                index=w,
                api=api,
                password=PASSWORD,
                pairs=pairs[w :: args.procs],
                rate=args.rate / args.procs,
                churn_every=args.churn_every,
                churn_fraction=args.churn_fraction,
                transport=args.transport,
                body_size=args.body_size,
                drain=args.drain,
            )
            worker = ctx.Process(target=clients_main, args=(cfg, control, out), name=f"soak-clients-{w}")
            worker.start()
            workers.append(worker)
            assert worker.pid is not None
            procs.append(Proc(f"client-{w}", worker.pid))
        ready: set[int] = set()
        deadline = time.monotonic() + 600
        while len(ready) < len(workers):
            try:
                kind, index, payload = out.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline or not all(p.is_alive() for p in workers):
                    raise RuntimeError("client processes did not get ready") from None
                continue
            if kind == "error":
                raise RuntimeError(f"client process {index} failed:\n{payload}")
            if kind == "ready":
                ready.add(index)
                print(f"soak: client process {index} holds {payload['held']} connections", flush=True)
        totals.started = time.monotonic()
        names = [p.name for p in procs]
        fields = ["t", "phase", "held", "sent", "acked", "delivered", "churned", "reconnects", "outbox", "faults"]
        keys = ("pid", "rss_mib", "fds", "tasks", "conns", "committed")
        fields += ["anomalies"] + [f"{n}.{k}" for n in names for k in keys]
        writer = csv.DictWriter(csv_file, fieldnames=fields)
        writer.writeheader()
        rows: list[dict[str, Any]] = []
        stop_faults = asyncio.Event()
        faults = asyncio.create_task(fault_loop(args, cluster, proxies, totals, stop_faults)) if cluster else None
        end = totals.started + args.minutes * 60
        async with httpx.AsyncClient() as http:
            while time.monotonic() < end:
                await asyncio.sleep(min(args.interval, max(0.0, end - time.monotonic())))
                drain_queue(out, totals, results, workers)
                await monitor(args, procs, cluster, totals, writer, rows, http, "load")
                csv_file.flush()
            stop_faults.set()
            if faults is not None:
                await faults
            control.set()
            print("soak: load over; draining and checking the stored logs", flush=True)
            deadline = time.monotonic() + args.drain + 600
            while len(results) < len(workers) and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                drain_queue(out, totals, results, workers)
            await monitor(args, procs, cluster, totals, writer, rows, http, "end")
        for p in workers:
            p.join(timeout=30)
        return report(args, out_dir, procs, rows, totals, results, len(workers))
    finally:
        csv_file.close()
        control.set()
        for p in workers:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if cluster is not None:
            codes = cluster.stop()
            bad = {n: c for n, c in codes.items() if c != 0}
            if bad:
                print(f"soak: nodes that did not stop cleanly: {bad}", flush=True)
            if cluster.etcd is not None:
                cluster.etcd.destroy()
            conn = await asyncpg.connect(DSN)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{cluster.postgres_schema}" CASCADE')
            finally:
                await conn.close()
            for proxy in proxies.values():
                proxy.close()
            if not args.keep and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp is not None:
                print(f"soak: cluster data and logs kept in {tmp}", flush=True)


def report(
    args: argparse.Namespace,
    out_dir: Path,
    procs: list[Proc],
    rows: list[dict[str, Any]],
    totals: Totals,
    results: dict[int, dict[str, Any]],
    n_workers: int,
) -> int:
    def total(key: str) -> int:
        return sum(int(r.get(key, 0)) for r in results.values())

    verdict = {
        "client_processes_reported": len(results),
        "lost": total("lost"),
        "duplicated": total("duplicated"),
        "out_of_order": total("out_of_order"),
        "mismatched": total("mismatched"),
        "refused": total("refused"),
        "unacked_at_end": total("unacked"),
        "log_problems": sum(len(r["log_problems"]) for r in results.values()),
        "drained": all(r["drained"] for r in results.values()),
    }
    load_rows = [r for r in rows if r["phase"] == "load"]
    outages = sorted(x for r in results.values() for x in r["outages"])

    def pct(q: float) -> float | None:
        return round(outages[min(len(outages) - 1, int(q * len(outages)))], 2) if outages else None

    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("pid", "metrics")},
        "minutes": args.minutes,
        "connections": args.connections,
        "held_min": min((r["held"] for r in load_rows), default=0),
        "held_max": max((r["held"] for r in load_rows), default=0),
        "sent": total("sent"),
        "acked": total("acked"),
        "delivered": total("delivered"),
        "stored": total("stored"),
        "churned": total("churned"),
        "reconnects_after_faults": total("reconnects"),
        "connect_failures": total("connect_failures"),
        "retried_refusals": total("retried"),
        "outages": {"count": len(outages), "p50_s": pct(0.5), "p99_s": pct(0.99), "max_s": pct(1.0)},
        "faults": totals.faults,
        "fault_log": totals.fault_log,
        "verdict": verdict,
        "slopes": slopes(rows, [p.name for p in procs], args.warmup),
        "examples": [e for r in results.values() for e in r["examples"]][:20],
        "log_problem_examples": [e for r in results.values() for e in r["log_problems"]][:20],
        "problems": [e for r in results.values() for e in r["problems"]][:30],
    }
    (out_dir / "soak.json").write_text(json.dumps(summary, indent=2))
    write_svg(out_dir / "soak.svg", load_rows, [p.name for p in procs], totals.fault_log, args.warmup)
    print(
        f"soak: {args.minutes:g} min, {args.connections} connections (held {summary['held_min']}..{summary['held_max']}"
        f"), sent {summary['sent']}, acked {summary['acked']}, delivered {summary['delivered']}, stored "
        f"{summary['stored']}, churned {summary['churned']}, reconnects after faults "
        f"{summary['reconnects_after_faults']}, faults {totals.faults}"
    )
    print(f"soak: verdict {json.dumps(verdict)}")
    print(f"soak: back after a fault (disconnect to synced again): {json.dumps(summary['outages'])}")
    print(f"soak: {'process':<10} {'minutes':>7} {'RSS MiB':>15} {'MiB/min':>8} {'fds':>11} {'fds/min':>8} tasks/min")

    def f(x: Any, spec: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    for name, s in summary["slopes"].items():
        rss = f"{f(s['rss_first_mib'], '.0f'):>6} -> {f(s['rss_last_mib'], '.0f'):<6}"
        fd = f"{f(s['fds_first'], 'd'):>4} -> {f(s['fds_last'], 'd'):<4}"
        print(
            f"soak: {name:<10} {s['minutes']:>7.1f} {rss} {f(s['rss_mib_per_min'], '+.3f'):>8} {fd} "
            f"{f(s['fds_per_min'], '+.2f'):>8} {f(s['tasks_per_min'], '+.2f')}"
            + (f"  ({s['lives']} lives: the longest)" if s["lives"] > 1 else "")
        )
    for name, s in summary["slopes"].items():
        extra = [f"2nd half RSS {f(s['rss_mib_per_min_2nd_half'], '+.3f')} MiB/min"]
        if s["fds_not_connections_per_min"] is not None:
            extra.append(f"fds - connections {f(s['fds_not_connections_per_min'], '+.2f')}/min")
        if s["rss_mib_per_min_at_equal_connections"] is not None:
            extra.append(
                f"RSS at equal connections {f(s['rss_mib_per_min_at_equal_connections'], '+.3f')} MiB/min"
                f" ({f(s['rss_kib_per_connection'], '.1f')} KiB per connection)"
            )
        if s["committed"]:
            extra.append(f"committed {s['committed']:.0f}")
        print(f"soak: {name:<10} from minute {f(s['from_minute'], '.1f')}: " + ", ".join(extra))
    for text in summary["examples"] + summary["log_problem_examples"] + summary["problems"]:
        print(f"soak: ! {text}")
    print(f"soak: wrote {out_dir / 'soak.csv'}, {out_dir / 'soak.svg'}, {out_dir / 'soak.json'}")
    bad = (
        len(results) < n_workers
        or verdict["lost"]
        or verdict["duplicated"]
        or verdict["out_of_order"]
        or verdict["mismatched"]
        or verdict["refused"]
        or verdict["unacked_at_end"]
        or verdict["log_problems"]
    )
    print(f"soak: {'ANOMALIES FOUND' if bad else 'no anomaly: nothing lost, duplicated or out of order'}")
    return 1 if bad else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/soak.py",
        description="Hold N connections on a cluster for M minutes with churn, messages and faults; watch memory, "
        "descriptors and tasks; check every delivery.",
    )
    p.add_argument("--connections", type=int, default=2000, help="connections held (an even number; default 2000)")
    p.add_argument("--minutes", type=float, default=15.0, help="length of the load (default 15)")
    p.add_argument("--rate", type=float, default=200.0, help="messages/s in total (default 200)")
    p.add_argument("--body-size", type=int, default=100, help="message body, characters (default 100)")
    p.add_argument("--transport", choices=["ws", "tcp", "mixed"], default="mixed", help="default: half each")
    p.add_argument("--churn-every", type=float, default=5.0, help="seconds between churns (default 5)")
    p.add_argument(
        "--churn-fraction", type=float, default=0.02, help="connections closed and reopened per churn (default 0.02)"
    )
    p.add_argument("--faults", default=DEFAULT_FAULTS, help=f"ACTION:NODE,... or none (default {DEFAULT_FAULTS})")
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults (default 60)")
    p.add_argument("--down", type=float, default=3.0, help="seconds a killed node stays down (default 3)")
    p.add_argument("--cut", type=float, default=5.0, help="seconds an engine stays cut off (default 5)")
    p.add_argument("--pause", type=float, default=2.5, help="seconds a paused node stays stopped (default 2.5)")
    p.add_argument("--registry-ttl", type=int, default=4, help="registry.ttl of the spawned cluster (default 4)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--warmup", type=float, default=120.0, help="seconds left out of the slopes (default 120)")
    p.add_argument("--drain", type=float, default=120.0, help="seconds to wait for the last messages (default 120)")
    p.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--out", default="soak-out", help="directory for soak.csv, soak.svg, soak.json")
    p.add_argument("--amqp", default=None, help="RabbitMQ URL: the spawned cluster's event pipeline on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every node")
    p.add_argument("--keep", action="store_true", help="keep the spawned cluster's data directory and logs")
    p.add_argument("--api", help="attach to a running server or cluster (its HTTP root) instead of spawning one")
    p.add_argument("--pid", action="append", default=[], metavar="NAME=PID", help="with --api: a process to watch")
    p.add_argument(
        "--metrics", action="append", default=[], metavar="NAME=URL", help="with --api: the /metrics of a --pid"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.connections < 2 or args.procs < 1 or args.rate < 0 or not 0 <= args.churn_fraction <= 1:
        ap.error("--connections >= 2, --procs >= 1, --rate >= 0, 0 <= --churn-fraction <= 1")
    if args.api and args.faults != "none":
        ap.error("faults need the spawned cluster: give --faults none with --api")
    if args.faults != "none":
        for item in args.faults.split(","):
            action, _, node = item.partition(":")
            if action == "cut" and node not in ENGINES:
                ap.error(f"--faults: {item!r}: cut:ENGINE takes one of {', '.join(ENGINES)}")
            if action not in ("kill", "pause", "term", "cut") or not node:
                ap.error(f"--faults: {item!r} is not kill:NODE, pause:NODE, term:NODE or cut:ENGINE")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
