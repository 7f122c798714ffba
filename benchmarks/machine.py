"""What this machine charges for the operations im's hot path is made of, printed as figures: a calibration to
run beside every performance comparison (`im bench` before/after), because the same code's figures move
from one day's virtual machine to the next.

    uv run python benchmarks/machine.py

Measured on 2026-12-05 (a 2-core VM): a pure-Python loop and AES-GCM were about 15 % slower than on the
earlier days, but a hand-off to a thread and back cost 20 µs and ``run_in_executor`` 148 µs, and `im bench`
(10 pairs, window 16) gave 88 server CPU-ms per 1,000 messages both on the current code and on a commit that
gave 30.8 on 2026-12-05 morning: cross-thread wake-ups, not im's Python, made the difference. Compare
figures only within one session, with this script's output beside them.

The last rows time the same operations after the machine sat idle for 10 ms, as each message meets them
at a low rate (`im bench --rate 1000`): on a VM whose idle vCPU halts, a wake-up costs several times
more, and so does an fsync (2026-12-07: a loopback round trip to another process 28 µs at the median
when busy, 78 after 10 ms idle; fdatasync 140 µs when busy, 326 after idle, 811 at p99). They are the
latency floor under a low rate, whatever the server does.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import uvloop
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def per_op(fn: Callable[[int], None], n: int, rounds: int = 3) -> float:
    """Median over ``rounds`` of the microseconds one of ``n`` operations takes."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn(n)
        times.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(times)


def python_loop(n: int) -> None:
    x = 0
    for i in range(n):
        x += i


def aes_gcm(n: int) -> None:
    aead, nonce, body = AESGCM(AESGCM.generate_key(256)), os.urandom(12), os.urandom(200)
    for _ in range(n):
        aead.encrypt(nonce, body, b"conv|seq|mid")


def syscall(n: int) -> None:
    for _ in range(n):
        os.getppid()


def loopback_tcp(n: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            for _ in range(n):
                client.send(b"x" * 100)
                peer.recv(200)


def thread_ping_pong(n: int) -> None:
    there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (item := there.get()) is not None:
            back.put(item)

    worker = threading.Thread(target=echo)
    worker.start()
    for i in range(n):
        there.put(i)
        back.get()
    there.put(None)
    worker.join()


def executor_round_trip(n: int) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            await loop.run_in_executor(None, int)

    uvloop.run(run())


def fdatasync(n: int) -> None:
    with tempfile.NamedTemporaryFile(dir=os.environ.get("IM_BENCH_DIR")) as f:
        for _ in range(n):
            f.write(b"x" * 4096)
            f.flush()
            os.fdatasync(f.fileno())


def after_idle(op: Callable[[], None], n: int = 200, idle: float = 0.01) -> tuple[float, float]:
    """Median and p99 in microseconds of ``op`` run after ``idle`` seconds of sleep, ``n`` times."""
    times = []
    for _ in range(n):
        time.sleep(idle)
        started = time.perf_counter()
        op()
        times.append((time.perf_counter() - started) * 1e6)
    return statistics.median(times), statistics.quantiles(times, n=100)[98]


def idle_wake_ups() -> list[tuple[str, tuple[float, float]]]:
    """A loopback round trip to another process and a 4 KiB fdatasync, each after 10 ms of idle."""
    here, there = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echoing process
        here.close()
        while data := there.recv(16):
            there.send(data)
        os._exit(0)
    there.close()

    def round_trip() -> None:
        here.send(b"x")
        here.recv(16)

    with here, tempfile.NamedTemporaryFile(dir=os.environ.get("IM_BENCH_DIR")) as f:

        def sync() -> None:
            os.pwrite(f.fileno(), b"x" * 4096, 0)
            os.fdatasync(f.fileno())

        rows = [("round trip to another process", after_idle(round_trip)), ("fdatasync of 4 KiB", after_idle(sync))]
    os.waitpid(pid, 0)
    return rows


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.2f}; CPUs {os.cpu_count()}")
    rows = [
        ("Python loop iteration", python_loop, 2_000_000),
        ("AES-256-GCM seal, 200 bytes", aes_gcm, 100_000),
        ("syscall (getppid)", syscall, 200_000),
        ("loopback TCP send + recv, 100 bytes", loopback_tcp, 50_000),
        ("thread hand-off and back (queue)", thread_ping_pong, 20_000),
        ("run_in_executor round trip (uvloop)", executor_round_trip, 5_000),
        ("fdatasync of 4 KiB", fdatasync, 300),
    ]
    for name, fn, n in rows:
        print(f"{name:40} {per_op(fn, n):10.3f} µs")
    print("after 10 ms idle (median / p99):")
    for name, (median, p99) in idle_wake_ups():
        print(f"  {name:38} {median:10.1f} / {p99:.1f} µs")


if __name__ == "__main__":
    main()
