"""Throughput of one transfer link (gateway -> transfer node over gRPC), in sends per second.

    uv run python benchmarks/transfer_link.py [--core sqlite|echo] [--count N] [--window N] [--split] [--tls]

A gateway keeps ``--window`` sends in flight on one :class:`TransferLink` (each answer submits the next
send) until ``--count`` sends are answered, and reports answered sends per second and the CPU both ends
spent per send and per frame (with ``--window 1``, what a gRPC frame costs). ``--core sqlite``
puts a real Committer on a temporary SQLite file behind the link (group commit, fsync'd); ``--core
echo`` answers each send at once, which measures the link alone. ``--split`` runs the transfer node in
a child process (otherwise both ends share this process's one core). ``--tls`` runs the link over mutual
TLS (certificates from :mod:`im.certs` in a temporary directory, node names checked both ways). gRPC
runs with im's process settings (:mod:`im.grpc_runtime`) unless ``GRPC_EXPERIMENTS`` is set: set it to
compare (``GRPC_EXPERIMENTS=event_engine_client,event_engine_listener`` is grpcio's default).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from im import certs
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence.memory import MemoryPresence
from im.backends.routing import DeliverySink
from im.backends.sql.sqlite_db import SqliteDatabase
from im.bench.server import cpu_seconds
from im.core.committer import Committer, SendCallback, SendRequest
from im.core.consent import Consent
from im.core.states import ConversationStates
from im.grpc_runtime import use_grpc_defaults
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation
from im.model.errors import ImError

if TYPE_CHECKING:
    from im.transfer.tls import LinkTls

use_grpc_defaults()  # as im's command line does; the link's modules, which import grpc, come after

GATEWAY = "gw-bench"
TRANSFER = "tr-bench"


def link_tls(directory: Path) -> tuple[LinkTls, LinkTls]:
    """(transfer node, gateway) identities from a fresh cluster CA."""
    from im.transfer.tls import LinkTls

    ca = certs.create_ca(directory)
    tr, gw = certs.issue(directory, ca, TRANSFER), certs.issue(directory, ca, GATEWAY)
    return (
        LinkTls(ca.cert, tr.cert, tr.key, certs.node_identity),
        LinkTls(ca.cert, gw.cert, gw.key, certs.node_identity),
    )


class EchoCore:
    """Answers every send at once with a made-up stored message (no storage): the link's own ceiling."""

    def __init__(self) -> None:
        self._seq = 0

    def submit(self, req: SendRequest, done: SendCallback) -> None:
        self._seq += 1
        done(
            req,
            StoredMessage("d:1:2", self._seq, self._seq, req.uid, req.device, req.cmid, 0, req.type, req.body),
            False,
            None,
        )


class CountingSink(DeliverySink):
    def __init__(self) -> None:
        self.delivered = 0

    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        self.delivered += len(messages)

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        pass


async def _transfer_node(core: str, data_dir: Path, port: int, tls: LinkTls | None) -> tuple[Any, int, Any]:
    """Start a transfer node; returns (grpc server, port, a coroutine function that stops the rest)."""
    from im.transfer.server import GrpcRouter, TransferServicer, serve_transfer

    router = GrpcRouter()
    if core == "echo":
        servicer = TransferServicer(EchoCore(), router, node=TRANSFER, tls=tls)
        server, bound = await serve_transfer(servicer, f"127.0.0.1:{port}")

        async def stop_echo() -> None:
            await server.stop(None)

        return server, bound, stop_echo
    db = SqliteDatabase(data_dir / "im.db")
    store, accounts = SqliteChatStore(db), SqliteAccountStore(db)
    await store.start()
    await accounts.start()
    presence = MemoryPresence()
    alice = (await accounts.create_user("alice", "Alice", "x", 1)).uid
    bob = (await accounts.create_user("bob", "Bob", "x", 1)).uid
    await presence.set_online([DeviceLocation(u, "d1", GATEWAY) for u in (alice, bob)], ttl=3600)
    committer = Committer(store, accounts, router, presence, ConversationStates(store), Consent(accounts, store))
    committer.start()
    server, bound = await serve_transfer(
        TransferServicer(committer, router, node=TRANSFER, tls=tls), f"127.0.0.1:{port}"
    )

    async def stop() -> None:
        await server.stop(None)
        await committer.stop()
        await accounts.close()
        await store.close()

    return server, bound, stop


def _child(core: str, data_dir: str, port: int, tls: LinkTls | None, ready: Any) -> None:
    async def main() -> None:
        _server, bound, stop = await _transfer_node(core, Path(data_dir), port, tls)
        ready.put(bound)
        try:
            await asyncio.Event().wait()
        finally:
            await stop()

    asyncio.run(main())


async def run(core: str, count: int, window: int, split: bool, tls: bool) -> None:
    from im.transfer.client import TransferLink

    with tempfile.TemporaryDirectory() as tmp:
        server_tls, gateway_tls = link_tls(Path(tmp) / "pki") if tls else (None, None)
        child = None
        if split:
            ctx = multiprocessing.get_context("spawn")
            q = ctx.Queue()
            child = ctx.Process(target=_child, args=(core, tmp, 0, server_tls, q), daemon=True)
            child.start()
            port, stop = q.get(timeout=30), None
        else:
            _server, port, stop = await _transfer_node(core, Path(tmp), 0, server_tls)
        sink = CountingSink()
        link = TransferLink(f"127.0.0.1:{port}", GATEWAY, sink, tls=gateway_tls, peer=TRANSFER)
        link.start()
        await asyncio.wait_for(link.wait_connected(), 10)
        finished = asyncio.Event()
        state = {"next": 0, "ok": 0, "err": 0}

        def submit_next() -> None:
            i = state["next"]
            state["next"] = i + 1
            link.submit(SendRequest(1, "d1", f"c{i}", None, 2, "text", b'{"text":"hello, world"}'), done)

        def done(req: SendRequest, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
            state["ok" if err is None else "err"] += 1
            if state["next"] < count:
                submit_next()
            elif state["ok"] + state["err"] == count:
                finished.set()

        pids = [os.getpid()] + ([child.pid] if child is not None and child.pid is not None else [])
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        t0 = time.perf_counter()
        for _ in range(min(window, count)):
            submit_next()
        await finished.wait()
        elapsed = time.perf_counter() - t0
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
        frames = link.frames_sent + link.frames_received
        print(
            f"core={core} split={split} tls={tls} sends={count} window={window}: {count / elapsed:,.0f} sends/s "
            f"({elapsed:.2f} s; ok={state['ok']} err={state['err']}; frames out={link.frames_sent} "
            f"in={link.frames_received}; {count / max(link.frames_sent, 1):.0f} sends/frame; "
            f"deliveries={sink.delivered})"
        )
        print(
            f"CPU of both ends: {cpu:.2f} s, "
            f"{1e6 * cpu / count:.1f} µs per send, {1e6 * cpu / max(frames, 1):.0f} µs per frame "
            "(everything a frame carries included)"
        )
        await link.close()
        if stop is not None:
            await stop()
        if child is not None:
            child.terminate()
            child.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--core", choices=["sqlite", "echo"], default="sqlite", help="what answers the sends")
    ap.add_argument("--count", type=int, default=100_000, help="sends to answer")
    ap.add_argument("--window", type=int, default=1000, help="sends in flight")
    ap.add_argument("--split", action="store_true", help="run the transfer node in a child process")
    ap.add_argument("--tls", action="store_true", help="mutual TLS on the link")
    args = ap.parse_args()
    asyncio.run(run(args.core, args.count, args.window, args.split, args.tls))


if __name__ == "__main__":
    main()
