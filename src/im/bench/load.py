"""``im bench`` (load): set up users and conversations, run the client processes, measure, report.

The parent process creates the accounts (and groups) through the HTTP API, splits the conversations over
``procs`` client processes (:mod:`im.bench.worker`), starts them together, shows a live progress bar, and
reads the server's CPU time (/proc/<pid>/stat) at the start and the end of the measured interval. The
client processes count; the parent adds up and reports.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import multiprocessing as mp
import os
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from im import compiled
from im.bench.accounts import BenchTls, BenchUser, assign_gateways, create_groups, create_users, gateway, run_id
from im.bench.anomalies import Anomalies
from im.bench.server import EngineCpu, MachineCpu, SpawnedServer, cpu_seconds, raise_nofile
from im.bench.worker import CONNECT_CONCURRENCY, COUNTERS, ConvPlan, WorkerConfig, worker_main

#: TLS handshakes the bench keeps in flight at once, all its processes together: a server closes those
#: past its ``tls.max_handshakes_per_address`` (this is its default) at once, and the bench connects from
#: one address.
TLS_CONNECTS = 32

__all__ = ["LoadOptions", "run_load"]


@dataclass
class LoadOptions:
    pairs: int = 10
    groups: int = 0  # > 0: group mode (``groups`` groups of ``group_size``), else pairs
    group_size: int = 5
    group_senders: int = 1
    window: int = 16
    rate: float = 0.0  # > 0: fixed offered rate (msgs/s in total) instead of the closed loop
    transport: str = "ws"  # ws | tcp | mixed
    encoding: str = "json"
    body_size: int = 100
    duration: float = 10.0
    warmup: float = 2.0
    drain: float = 10.0
    procs: int = 2
    server: str | None = None  # None: spawn one
    server_pids: list[int] = field(default_factory=list)  # empty: unknown (or the spawned one)
    server_settings: list[str] = field(default_factory=list)
    progress: bool = True
    #: TLS options of the clients (with ``spawn_tls`` the spawned server's CA is trusted instead).
    tls: BenchTls = field(default_factory=BenchTls)
    #: Spawn the server with TLS on (a CA and a certificate made for the run).
    spawn_tls: bool = False


def _kinds(transport: str, n: int, offset: int) -> list[str]:
    if transport == "mixed":  # alternate, so that half the messages cross from one gateway to the other
        return ["ws" if (i + offset) % 2 == 0 else "tcp" for i in range(n)]
    return [transport] * n


def _plans(opts: LoadOptions, users: list[BenchUser], convs: list[str] | None) -> list[ConvPlan]:
    plans: list[ConvPlan] = []
    if opts.groups:
        size = opts.group_size
        assert convs is not None
        for g in range(opts.groups):
            members = users[g * size : (g + 1) * size]
            plans.append(ConvPlan(convs[g], members, _kinds(opts.transport, size, g), list(range(opts.group_senders))))
    else:
        for p in range(opts.pairs):
            a, b = users[2 * p], users[2 * p + 1]
            conv = f"d:{min(a.uid, b.uid)}:{max(a.uid, b.uid)}"
            plans.append(ConvPlan(conv, [a, b], _kinds(opts.transport, 2, p), [0]))
    return plans


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


class _Display:
    """The live progress bar (rich, on stderr), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Display:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description:<10}"),
                BarColumn(bar_width=30),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                refresh_per_second=4,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def task(self, description: str, total: float) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(self._task, completed=self._progress.tasks[self._task].total)
            self._task = self._progress.add_task(description, total=total, info="")

    def update(self, completed: float, info: str = "", description: str | None = None) -> None:
        if self._progress is not None and self._task is not None:
            kw: dict[str, Any] = {"completed": completed, "info": info}
            if description is not None:
                kw["description"] = description
            self._progress.update(self._task, **kw)

    def log(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)


def run_load(opts: LoadOptions) -> dict[str, Any]:
    """Run one load test and return its results (the ``--json`` document)."""
    raise_nofile()  # the spawned server and the client processes inherit it
    spawned: SpawnedServer | None = None
    server_pids: list[int]
    if opts.server is None:
        spawned = SpawnedServer(settings=list(opts.server_settings), tls=opts.spawn_tls).start()
        base, server_pids = spawned.http, [spawned.pid]
        if spawned.ca_file is not None:
            opts = dataclasses.replace(opts, tls=BenchTls(ca_file=spawned.ca_file))
    else:
        base, server_pids = opts.server, list(opts.server_pids)
    assert base is not None
    try:
        with _Display(opts.progress) as display:
            return _run(opts, base, server_pids, display, spawned)
    finally:
        if spawned is not None:
            spawned.stop()


def _run(
    opts: LoadOptions, base: str, server_pids: list[int], display: _Display, spawned: SpawnedServer | None
) -> dict[str, Any]:
    n_users = opts.groups * opts.group_size if opts.groups else 2 * opts.pairs
    prefix = f"b{run_id()}_"
    display.task("accounts", n_users)
    made = [0]

    def account_made(k: int) -> None:
        made[0] += k
        display.update(made[0], f"{made[0]}/{n_users} users")

    async def setup() -> tuple[list[BenchUser], list[str] | None, str, str | None]:
        tls = opts.tls
        users = await create_users(base, n_users, prefix, progress=account_made, tls=tls)
        convs = None
        if opts.groups:
            groups = [users[g * opts.group_size : (g + 1) * opts.group_size] for g in range(opts.groups)]
            convs = await create_groups(base, groups, prefix, tls=tls)
        gw = await gateway(base, users[0], tls=tls)
        users = await assign_gateways(base, users, tls=tls)
        return users, convs, gw.ws, gw.tcp

    users, convs, ws_url, tcp_url = asyncio.run(setup())
    plans = _plans(opts, users, convs)
    procs = max(1, min(opts.procs, len(plans)))
    chunks = [plans[i::procs] for i in range(procs)]
    total_senders = sum(len(p.senders) for p in plans)

    ctx = mp.get_context("spawn")
    counters = ctx.RawArray("q", COUNTERS * procs)
    times = ctx.RawArray("d", 3)
    go = ctx.Event()
    out: Any = ctx.Queue()
    workers = []
    for i, chunk in enumerate(chunks):
        senders = sum(len(p.senders) for p in chunk)
        cfg = WorkerConfig(
            index=i,
            ws_url=ws_url,
            tcp_url=tcp_url,
            encoding=opts.encoding,
            window=0 if opts.rate else opts.window,
            rate=opts.rate * senders / total_senders if opts.rate else 0.0,
            body_size=opts.body_size,
            drain=opts.drain,
            connect_concurrency=max(1, TLS_CONNECTS // procs) if ws_url.startswith("wss://") else CONNECT_CONCURRENCY,
            tls=opts.tls,
        )
        w = ctx.Process(target=worker_main, args=(cfg, chunk, counters, times, go, out), name=f"im-bench-{i}")
        w.start()
        workers.append(w)
    results: dict[int, dict[str, Any]] = {}
    try:
        connections = sum(len(p.members) for p in plans)
        display.task("connect", procs)
        ready = 0
        while ready < procs:
            kind, index, payload = _get(out, workers, 180)
            if kind == "error":
                raise RuntimeError(f"client process {index} failed:\n{payload}")
            ready += 1
            display.update(ready, f"{ready}/{procs} processes ready ({connections} connections)")

        t_go = time.monotonic() + 0.05
        t0, t1 = t_go + opts.warmup, t_go + opts.warmup + opts.duration
        times[0], times[1], times[2] = t_go, t0, t1
        go.set()
        display.task("warmup", opts.warmup + opts.duration)
        series: list[tuple[float, int, int]] = []  # (seconds since go, delivered, acked) every 0.25 s
        cpu0 = cpu1 = 0.0
        busy0 = busy1 = (0.0, 0.0)
        engines0: dict[int, tuple[str, float]] = {}
        engines: dict[str, float] = {}
        clients0: list[float] = []
        clients1: list[float] = []
        measured0 = measured1 = (0, 0)
        phase = "warmup"
        next_sample = t_go
        last = (t_go, 0)
        rate_now = 0.0
        while True:
            now = time.monotonic()
            if phase == "warmup" and now >= t0:
                cpu0 = sum(cpu_seconds(pid) for pid in server_pids)
                busy0 = MachineCpu.busy_seconds()
                engines0 = EngineCpu.snapshot()
                clients0 = [_cpu(w.pid) for w in workers]
                measured0 = _totals(counters, procs)
                phase = "measure"
                display.update(now - t_go, description="measuring")
            if phase == "measure" and now >= t1:
                cpu1 = sum(cpu_seconds(pid) for pid in server_pids)
                busy1 = MachineCpu.busy_seconds()
                engines = EngineCpu.since(engines0)
                clients1 = [_cpu(w.pid) for w in workers]
                measured1 = _totals(counters, procs)
                phase = "drain"
                break
            if now >= next_sample:
                delivered, acked = _totals(counters, procs)
                series.append((now - t_go, delivered, acked))
                if now - last[0] >= 1.0:
                    rate_now = (delivered - last[1]) / (now - last[0])
                    last = (now, delivered)
                display.update(now - t_go, f"{rate_now:>10,.0f} msg/s delivered   {delivered:>11,} total")
                next_sample += 0.25
            wake = min(next_sample, t0 if phase == "warmup" else t1)
            time.sleep(max(0.0, min(0.25, wake - time.monotonic())))
        display.task("drain", procs)
        while len(results) < procs:
            kind, index, payload = _get(out, workers, opts.drain + 60)
            if kind == "error":
                raise RuntimeError(f"client process {index} failed:\n{payload}")
            results[index] = payload
            display.update(len(results), f"{len(results)}/{procs} processes reported")
        series.append((time.monotonic() - t_go, *_totals(counters, procs)))
        for w in workers:
            w.join(timeout=10)
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join(timeout=5)

    elapsed = opts.duration
    delivered = sum(r["delivered_measured"] for r in results.values())
    acked = sum(r["acked_measured"] for r in results.values())
    lat: list[float] = []
    for r in results.values():
        a = array.array("d")
        a.frombytes(r["latencies"])
        stride = r["latency_stride"]  # a process that kept every k-th sample: each stands for k
        lat.extend(a if stride == 1 else [x for x in a for _ in range(stride)])
    lat.sort()
    anomalies = Anomalies()
    for r in results.values():
        anomalies.add(Anomalies(**r["anomalies"], examples=r["examples"]))
    server_cpu = cpu1 - cpu0 if server_pids else None
    clients_cpu = sum(b - a for a, b in zip(clients0, clients1, strict=True))
    machine, irq = busy1[0] - busy0[0], busy1[1] - busy0[1]
    # An engine that used less than 0.5 % of a core is idle background (RabbitMQ's timers, Redis's cron):
    # it stays in "other processes" rather than a row of its own.
    engines = {e: sec for e, sec in engines.items() if sec >= 0.005 * elapsed}
    engines_cpu = sum(engines.values())
    others_cpu = machine - clients_cpu - (server_cpu or 0.0) - engines_cpu
    problems = [p for r in results.values() for p in r["problems"]]
    checks = {
        **anomalies.as_dict(),
        "refused": sum(r["failed"] for r in results.values()),
        "errors": sum(r["errors"] for r in results.values()),
        "disconnects": sum(r["disconnects"] for r in results.values()),
        "unexpected": sum(r["unexpected"] for r in results.values()),
        "mismatched": sum(r["mismatched"] for r in results.values()),
        "unfinished": sum(r["unfinished"] for r in results.values()),
    }
    return {
        "config": {
            "mode": "groups" if opts.groups else "pairs",
            "pairs": 0 if opts.groups else opts.pairs,
            "groups": opts.groups,
            "group_size": opts.group_size if opts.groups else 2,
            "group_senders": opts.group_senders if opts.groups else 1,
            "users": n_users,
            "connections": sum(r["connections"] for r in results.values()),
            "load": f"rate {opts.rate:g}/s" if opts.rate else f"closed loop, window {opts.window}",
            "window": 0 if opts.rate else opts.window,
            "rate": opts.rate,
            "transport": opts.transport,
            "tls": base.startswith("https://"),  # the API (and so the gateways it hands out) over TLS
            "encoding": opts.encoding,
            "body_size": opts.body_size,
            "duration": opts.duration,
            "warmup": opts.warmup,
            "procs": procs,
            "server": "spawned" if spawned is not None else base,
            "server_build": str(compiled.select()) if spawned is not None else None,  # a spawned one runs this tree's
            "server_pids": server_pids,
            "cores": os.cpu_count(),
        },
        "delivered": delivered,
        "acked": acked,
        "delivered_per_s": delivered / elapsed,
        "acked_per_s": acked / elapsed,
        "offered_per_s": opts.rate or None,
        "server_cpu_s": server_cpu,
        "server_cpu_ms_per_1k": (1e6 * server_cpu / delivered) if server_cpu is not None and delivered else None,
        "server_cpu_ms_per_1k_sent": (1e6 * server_cpu / acked) if server_cpu is not None and acked else None,
        "server_cpu_pct": 100 * server_cpu / elapsed if server_cpu is not None else None,
        # The engines' own processes (PostgreSQL, Redis, etcd, RabbitMQ; all of them on this machine), per
        # 1,000 delivered: what the server's figure leaves out when its store or presence is elsewhere.
        "engines_cpu_ms_per_1k": {e: 1e6 * sec / delivered for e, sec in sorted(engines.items())} if delivered else {},
        "server_and_engines_cpu_ms_per_1k": (
            1e6 * (server_cpu + engines_cpu) / delivered if server_cpu is not None and delivered else None
        ),
        "clients_cpu_pct": 100 * clients_cpu / elapsed,
        "engines_cpu_pct": 100 * engines_cpu / elapsed,
        "other_cpu_pct": 100 * others_cpu / elapsed,
        "irq_cpu_pct": 100 * irq / elapsed,
        # more than 15 % of a core went to processes other than the server, its engines and the bench's clients
        "noisy": others_cpu / elapsed > 0.15,
        "latency_ms": {
            "samples": len(lat),
            "p50": 1000 * _percentile(lat, 0.50),
            "p90": 1000 * _percentile(lat, 0.90),
            "p99": 1000 * _percentile(lat, 0.99),
            "max": 1000 * lat[-1] if lat else float("nan"),
        },
        "checks": checks,
        "ok": all(v == 0 for v in checks.values()) and delivered > 0,
        "problems": (anomalies.examples + problems)[:40],
        "totals": {
            "sent": sum(r["sent"] for r in results.values()),
            "delivered": sum(r["delivered"] for r in results.values()),
            "acked": sum(r["acked"] for r in results.values()),
            "retried": sum(r["retried"] for r in results.values()),
            "retried_codes": dict(sum((Counter(r["retried_codes"]) for r in results.values()), Counter())),
            "dup_acks": sum(r["dup_acks"] for r in results.values()),
        },
        "measured": {"delivered_by_counters": measured1[0] - measured0[0]},
        "series": [{"t": round(t, 3), "delivered": d, "acked": a} for t, d, a in series],
        "latencies_ms_sample": [round(1000 * x, 3) for x in lat[:: max(1, len(lat) // 20000)]],
        "_latencies": lat,
    }


def _cpu(pid: int | None) -> float:
    try:
        return cpu_seconds(pid) if pid else 0.0
    except OSError:
        return 0.0


def _totals(counters: Any, procs: int) -> tuple[int, int]:
    return (
        sum(counters[i * COUNTERS] for i in range(procs)),
        sum(counters[i * COUNTERS + 1] for i in range(procs)),
    )


def _get(out: Any, workers: list[Any], timeout: float) -> tuple[str, int, Any]:
    """The next message of a client process; fail early when one died without a word."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            item: tuple[str, int, Any] = out.get(timeout=0.5)
            return item
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"client process {dead[0].name} exited with {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no word from the client processes in {timeout:.0f}s") from None
