"""Group-commit throughput of the ChatStores: batches of ``--batch`` messages spread over ``--convs``
conversations (one head each), committed one after another, on SQLite and on PostgreSQL.

    uv run python benchmarks/store_commit.py --batch 500 --batches 40 --convs 50
    IM_TEST_POSTGRES_DSN=postgresql://... uv run python benchmarks/store_commit.py --engines postgres
    uv run python benchmarks/store_commit.py --engines sqlite --sealed both --rounds 5

``--sealed on`` wraps the store in the at-rest encryption (EncryptedChatStore, a file master key);
``both`` alternates plain and sealed runs ``--rounds`` times and prints the CPU each costs per row
(process time: the event loop and the database's writer thread together).

PostgreSQL runs in a fresh schema dropped at the end; SQLite in a temporary file.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg
import uvloop

from im.backends.chat import ChatStore
from im.backends.chat.encrypted import EncryptedChatStore
from im.backends.chat.postgres import PostgresChatStore, PostgresConversationKeys
from im.backends.chat.sqlite import SqliteChatStore, SqliteConversationKeys
from im.backends.keys.file import FileKeyProvider
from im.backends.keys.keyring import Keyring
from im.backends.sql.postgres_db import PostgresDatabase
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.chat import CommitBatch, ConversationState, StoredMessage

DSN = os.environ.get("IM_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BODY = b'{"text":"' + b"x" * 88 + b'"}'  # about 100 bytes


async def run(store: ChatStore, batch_size: int, batches: int, n_convs: int) -> tuple[list[float], float]:
    """Wall time of each commit, and the process CPU seconds of them all (warm-up excluded)."""
    convs = [f"d:1:{i + 2}" for i in range(n_convs)]
    new = [ConversationState(c, "direct", 0, {1: "member", int(c[4:]): "member"}) for c in convs]
    await store.commit(CommitBatch(new_conversations=new))
    heads = dict.fromkeys(convs, 0)
    mid = 0
    times = []
    cpu = 0.0
    for n in range(batches + 2):  # two warm-up batches
        messages = []
        before = dict(heads)
        for i in range(batch_size):
            mid += 1
            conv = convs[i % n_convs]
            heads[conv] += 1
            messages.append(StoredMessage(conv, heads[conv], mid, 1, "d1", f"c{mid}", mid, "text", BODY))
        moved = {c: (before[c], heads[c], mid) for c in convs if heads[c] != before[c]}
        batch = CommitBatch(messages=messages, heads=moved)
        t, c = time.perf_counter(), time.process_time()
        await store.commit(batch)
        times.append(time.perf_counter() - t)
        if n >= 2:
            cpu += time.process_time() - c
    return times[2:], cpu


def report(name: str, result: tuple[list[float], float], batch_size: int) -> float:
    """Prints one run; returns its CPU microseconds per row."""
    times, cpu = result
    rate = len(times) * batch_size / sum(times)
    median, worst = statistics.median(times) * 1000, max(times) * 1000
    per_row = cpu * 1e6 / (len(times) * batch_size)
    print(
        f"{name:16s} {rate:9,.0f} rows/s   per batch: median {median:6.2f} ms, max {worst:6.2f} ms   "
        f"CPU {per_row:5.2f} us/row"
    )
    return per_row


def sealed(store: ChatStore, keys: SqliteConversationKeys | PostgresConversationKeys, tmp: str) -> ChatStore:
    provider = FileKeyProvider(Path(tmp) / "master.key", create=True)
    return EncryptedChatStore(store, Keyring(provider, keys), owns_keyring=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--convs", type=int, default=50)
    ap.add_argument("--engines", default="sqlite,postgres")
    ap.add_argument("--sealed", choices=("off", "on", "both"), default="off", help="at-rest encryption")
    ap.add_argument("--rounds", type=int, default=3, help="with --sealed both: plain/sealed pairs")
    args = ap.parse_args()
    print(f"{args.batches} commits of {args.batch} messages over {args.convs} conversations")
    modes = {"off": [False], "on": [True], "both": [False, True] * args.rounds}[args.sealed]
    for engine in args.engines.split(","):
        if engine not in ("sqlite", "postgres"):
            raise SystemExit(f"unknown engine {engine!r}")
        cost: dict[bool, list[float]] = {False: [], True: []}
        for seal in modes:
            name = f"{engine}{' sealed' if seal else ''}"
            cost[seal].append(report(name, await one_run(engine, seal, args), args.batch))
        if cost[False] and cost[True]:
            plain, sealed_ = statistics.median(cost[False]), statistics.median(cost[True])
            print(
                f"{engine}: median CPU per row {plain:.2f} us plain, {sealed_:.2f} us sealed "
                f"(+{sealed_ - plain:.2f} us, {100 * (sealed_ / plain - 1):+.1f} %)"
            )


async def one_run(engine: str, seal: bool, args: argparse.Namespace) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory() as tmp:
        if engine == "sqlite":
            db = SqliteDatabase(Path(tmp) / "im.db")
            store: ChatStore = SqliteChatStore(db)
            if seal:
                store = sealed(store, SqliteConversationKeys(db), tmp)
            await store.start()
            try:
                return await run(store, args.batch, args.batches, args.convs)
            finally:
                await store.close()
        schema = f"im_bench_{secrets.token_hex(4)}"
        pg = PostgresDatabase(DSN, schema=schema)
        store = PostgresChatStore(pg)
        if seal:
            store = sealed(store, PostgresConversationKeys(pg), tmp)
        await store.start()
        try:
            return await run(store, args.batch, args.batches, args.convs)
        finally:
            await store.close()
            conn = await asyncpg.connect(DSN)
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await conn.close()


if __name__ == "__main__":
    uvloop.run(main())
