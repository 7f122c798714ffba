"""How long one group commit of the SQLite store takes while another thread runs Python, as the event
loop's thread does under load: the GIL's cost to the writer thread.

Python's sqlite3 releases the GIL around every statement step and must win it back after each; while
another thread is running Python, each win can take up to the switch interval (5 ms). ``executemany``
steps once per row, so a commit of N messages pays up to N waits; one multi-row ``INSERT`` pays one.
The schema is im's (the store's own migrations); the file is fsync'd as im's (WAL, ``synchronous=FULL``).

    uv run python benchmarks/sqlite_gil.py --rows 77 --commits 200

On 2026-12-06 (77 rows of 140 bytes): idle, executemany 0.89 ms and multi-row 0.74 ms per commit
(medians); beside a thread spinning in Python, 346 ms and 17 ms. In `im serve` at window 16 a commit
of 77 messages took 5.8 ms on average, against 1.3-1.5 ms for the same rows in a bare loop.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

from im.backends.sql.sqlite_db import SqliteDatabase

COLUMNS = 9  # conv, seq, mid, sender, device, cmid, ts, type, body


def database(directory: str) -> sqlite3.Connection:
    conn = sqlite3.connect(Path(directory) / "im.sqlite3", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    SqliteDatabase._migrate(conn)  # im's schema, as the store makes it
    return conn


def commit_times(rows: int, commits: int, *, busy: bool, multi_row: bool) -> list[float]:
    """Seconds per commit of ``rows`` messages, with or without a thread spinning in Python beside."""
    with tempfile.TemporaryDirectory(prefix="im-sqlite-gil-") as directory:
        conn = database(directory)
        stop = threading.Event()

        def spin() -> None:
            x = 0
            while not stop.is_set():
                for i in range(1000):
                    x += i

        spinner = threading.Thread(target=spin, daemon=True)
        if busy:
            spinner.start()
        single = "INSERT INTO messages VALUES (" + ", ".join("?" * COLUMNS) + ")"
        many = "INSERT INTO messages VALUES " + ", ".join(["(" + ", ".join("?" * COLUMNS) + ")"] * rows)
        seq = 0
        times = []
        try:
            for _ in range(commits):
                batch = []
                for _ in range(rows):
                    seq += 1
                    batch.append(("d:1:2", seq, seq, 1, "phone", f"c-{seq}", seq, "text", os.urandom(140)))
                started = time.perf_counter()
                conn.execute("BEGIN IMMEDIATE")
                if multi_row:
                    conn.execute(many, [value for row in batch for value in row])
                else:
                    conn.executemany(single, batch)
                conn.execute("COMMIT")
                times.append(time.perf_counter() - started)
        finally:
            stop.set()
            if busy:
                spinner.join()
            conn.close()
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=77, help="messages per commit (at most 3,600)")
    parser.add_argument("--commits", type=int, default=200)
    args = parser.parse_args()
    for busy in (False, True):
        for multi_row in (False, True):
            times = sorted(commit_times(args.rows, args.commits, busy=busy, multi_row=multi_row))
            p90 = times[int(0.9 * (len(times) - 1))]
            where = "beside a busy thread" if busy else "idle"
            how = "multi-row INSERT" if multi_row else "executemany"
            median = statistics.median(times)
            print(f"{where:21s} {how:17s} commit median {median * 1000:8.2f} ms  p90 {p90 * 1000:8.2f} ms")


if __name__ == "__main__":
    main()
