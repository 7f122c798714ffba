"""N pairs of clients in closed loop through a real ``im serve``: throughput, server CPU, latency.

Each pair is a sender and a receiver (two users, a direct conversation). A sender keeps ``--window``
messages in flight: it sends the next one when the receiver got one. Every message is stored (acked
only after commit). Clients run in ``--procs`` processes (picows over uvloop) so they do not starve the
server; the server's CPU is read from /proc before and after the measured interval.

    python benchmarks/pairs.py --pairs 10 --window 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.server import ServerProcess

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Pair:
    sender_token: str
    receiver_token: str
    receiver_uid: int


class Peer(WSListener):  # type: ignore[misc]
    def __init__(self, on_frame: object) -> None:
        self.on_frame = on_frame
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_event_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            msg = _dec.decode(frame.get_payload_as_bytes())
            if msg["t"] == "synced" and not self.ready.done():
                self.ready.set_result(None)
            self.on_frame(msg)  # type: ignore[operator]

    def send(self, obj: object) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, _enc.encode(obj))


async def _wait_event(event: object) -> None:
    while not event.is_set():  # type: ignore[attr-defined]
        await asyncio.sleep(0.002)


async def _run_pairs(url: str, pairs: list[Pair], window: int, start: object, stop: object, out: mp.Queue) -> None:
    latencies: list[float] = []
    counts = {"delivered": 0, "acked": 0, "errors": 0}
    measuring = {"on": False}
    peers = []

    async def start_pair(index: int, pair: Pair) -> None:
        sent_at: dict[int, float] = {}
        state = {"n": 0, "last_seq": 0, "cursor_at": 0}

        def send_next(sender: Peer) -> None:
            state["n"] += 1
            n = state["n"]
            sent_at[n] = time.monotonic()
            body = f"{n:010d} " + "x" * 80  # about 100 bytes, numbered for latency
            sender.send({"t": "send", "cmid": f"p{index}-{n}", "to": pair.receiver_uid, "body": body})

        def on_sender(msg: dict) -> None:
            if msg["t"] == "ack":
                if measuring["on"]:
                    counts["acked"] += 1
            elif msg["t"] == "error":
                counts["errors"] += 1

        def on_receiver(msg: dict) -> None:
            if msg["t"] != "msg":
                return
            n = int(msg["body"][:10])
            t0 = sent_at.pop(n, None)
            if measuring["on"]:
                counts["delivered"] += 1
                if t0 is not None:
                    latencies.append(time.monotonic() - t0)
            seq = msg["seq"]
            if seq - state["cursor_at"] >= 100:  # the receiver acknowledges delivery in steps
                state["cursor_at"] = seq
                receiver.send({"t": "recv", "conv": msg["conv"], "seq": seq})
            send_next(sender)

        _, sender = await ws_connect(lambda: Peer(on_sender), url)
        _, receiver = await ws_connect(lambda: Peer(on_receiver), url)
        sender.send({"t": "auth", "token": pair.sender_token, "device": "bench"})
        receiver.send({"t": "auth", "token": pair.receiver_token, "device": "bench"})
        await asyncio.gather(sender.ready, receiver.ready)
        peers.extend([sender, receiver])
        for _ in range(window):
            send_next(sender)

    await asyncio.gather(*(start_pair(i, p) for i, p in enumerate(pairs)))
    out.put("ready")
    await _wait_event(start)
    measuring["on"] = True
    await _wait_event(stop)
    measuring["on"] = False
    out.put({**counts, "latencies": latencies})
    for p in peers:
        if p.transport is not None:
            p.transport.disconnect()


def _client_process(url: str, pairs: list[Pair], window: int, start: object, stop: object, out: mp.Queue) -> None:
    uvloop.run(_run_pairs(url, pairs, window, start, stop, out))


async def _accounts(api: str, n: int, prefix: str) -> list[tuple[int, str]]:
    async with httpx.AsyncClient(timeout=60) as http:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> tuple[int, str]:
            async with sem:
                name = f"{prefix}{i}"
                await http.post(f"{api}/auth/register", json={"username": name, "password": "benchmark-pass"})
                r = await http.post(f"{api}/auth/login", json={"username": name, "password": "benchmark-pass"})
                r.raise_for_status()
                body = r.json()
                return int(body["uid"]), str(body["access_token"])

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--window", type=int, default=16, help="messages in flight per pair")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--procs", type=int, default=1, help="client processes")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--log-level", "warning", "--set", "limits.send_rate=1000000"]
        server = ServerProcess(Path(tmp) / "data", extra=extra).start()
        try:
            users = asyncio.run(_accounts(server.api, 2 * args.pairs, f"b{int(time.time())}_"))
            pairs = [Pair(users[2 * i][1], users[2 * i + 1][1], users[2 * i + 1][0]) for i in range(args.pairs)]
            out: mp.Queue = mp.Queue()
            start, stop = mp.Event(), mp.Event()
            chunks = [pairs[i :: args.procs] for i in range(args.procs)]
            procs = [
                mp.Process(target=_client_process, args=(server.ws, c, args.window, start, stop, out))
                for c in chunks
                if c
            ]
            assert server.proc is not None
            for p in procs:
                p.start()
            for _ in procs:
                assert out.get(timeout=120) == "ready"
            print(f"server pid {server.proc.pid}", flush=True)
            time.sleep(args.warmup)
            cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
            start.set()
            time.sleep(args.seconds)
            stop.set()
            cpu1, elapsed = cpu_seconds(server.proc.pid), time.monotonic() - t0
            results = [out.get(timeout=60) for _ in procs]
            for p in procs:
                p.join(timeout=10)
        finally:
            server.stop()
    delivered = sum(r["delivered"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    rate = delivered / elapsed
    print(f"pairs={args.pairs} window={args.window} procs={args.procs} seconds={elapsed:.1f}")
    print(f"delivered messages/s      {rate:,.0f}")
    print(f"server CPU-ms per 1k msgs {1e6 * (cpu1 - cpu0) / max(1, delivered):.1f}")
    if lat:
        print(
            f"latency p50 / p99 / max   {1000 * statistics.median(lat):.2f} / "
            f"{1000 * lat[int(0.99 * (len(lat) - 1))]:.2f} / {1000 * lat[-1]:.2f} ms"
        )
    print(f"errors                    {sum(r['errors'] for r in results)}")


if __name__ == "__main__":
    main()
