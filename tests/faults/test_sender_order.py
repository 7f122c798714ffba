"""Sender order through a real outage: ``im serve`` on a private PostgreSQL that is killed (SIGKILL of the
postmaster) mid-stream and started again (crash recovery), while SDK devices post without waiting.

What the system promises (docs/protocol.md section 8, "Sender order"): a device's sends to one
conversation are stored in the order it sent them, across the refusals of the outage, because the SDK
resends refused sends first and in order, and the server refuses a later send of that conversation until
the refused one is back. Checked, per conversation: every post stored once (nothing lost, nothing twice),
dense seqs, and each device's messages stored exactly in its posting order. Also checked: the outage did
refuse sends (``unavailable``), so the order was tested across refusals, and every device was told
(a refused send, or its connection closed ``bye unavailable`` when the server could not read what it
needed for it). With small commit batches the
database comes back in the middle of a burst of resends; without the barrier (``limits.send_order_hold=0``)
this test sees a device's later message stored before an earlier one on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from im.client import Client
from im.model.ids import direct_conv
from im.protocol.codec import Encoding
from im.protocol.frames import Bye, Error, ServerFrame
from tests.support.apps import PASSWORD, read_log
from tests.support.client import Account, register
from tests.support.postgres import PrivatePostgres
from tests.support.server import ServerProcess
from tests.support.wait import eventually

DOWN = 3.0  # seconds the database stays away
PACE = 0.01  # seconds between two posts of one device
AFTER = 60  # posts each device makes once the database is back


@dataclass
class Device:
    """One SDK client posting to its targets in turn; ``planned``: cmid -> conv, in posting order."""

    account: Account
    name: str
    targets: list[tuple[str, dict[str, Any]]]
    client: Client | None = None
    planned: dict[str, str] = field(default_factory=dict)
    refusals: list[Error] = field(default_factory=list)
    #: ``bye unavailable`` answers: a connection the server closed because the store was away (a replay it
    #: could not read, a reconnect whose session it could not check); the device then retries meanwhile.
    sent_away: int = 0

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    async def start(self, server: ServerProcess, transport: str, encoding: Encoding) -> None:
        self.client = await Client.login(
            server.http,
            self.account.username,
            PASSWORD,
            device=self.name,
            transport=transport,  # type: ignore[arg-type]
            encoding=encoding,
            backoff_max=0.5,
            connect_timeout=20.0,
        )
        session = self.client.session
        seen = session.receive_frame

        def spy(frame: ServerFrame) -> Any:  # every refusal of a send the server gave this device
            if type(frame) is Error and frame.ref is not None:
                self.refusals.append(frame)
            elif type(frame) is Bye and frame.code == "unavailable":
                self.sent_away += 1
            return seen(frame)

        session.receive_frame = spy  # type: ignore[method-assign]

    async def pump(self, back: asyncio.Event) -> None:
        k, after = 0, 0
        while after < AFTER:
            conv, address = self.targets[k % len(self.targets)]
            cmid = f"{self.name}-{k}"
            self.planned[cmid] = conv
            self.c.post(f"{self.name} #{k}", cmid=cmid, **address)
            k += 1
            after += back.is_set()
            await asyncio.sleep(PACE)
            assert k < 5000, f"{self.name}: the database never came back"


async def test_each_device_s_messages_are_stored_in_its_order_across_a_database_crash(
    tmp_path: Path, pg: PrivatePostgres
) -> None:
    server = ServerProcess(
        tmp_path / "serve",
        # Small batches: a burst of resends spans many commits, so the database comes back in the middle of
        # one (an earlier send refused, a later one of the same burst stored): the case the barrier is for.
        extra=["--set", "store.kind=postgres", "--set", f"store.postgres_dsn={pg.dsn}", "--set", "store.max_batch=8"],
    ).start()
    devices: list[Device] = []
    try:
        ann, ben, cat = [await register(server.api, name) for name in ("ann", "ben", "cat")]
        async with httpx.AsyncClient(timeout=20) as http:
            r = await http.post(
                f"{server.api}/groups", json={"name": "order", "members": [ben.uid, cat.uid]}, headers=ann.auth
            )
        assert r.status_code == 201, r.text
        group = str(r.json()["conv"])
        ab = direct_conv(ann.uid, ben.uid)
        devices = [
            Device(ann, "ann-phone", [(group, {"conv": group}), (ab, {"to": ben.uid})]),
            Device(ann, "ann-laptop", [(group, {"conv": group}), (ab, {"conv": ab})]),
            Device(ben, "ben-phone", [(ab, {"to": ann.uid}), (group, {"conv": group})]),
            Device(cat, "cat-phone", [(group, {"conv": group})]),
        ]
        kinds = [("ws", Encoding.JSON), ("tcp", Encoding.MSGPACK), ("ws", Encoding.MSGPACK), ("tcp", Encoding.JSON)]
        for d, (transport, encoding) in zip(devices, kinds, strict=True):
            await d.start(server, transport, encoding)
        back = asyncio.Event()
        pumps = [asyncio.create_task(d.pump(back)) for d in devices]
        figures: dict[str, Any] = {}
        try:
            await eventually(lambda: all(len(d.planned) - len(d.c.session.outbox) >= 10 for d in devices), "acks")
            await asyncio.to_thread(pg.kill)
            gone = time.monotonic()
            # Every device is told, explicitly: its sends refused `unavailable`, or its connection closed with
            # `bye unavailable` (then it cannot come back before the store does: its posts wait in its outbox).
            # Sends are refused on some device at least, so the order is tested across refusals.
            await eventually(
                lambda: all(d.refusals or d.sent_away for d in devices) and any(d.refusals for d in devices),
                lambda: (
                    "every device told while away: "
                    + str({d.name: (len(d.refusals), d.sent_away) for d in devices})
                    # What the server did meanwhile. This guard failed now and then while a device's own result,
                    # answered ahead of the other senders' messages of its commit, had it read the gap from the
                    # store: a read cut by the kill closed the connection (bye) before a send could be refused.
                    + "\nserver log, last lines:\n"
                    + server.log()[-6000:]
                ),
                DOWN + 10,
            )
            await asyncio.sleep(max(0.0, DOWN - (time.monotonic() - gone)))
            await asyncio.to_thread(pg.start)
            figures["down_s"] = round(time.monotonic() - gone, 2)
            back.set()
            await asyncio.gather(*pumps)
        finally:
            for t in pumps:
                t.cancel()
            if not pg.running:
                await asyncio.to_thread(pg.start)
        await eventually(
            lambda: all(not d.c.session.outbox for d in devices),
            lambda: "unacked: " + ", ".join(f"{d.name}={len(d.c.session.outbox)}" for d in devices),
            45,
        )
        for d in devices:
            assert d.c.error is None, f"{d.name} stopped: {d.c.error!r}"
            assert {e.code for e in d.refusals} <= {"unavailable"}, {e.code for e in d.refusals}
        stored = 0
        for conv, reader in ((group, ann), (ab, ann)):
            log = await read_log(server, reader, conv)
            assert [e["seq"] for e in log] == list(range(1, len(log) + 1)), f"{conv}: seqs not dense"
            for d in devices:
                mine = [e["cmid"] for e in log if e["from"] == d.account.uid and e["dev"] == d.name]
                posted = [cmid for cmid, c in d.planned.items() if c == conv]
                assert len(mine) == len(set(mine)), f"{conv}: {d.name} has a message stored twice"
                assert sorted(mine) == sorted(posted), f"{conv}: {d.name}: lost or unexpected messages"
                out_of_order = [(i, a, b) for i, (a, b) in enumerate(zip(mine, posted, strict=True)) if a != b]
                assert not out_of_order, f"{conv}: {d.name}'s messages stored out of order: {out_of_order[:5]}"
                stored += len(mine)
        figures["stored"] = stored
        figures["refusals"] = {d.name: len(d.refusals) for d in devices}
        figures["sent_away"] = {d.name: d.sent_away for d in devices}
        figures["held_back"] = sum("resend it first" in e.message for d in devices for e in d.refusals)
        print(f"\nSENDER ORDER FIGURES {figures}")
    finally:
        for d in devices:
            if d.client is not None:
                with contextlib.suppress(Exception):
                    await d.client.close()
        code = await asyncio.to_thread(server.stop)
    assert code == 0, server.log()[-4000:]
