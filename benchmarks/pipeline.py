"""CPU per message of im's own Python path, without sockets: the ``im serve`` wiring (its default
configuration: SQLite with every commit fsync'd, encryption at rest on) with connections over an
in-memory transport, driven closed-loop like ``im bench`` (``--pairs`` senders, ``--window`` sends in
flight each).

What it leaves out: WebSocket/TCP framing and the sockets (``im bench`` measures those with the rest).
What it keeps: frame decoding, the session, the committer (checks, seqs, dedupe, sealing, the SQLite
commit in its writer thread), routing, delivery, frame encoding, acks. The figure is process CPU time
(every thread) per message, the median of ``--rounds`` rounds; its spread is much smaller than
``im bench``'s on a shared machine, so it can show a change of a few percent.

    uv run python benchmarks/pipeline.py --pairs 10 --window 16 --messages 40000 --rounds 5
    uv run python benchmarks/pipeline.py --profile out.txt   # py-spy-free: cProfile of one round
    uv run python benchmarks/pipeline.py --set encryption.enabled=false   # a setting changed (repeatable)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import glob
import os
import pstats
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import uvloop

from im.bench.server import BENCH_SERVER_SETTINGS
from im.cli import tune_gc
from im.config import load_config, put_setting
from im.gateway.hub import Connection, Hub
from im.model.errors import ErrorCode
from im.server import EmbeddedServer


class MemoryConnection(Connection):
    """A connection whose transport is a list: frames the hub writes are counted, not parsed (only the
    first bytes are looked at, so the driver costs little of the measured CPU)."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.acks = 0
        self.msgs = 0
        self.first: list[bytes] = []
        self.waiting: asyncio.Future[None] | None = None
        self.want = 0
        self.kind = "acks"

    def write(self, frames: list[bytes], binary: bool) -> None:
        for f in frames:
            head = f[:12]
            if head.startswith(b'{"t":"ack"'):
                self.acks += 1
            elif head.startswith(b'{"t":"msg"'):
                self.msgs += 1
            elif len(self.first) < 8:
                self.first.append(f)
        if self.waiting is not None and not self.waiting.done() and self.count() >= self.want:
            self.waiting.set_result(None)

    async def until(self, count: int, kind: str) -> None:
        """Until ``kind`` (``acks`` or ``msgs``) frames written reach ``count``."""
        self.kind = kind
        if self.count() >= count:
            return
        self.want = count
        self.waiting = asyncio.get_running_loop().create_future()
        await self.waiting

    def count(self) -> int:
        return self.acks if self.kind == "acks" else self.msgs

    def close_transport(self, code: ErrorCode) -> None:
        self.on_closed()

    def buffered(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def send(self, frame: dict[str, object]) -> None:
        self.on_data(msgspec.json.encode(frame), False)


def settings(data_dir: str, extra: list[str]) -> dict[str, object]:
    """``im serve``'s overrides as ``im bench`` spawns it (BENCH_SERVER_SETTINGS), in ``data_dir``, then
    ``extra`` (``KEY=VALUE`` each, as ``im serve --set``)."""
    out: dict[str, object] = {"data_dir": data_dir, "log_level": "warning"}
    for item in [*BENCH_SERVER_SETTINGS, *extra]:
        key, _, value = item.partition("=")
        put_setting(out, key, value)
    return out


async def sender(conn: MemoryConnection, to: int, tag: str, count: int, window: int, body: str) -> None:
    """Keep ``window`` sends in flight until ``count`` were acked."""
    sent = 0
    while sent < count:
        burst = min(window - (sent - conn.acks), count - sent)
        for _ in range(burst):
            conn.send({"t": "send", "cmid": f"{tag}-{sent}", "to": to, "body": {"text": body}})
            sent += 1
        await conn.until(conn.acks + 1 if sent < count else count, "acks")


async def one_round(
    server: EmbeddedServer, users: list[tuple[int, str]], per_sender: int, window: int
) -> tuple[float, float]:
    """The process's CPU seconds for the round, and the event loop's thread's share (the rest is the
    SQLite threads', writer and readers)."""
    hub = server.hub
    conns = []
    for uid, token in users:
        c = MemoryConnection(hub)
        hub.add(c)
        c.send({"t": "auth", "token": token, "device": "bench"})  # resumes from its cursors
        conns.append((uid, c))
    for _, c in conns:
        for _ in range(5000):
            if any(b'"synced"' in f for f in c.first):
                break
            await asyncio.sleep(0.001)
        else:
            raise RuntimeError(f"no synced frame: {c.first}")
    pairs = [(conns[i], conns[i + 1]) for i in range(0, len(conns), 2)]
    body = "x" * 100
    cpu0, loop0 = time.process_time(), time.thread_time()
    await asyncio.gather(
        *(sender(a[1], b[0], f"r{time.monotonic_ns()}-{a[0]}", per_sender, window, body) for a, b in pairs)
    )
    await asyncio.gather(*(b.until(per_sender, "msgs") for _, (_, b) in pairs))
    cpu, loop = time.process_time() - cpu0, time.thread_time() - loop0
    for _, c in conns:
        c.close_transport(ErrorCode.SHUTDOWN)
    return cpu, loop


def callgrind_control(*args: str) -> None:
    """Valgrind takes the command at its next poll, which needs this process running: spin, not wait."""
    proc = subprocess.Popen(["callgrind_control", *args, str(os.getpid())], stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        spin(0.01)
    if proc.returncode:
        raise RuntimeError(f"callgrind_control {' '.join(args)}: exit {proc.returncode}")


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def callgrind_instructions(out_file: str) -> int:
    """Instructions counted since the last zeroing: dumped now, read from the newest dump file."""
    before = set(glob.glob(f"{out_file}.*"))
    callgrind_control("--dump")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the dump file appears, then fills, at valgrind's next polls
        for path in set(glob.glob(f"{out_file}.*")) - before:
            for line in Path(path).read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        spin(0.1)
    raise RuntimeError(f"no callgrind dump in {out_file}.*")


@contextlib.asynccontextmanager
async def running_server(extra: list[str], prefix: str) -> AsyncIterator[EmbeddedServer]:
    """``im serve``'s wiring (its settings as ``im bench`` spawns it, then ``extra``), started in a temporary
    data directory, without its listeners; stopped as ``im serve`` stops."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        server = EmbeddedServer(load_config(overrides=settings(str(Path(tmp) / "data"), extra)))
        b = server.backends
        await b.start()
        await server.node_ids.start()
        await server.files.start()
        server.hub.start()
        server.committer.start()
        tune_gc()  # as im serve does
        try:
            yield server
        finally:
            server.hub.pause_all()
            await server.committer.stop()
            await server.hub.drain_and_close()
            await server.files.close()
            await server.node_ids.close()
            await b.close()


async def main(args: argparse.Namespace) -> None:
    async with running_server(args.set, "im-pipeline-") as server:

        async def fresh_users(tag: str) -> list[tuple[int, str]]:
            """New users each round: no history to replay, nothing cached from the round before."""
            users = []
            for i in range(2 * args.pairs):
                await server.accounts.register(f"{tag}u{i}", "password123")
                login = await server.accounts.login(f"{tag}u{i}", "password123")
                users.append((login.uid, login.access_token))
            return users

        per_sender = args.messages // args.pairs
        await one_round(server, await fresh_users("warm"), min(per_sender, 2000), args.window)
        figures, loop_figures = [], []
        for r in range(args.rounds):
            profiler = cProfile.Profile() if args.profile and r == 0 else None
            users = await fresh_users(f"r{r}")
            if profiler:
                profiler.enable()
            if args.callgrind:
                callgrind_control("--zero")
            cpu, loop = await one_round(server, users, per_sender, args.window)
            if args.callgrind:
                instructions = callgrind_instructions(args.callgrind)
                print(f"round {r + 1}: {instructions / (per_sender * args.pairs):,.0f} instructions per message")
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").dump_stats(args.profile)
            figures.append(1e6 * cpu / (per_sender * args.pairs))
            loop_figures.append(1e6 * loop / (per_sender * args.pairs))
            print(
                f"round {r + 1}: {figures[-1]:.1f} us CPU per message ({loop_figures[-1]:.1f} on the loop thread)",
                flush=True,
            )
        print(
            f"pipeline: {args.pairs} pairs, window {args.window}, {per_sender * args.pairs} messages/round:"
            f" median {statistics.median(figures):.1f} us CPU per message (min {min(figures):.1f});"
            f" loop thread {statistics.median(loop_figures):.1f}, other threads"
            f" {statistics.median(f - x for f, x in zip(figures, loop_figures, strict=True)):.1f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--messages", type=int, default=40_000, help="messages per round, over all senders")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", metavar="FILE", help="cProfile the first measured round into FILE (pstats)")
    parser.add_argument(
        "--callgrind",
        metavar="OUT_FILE",
        help="under valgrind --tool=callgrind --callgrind-out-file=OUT_FILE: also count the instructions of"
        " each measured round (deterministic where CPU time drifts; valgrind runs the threads one at a time)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, as im serve --set (repeatable)"
    )
    uvloop.run(main(parser.parse_args()))
