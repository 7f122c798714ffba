"""Group-commit throughput of the ChatStores: batches of ``--batch`` messages spread over ``--convs``
conversations (one head each), committed one after another, on SQLite and on PostgreSQL.

    uv run python benchmarks/store_commit.py --batch 500 --batches 40 --convs 50
    IM_TEST_POSTGRES_DSN=postgresql://... uv run python benchmarks/store_commit.py --engines postgres

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
from im.backends.chat.postgres import PostgresChatStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.sql.postgres_db import PostgresDatabase
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.chat import CommitBatch, ConversationState, StoredMessage

DSN = os.environ.get("IM_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BODY = b'{"text":"' + b"x" * 88 + b'"}'  # about 100 bytes


async def run(store: ChatStore, batch_size: int, batches: int, n_convs: int) -> list[float]:
    convs = [f"d:1:{i + 2}" for i in range(n_convs)]
    new = [ConversationState(c, "direct", 0, {1: "member", int(c[4:]): "member"}) for c in convs]
    await store.commit(CommitBatch(new_conversations=new))
    heads = dict.fromkeys(convs, 0)
    mid = 0
    times = []
    for _ in range(batches + 2):  # two warm-up batches
        messages = []
        before = dict(heads)
        for i in range(batch_size):
            mid += 1
            conv = convs[i % n_convs]
            heads[conv] += 1
            messages.append(StoredMessage(conv, heads[conv], mid, 1, "d1", f"c{mid}", mid, "text", BODY))
        moved = {c: (before[c], heads[c], mid) for c in convs if heads[c] != before[c]}
        batch = CommitBatch(messages=messages, heads=moved)
        t = time.perf_counter()
        await store.commit(batch)
        times.append(time.perf_counter() - t)
    return times[2:]


def report(name: str, times: list[float], batch_size: int) -> None:
    rate = len(times) * batch_size / sum(times)
    median, worst = statistics.median(times) * 1000, max(times) * 1000
    print(f"{name:9s} {rate:9,.0f} rows/s   per batch: median {median:6.2f} ms, max {worst:6.2f} ms")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--convs", type=int, default=50)
    ap.add_argument("--engines", default="sqlite,postgres")
    args = ap.parse_args()
    print(f"{args.batches} commits of {args.batch} messages over {args.convs} conversations")
    for engine in args.engines.split(","):
        if engine == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                store: ChatStore = SqliteChatStore(SqliteDatabase(Path(tmp) / "im.db"))
                await store.start()
                try:
                    report("sqlite", await run(store, args.batch, args.batches, args.convs), args.batch)
                finally:
                    await store.close()
        elif engine == "postgres":
            schema = f"im_bench_{secrets.token_hex(4)}"
            store = PostgresChatStore(PostgresDatabase(DSN, schema=schema))
            await store.start()
            try:
                report("postgres", await run(store, args.batch, args.batches, args.convs), args.batch)
            finally:
                await store.close()
                conn = await asyncpg.connect(DSN)
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
                await conn.close()
        else:
            raise SystemExit(f"unknown engine {engine!r}")


if __name__ == "__main__":
    uvloop.run(main())
