"""``im bench idle``: open K authenticated, idle connections and report the server's memory per connection.

The server's resident memory (``VmRSS``) is read before any connection and once all K are authenticated
and caught up (``synced``); the difference divided by K is the cost of one idle connection, everything
included (socket buffers the kernel charges elsewhere are not in it).

One process holds at most ~20k descriptors here, so connections are spread over ``procs`` client
processes (each raises its RLIMIT_NOFILE to the hard limit); and one source address reaches one server
port from at most ~28k ephemeral ports, so beyond ~25k connections they are bound round-robin to
several 127.0.0.x source addresses (each transport's ``local_addr``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import uvloop

from im.bench.accounts import BenchTls, create_users, gateway, run_id
from im.bench.load import _Display, _get
from im.bench.server import SpawnedServer, raise_nofile, rss_bytes
from im.bench.worker import quiet_insecure_warnings
from im.client import Bye, ClientSession, Encoding, Error, Synced, TcpTransport, Transport, WebSocketTransport

__all__ = ["IdleOptions", "run_idle"]

#: Connections per source address before the next one is used (the ephemeral range is ~28k ports).
PER_SOURCE_ADDRESS = 25_000
#: Connections per client process (the descriptor limit is 20k per process).
PER_PROCESS = 15_000


@dataclass
class IdleOptions:
    connections: int = 1000
    transport: str = "ws"  # ws | tcp | mixed
    encoding: str = "json"
    procs: int = 0  # 0: as many as the descriptor limit needs
    devices_per_user: int = 1
    source_addrs: int = 0  # 0: as many as the ephemeral port range needs
    settle: float = 2.0
    hold: float = 0.0
    server: str | None = None
    server_pid: int | None = None
    server_settings: list[str] = field(default_factory=list)
    progress: bool = True
    #: TLS options of the clients (with ``spawn_tls`` the spawned server's CA is trusted instead).
    tls: BenchTls = field(default_factory=BenchTls)
    #: Spawn the server with TLS on (a CA and a certificate made for the run).
    spawn_tls: bool = False


@dataclass(frozen=True)
class _IdleWork:
    index: int
    ws_url: str
    tcp_url: str | None
    encoding: str
    tokens: list[str]  # one per connection
    devices: list[str]
    kinds: list[str]
    source_addrs: list[str]
    concurrency: int = 128
    tls: BenchTls = field(default_factory=BenchTls)


async def _idle_worker(work: _IdleWork, stop: Any, out: Any) -> None:
    raise_nofile()
    enc = Encoding.JSON if work.encoding == "json" else Encoding.MSGPACK
    sem = asyncio.Semaphore(work.concurrency)
    conns: list[tuple[Transport, ClientSession]] = []
    problems: list[str] = []
    failed = 0
    dropped = [0]
    closing = [False]
    heartbeat = [60.0]
    ctx = work.tls.context()  # one for all of this process's connections (used by wss:// and tls://)

    async def drain(t: Transport) -> None:
        while await t.recv() is not None:
            pass
        if not closing[0]:
            dropped[0] += 1

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            kind = work.kinds[i]
            # Spread connections over source addresses: one address reaches one port ~28k times.
            source = work.source_addrs[i % len(work.source_addrs)] if len(work.source_addrs) > 1 else None
            if kind == "tcp":
                assert work.tcp_url is not None
                t: Transport = TcpTransport(
                    work.tcp_url, encoding=enc, connect_timeout=60, local_addr=source, ssl_context=ctx
                )
            else:
                t = WebSocketTransport(
                    work.ws_url, encoding=enc, connect_timeout=60, local_addr=source, ssl_context=ctx
                )
            s = ClientSession(work.devices[i], encoding=enc)
            try:
                await t.connect()
                t.send(s.connect(work.tokens[i]))
                while True:
                    data = await asyncio.wait_for(t.recv(), 60)
                    if data is None:
                        raise ConnectionError("closed before synced")
                    event = s.receive(data)
                    if s.auth_ok is not None:
                        heartbeat[0] = s.auth_ok.heartbeat
                    if isinstance(event, Synced):
                        break
                    if isinstance(event, Error | Bye):
                        raise ConnectionError(f"{type(event).__name__} {event.code}: {event.message}")
            except (OSError, TimeoutError, ConnectionError) as exc:
                failed += 1
                if len(problems) < 10:
                    problems.append(f"connection {work.devices[i]} ({kind}): {type(exc).__name__}: {exc}")
                t.abort()
                return
            conns.append((t, s))
            asyncio.get_running_loop().create_task(drain(t))

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(len(work.tokens))))
    out.put(
        (
            "ready",
            work.index,
            {
                "connected": len(conns),
                "failed": failed,
                "connect_s": time.monotonic() - t0,
                "problems": problems,
            },
        )
    )
    last_ping = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.05)
        if time.monotonic() - last_ping > heartbeat[0] / 3:  # keepalive while held (section 12)
            last_ping = time.monotonic()
            for t, s in conns:
                s.ping()
                with contextlib.suppress(ConnectionError):
                    t.send_many(s.data_to_send())
    closing[0] = True
    for t, _ in conns:
        t.abort()
    await asyncio.sleep(0.1)
    out.put(("closed", work.index, {"dropped": dropped[0]}))


def _idle_main(work: _IdleWork, stop: Any, out: Any) -> None:
    quiet_insecure_warnings(work.tls)
    try:
        uvloop.run(_idle_worker(work, stop, out))
    except BaseException:
        out.put(("error", work.index, traceback.format_exc()))
        raise SystemExit(1) from None


def run_idle(opts: IdleOptions) -> dict[str, Any]:
    raise_nofile()
    spawned: SpawnedServer | None = None
    pid: int | None
    if opts.server is None:
        spawned = SpawnedServer(settings=list(opts.server_settings), tls=opts.spawn_tls).start()
        base, pid = spawned.http, spawned.pid
        if spawned.ca_file is not None:
            opts = dataclasses.replace(opts, tls=BenchTls(ca_file=spawned.ca_file))
    else:
        base, pid = opts.server, opts.server_pid
    assert base is not None
    try:
        with _Display(opts.progress) as display:
            return _run_idle(opts, base, pid, display)
    finally:
        if spawned is not None:
            spawned.stop()


def _run_idle(opts: IdleOptions, base: str, pid: int | None, display: _Display) -> dict[str, Any]:
    k = opts.connections
    n_users = math.ceil(k / max(1, opts.devices_per_user))
    display.task("accounts", n_users)
    made = [0]

    def account_made(n: int) -> None:
        made[0] += n
        display.update(made[0], f"{made[0]:,}/{n_users:,} users")

    tag = run_id()

    async def setup() -> tuple[list[str], str, str | None]:
        users = await create_users(base, n_users, f"i{tag}_", progress=account_made, tls=opts.tls)
        gw = await gateway(base, users[0], tls=opts.tls)
        return [u.token for u in users], gw.ws, gw.tcp

    tokens, ws_url, tcp_url = asyncio.run(setup())
    procs = opts.procs or max(1, math.ceil(k / PER_PROCESS))
    n_addrs = opts.source_addrs or max(1, math.ceil(k / PER_SOURCE_ADDRESS))
    addrs = [f"127.0.0.{i + 1}" for i in range(n_addrs)]
    kinds = [
        "ws" if (opts.transport == "ws" or (opts.transport == "mixed" and i % 2 == 0)) else "tcp" for i in range(k)
    ]
    time.sleep(opts.settle)
    rss_before = rss_bytes(pid) if pid else None

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    out: Any = ctx.Queue()
    workers = []
    for w in range(procs):
        idx = list(range(w, k, procs))
        work = _IdleWork(
            index=w,
            ws_url=ws_url,
            tcp_url=tcp_url,
            encoding=opts.encoding,
            tokens=[tokens[i // opts.devices_per_user] for i in idx],
            devices=[f"idle-{tag}-{i}" for i in idx],
            kinds=[kinds[i] for i in idx],
            source_addrs=addrs,
            tls=opts.tls,
        )
        p = ctx.Process(target=_idle_main, args=(work, stop, out), name=f"im-bench-idle-{w}")
        p.start()
        workers.append(p)
    ready: dict[int, dict[str, Any]] = {}
    rss_after = rss_closed = None
    try:
        display.task("connect", procs)
        while len(ready) < procs:
            kind, index, payload = _get(out, workers, 600)
            if kind == "error":
                raise RuntimeError(f"client process {index} failed:\n{payload}")
            ready[index] = payload
            connected = sum(r["connected"] for r in ready.values())
            display.update(len(ready), f"{len(ready)}/{procs} processes done, {connected:,} connections")
        connect_s = max(r["connect_s"] for r in ready.values())  # in the client processes, spawn excluded
        display.task("settle", opts.settle + opts.hold)
        end = time.monotonic() + opts.settle + opts.hold
        while time.monotonic() < end:
            display.update(opts.settle + opts.hold - (end - time.monotonic()))
            time.sleep(0.25)
        rss_after = rss_bytes(pid) if pid else None
        stop.set()
        closed: dict[int, dict[str, Any]] = {}
        while len(closed) < procs:
            kind, index, payload = _get(out, workers, 120)
            if kind == "error":
                raise RuntimeError(f"client process {index} failed:\n{payload}")
            if kind == "closed":
                closed[index] = payload
        for p in workers:
            p.join(timeout=10)
        time.sleep(1.0)
        rss_closed = rss_bytes(pid) if pid else None
    finally:
        stop.set()
        for p in workers:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    connected = sum(r["connected"] for r in ready.values())
    failed = sum(r["failed"] for r in ready.values())
    dropped = sum(c["dropped"] for c in closed.values())
    per_conn = (rss_after - rss_before) / connected if rss_after is not None and rss_before and connected else None
    return {
        "config": {
            "connections": k,
            "transport": opts.transport,
            "encoding": opts.encoding,
            "procs": procs,
            "users": n_users,
            "devices_per_user": opts.devices_per_user,
            "source_addrs": addrs,
            "server": base if opts.server else "spawned",
            "server_pid": pid,
        },
        "connected": connected,
        "failed": failed,
        "dropped": dropped,
        "connect_s": connect_s,
        "connect_per_s": connected / connect_s if connect_s else 0.0,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_closed": rss_closed,
        "bytes_per_connection": per_conn,
        "kib_per_connection": per_conn / 1024 if per_conn is not None else None,
        "ok": failed == 0 and dropped == 0 and connected == k,
        "problems": [p for r in ready.values() for p in r["problems"]][:20],
    }
