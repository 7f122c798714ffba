"""CPU and store reads of logins that replay many conversations: the ``im serve`` wiring (as
``benchmarks/pipeline.py``: its default configuration, connections over an in-memory transport).

Each of ``--writers`` users sends ``--messages`` messages to each of ``--readers`` users (one direct
conversation per pair). Then, each round, every reader logs in at once on a new device (no cursor: it
replays every conversation from the start) and the round ends when every reader has every message. The
figures: process CPU (every thread) per login and per conversation replayed, the wall time until the last
reader had everything, and the store reads the gateway made (``ChatReads.replay`` per conversation,
``ChatReads.replay_ranges`` per page for many; the one that exists in the build measured).

    uv run python benchmarks/login_replay.py --readers 50 --writers 20 --messages 5 --rounds 5
    uv run python benchmarks/login_replay.py --set store.kind=postgres --set store.postgres_dsn=...
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from typing import Any

import uvloop

from im.model.errors import ErrorCode
from im.server import EmbeddedServer
from pipeline import MemoryConnection, running_server


def count_reads(server: EmbeddedServer, reads: Counter[str]) -> None:
    """Count the gateway's replay reads by wrapping the read side's methods (those the build has)."""
    side: Any = server.hub.reads
    for name in ("replay", "replay_ranges"):
        method = getattr(side, name, None)
        if method is None:
            continue

        def counted(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            reads[_name] += 1
            return _method(*args, **kwargs)

        setattr(side, name, counted)


async def users(server: EmbeddedServer, tag: str, n: int) -> list[tuple[int, str]]:
    out = []
    for i in range(n):
        await server.accounts.register(f"{tag}{i}", "password123")
        login = await server.accounts.login(f"{tag}{i}", "password123")
        out.append((login.uid, login.access_token))
    return out


async def write_history(
    server: EmbeddedServer, writers: list[tuple[int, str]], readers: list[tuple[int, str]], messages: int
) -> None:
    """Each writer sends ``messages`` to each reader, 64 in flight at most per writer."""

    async def one(uid: int, token: str) -> None:
        c = MemoryConnection(server.hub)
        server.hub.add(c)
        c.send({"t": "auth", "token": token, "device": "writer"})
        while not any(b'"synced"' in f for f in c.first):
            await asyncio.sleep(0.001)
        sends = [(r, k) for r, _ in readers for k in range(messages)]
        for at in range(0, len(sends), 64):
            for r, k in sends[at : at + 64]:
                c.send({"t": "send", "cmid": f"{uid}-{r}-{k}", "to": r, "body": {"text": "x" * 100}})
            await c.until(min(at + 64, len(sends)), "acks")
        c.close_transport(ErrorCode.SHUTDOWN)

    await asyncio.gather(*(one(uid, token) for uid, token in writers))


async def one_round(
    server: EmbeddedServer, readers: list[tuple[int, str]], device: str, want: int
) -> tuple[float, float]:
    """Process CPU seconds and wall seconds until every reader on ``device`` holds ``want`` messages."""
    cpu0, wall0 = time.process_time(), time.monotonic()
    conns = []
    for _, token in readers:
        c = MemoryConnection(server.hub)
        server.hub.add(c)
        c.send({"t": "auth", "token": token, "device": device})
        conns.append(c)
    await asyncio.gather(*(c.until(want, "msgs") for c in conns))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    for c in conns:
        c.close_transport(ErrorCode.SHUTDOWN)
    return cpu, wall


async def main(args: argparse.Namespace) -> None:
    async with running_server(args.set, "im-login-replay-") as server:
        readers = await users(server, "reader", args.readers)
        writers = await users(server, "writer", args.writers)
        await write_history(server, writers, readers, args.messages)
        reads: Counter[str] = Counter()
        count_reads(server, reads)
        want = args.writers * args.messages
        await one_round(server, readers, "warm", want)
        cpus, walls = [], []
        for r in range(args.rounds):
            reads.clear()
            cpu, wall = await one_round(server, readers, f"round{r}", want)
            cpus.append(cpu)
            walls.append(wall)
            print(
                f"round {r + 1}: {1e3 * cpu / args.readers:.2f} ms CPU per login"
                f" ({1e6 * cpu / (args.readers * args.writers):.0f} us per conversation), all replayed in"
                f" {wall:.2f} s; store reads: {dict(reads)}",
                flush=True,
            )
        print(
            f"login replay: {args.readers} logins of {args.writers} conversations with {args.messages} messages"
            f" each: median {1e3 * statistics.median(cpus) / args.readers:.2f} ms CPU per login,"
            f" {statistics.median(walls):.2f} s until all replayed"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=50, help="users who log in each round")
    parser.add_argument("--writers", type=int, default=20, help="conversations of each reader (one per writer)")
    parser.add_argument("--messages", type=int, default=5, help="messages in each conversation")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, as im serve --set (repeatable)"
    )
    uvloop.run(main(parser.parse_args()))
