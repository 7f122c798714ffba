"""The link's keepalive (``transfer.keepalive``): a transfer node behind a silent partition is noticed.

A fault proxy between the gateway's link and the transfer node blackholes the path: connections stay open
and nothing flows, so no RST ever tells the link. With keepalive the HTTP/2 pings go unanswered and the
stream fails within interval + timeout, handing its unanswered sends back (``unavailable`` here, with no
``on_lost``); without, they wait for as long as the partition lasts.
"""

from __future__ import annotations

import asyncio
import time

from im.core.committer import SendRequest
from im.faultproxy import FaultProxy
from im.model.errors import ErrorCode
from im.transfer import TransferLink, serve_transfer
from tests.support.wait import eventually
from tests.transfer.conftest import Core, RecordingSink, Results

KEEPALIVE = 0.5  # seconds between pings, and to wait for each answer


def send(uid: int, to: int, cmid: str) -> SendRequest:
    return SendRequest(uid=uid, device="d1", cmid=cmid, conv=None, to=to, type="text", body=b'{"text":"hi"}')


async def _blackholed_link(core: Core, keepalive: float) -> tuple[FaultProxy, TransferLink, Results, float]:
    """A link through a proxy to ``core`` (served again with ``keepalive``), ten sends pending in the core
    (its store gated), then the path blackholed; returns when the blackhole began."""
    await core.server.stop(None)
    core.server, _ = await serve_transfer(core.servicer, core.address, keepalive=keepalive, keepalive_timeout=KEEPALIVE)
    proxy = FaultProxy(("127.0.0.1", core.port)).start()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link = TransferLink(
        proxy.address,
        "gw-a",
        RecordingSink(),
        backoff_initial=0.02,
        backoff_max=0.2,
        keepalive=keepalive,
        keepalive_timeout=KEEPALIVE,
    )
    core.links.append(link)
    link.start()
    await asyncio.wait_for(link.wait_connected(), 10)
    core.store.gate.clear()  # commits wait: the sends stay unanswered
    results = Results()
    for i in range(10):
        link.submit(send(alice, bob, f"c{i}"), results.done)
    await eventually(lambda: core.servicer.sends_received == 10)
    proxy.blackhole()
    return proxy, link, results, time.monotonic()


async def test_a_silent_partition_breaks_the_link_within_the_keepalive(core: Core) -> None:
    proxy, link, results, began = await _blackholed_link(core, KEEPALIVE)
    try:
        await eventually(lambda: len(results.got) == 10, "the pending sends handed back", 10)
        took = time.monotonic() - began
        assert took < 2 * KEEPALIVE + 2.0, took
        assert all(err is not None and err.code is ErrorCode.UNAVAILABLE for *_, err in results.got)
        assert not link.connected
        # Healed: the link comes back by itself.
        proxy.heal()
        core.store.gate.set()
        await asyncio.wait_for(link.wait_connected(), 10)
        assert link.connects == 2
    finally:
        proxy.close()


async def test_without_keepalive_the_sends_wait_out_the_partition(core: Core) -> None:
    """The contrast: with ``keepalive=0`` nothing notices the same silence."""
    proxy, link, results, _ = await _blackholed_link(core, 0.0)
    try:
        await asyncio.sleep(2 * KEEPALIVE + 2.0)
        assert results.got == [] and link.connected
        proxy.heal()
        core.store.gate.set()
        await eventually(lambda: len(results.got) == 10, "answered after the heal", 10)
        assert all(err is None for *_, err in results.got)
    finally:
        proxy.close()
