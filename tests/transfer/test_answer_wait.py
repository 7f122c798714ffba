"""A transfer node answers a commit's sends with its routing (``transfer.answer_wait``): the results and
the deliveries of one commit reach the gateway in one frame instead of two. Presence is real Redis here:
its lookup is a round trip, during which the link's writer used to send the results on their own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from im.backends.presence.redis import RedisPresence
from im.core.committer import SendRequest
from im.model.cluster import DeviceLocation
from im.transfer.client import TransferLink
from im.transfer.gen import transfer_pb2 as pb
from tests.contract.conftest import REDIS_URL, delete_redis_prefix
from tests.support.wait import eventually
from tests.transfer.conftest import Core, RecordingSink, Results, close_core, open_core


class FrameLog(TransferLink):
    """Notes, per frame it takes: (fresh results, result rows, delivery references, delivery rows)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames: list[tuple[int, int, int, int]] = []

    def _dispatch(self, frame: pb.TransferFrame) -> None:
        if frame.HasField("welcome"):
            return super()._dispatch(frame)
        self.frames.append((len(frame.fresh.rid), len(frame.results), len(frame.sent.mid), len(frame.deliveries)))
        super()._dispatch(frame)


class StalledPresence(RedisPresence):
    """Redis presence whose lookups wait for ``gate`` first (a slow or silent Redis)."""

    def __init__(self, *args: Any, prefix: str, **kwargs: Any) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        self.prefix = prefix  # its keys', deleted after the test
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0  # lookups waiting at the gate now

    async def locate(self, uids: Iterable[int]) -> dict[int, list[DeviceLocation]]:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await super().locate(uids)


async def redis_core(tmp_path: Path, answer_wait: float, max_batch: int = 64) -> tuple[Core, StalledPresence]:
    presence = StalledPresence(REDIS_URL, prefix=f"im-test-answer-{uuid.uuid4().hex[:8]}:")
    await presence.start()
    core = await open_core(tmp_path, presence=presence, answer_wait=answer_wait, answer_wait_max_batch=max_batch)
    return core, presence


@pytest.fixture
async def cores(tmp_path: Path) -> AsyncIterator[list[tuple[Core, StalledPresence]]]:
    """Started cores with Redis presence, made by the test (``cores.append(await redis_core(...))``);
    closed with their presence keys deleted."""
    made: list[tuple[Core, StalledPresence]] = []
    yield made
    for core, presence in made:
        presence.gate.set()
        await close_core(core)
        await delete_redis_prefix(presence.client, presence.prefix)
        await presence.close()


async def one_send_each(core: Core, sends: int) -> tuple[FrameLog, Results, RecordingSink]:
    """``sends`` sends from alice to bob (both on gw-a), one at a time, each answered and delivered first."""
    sink, results = RecordingSink(), Results()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-a")
    link = await core.link("gw-a", sink, FrameLog)
    assert isinstance(link, FrameLog)
    for i in range(sends):
        req = SendRequest(uid=alice, device="d1", cmid=f"c{i}", conv=None, to=bob, type="text", body=b'{"text":"hi"}')
        link.submit(req, results.done)
        await eventually(lambda n=i + 1: len(results.got) == n and len(sink.messages) == n)  # type: ignore[misc]
    return link, results, sink


async def test_a_commits_answers_and_deliveries_share_one_frame(
    tmp_path: Path, cores: list[tuple[Core, StalledPresence]]
) -> None:
    cores.append(await redis_core(tmp_path, answer_wait=0.5))
    link, results, _sink = await one_send_each(cores[0][0], 5)
    assert all(err is None and m is not None for _, m, _, err in results.got)
    # One frame per commit: its fresh result, and its delivery by reference (no row crossed back).
    assert link.frames == [(1, 0, 1, 0)] * 5


async def test_answered_first_the_lookup_splits_them_in_two_frames(
    tmp_path: Path, cores: list[tuple[Core, StalledPresence]]
) -> None:
    """What ``answer_wait`` 0 does (and what every commit cost before it): the results leave while the
    presence lookup is on its way to Redis, the deliveries in a frame after them."""
    cores.append(await redis_core(tmp_path, answer_wait=0.0))
    link, _results, _sink = await one_send_each(cores[0][0], 5)
    assert link.frames == [(1, 0, 0, 0), (0, 0, 1, 0)] * 5


async def test_a_stalled_lookup_holds_the_answers_no_longer_than_answer_wait(
    tmp_path: Path, cores: list[tuple[Core, StalledPresence]]
) -> None:
    core, presence = await redis_core(tmp_path, answer_wait=0.2)
    cores.append((core, presence))
    sink, results = RecordingSink(), Results()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-a")
    link = await core.link("gw-a", sink, FrameLog)
    assert isinstance(link, FrameLog)
    presence.gate.clear()
    req = SendRequest(uid=alice, device="d1", cmid="c0", conv=None, to=bob, type="text", body=b'{"text":"hi"}')
    link.submit(req, results.done)
    await eventually(lambda: len(results.got) == 1, timeout=5)
    # Answered (stored) while its routing still waits for presence, then delivered once presence answers.
    assert presence.waiting == 1 and sink.messages == []
    _, m, _, err = results.got[0]
    assert err is None and m is not None and m.seq == 1
    presence.gate.set()
    await eventually(lambda: len(sink.messages) == 1, timeout=5)
    assert sink.messages[0][0].mid == m.mid
    await asyncio.sleep(0.3)  # past the answer's timer: nothing is answered twice
    assert len(results.got) == 1 and link.frames == [(1, 0, 0, 0), (0, 0, 1, 0)]


async def test_a_batch_larger_than_answer_wait_max_batch_is_answered_first(
    tmp_path: Path, cores: list[tuple[Core, StalledPresence]]
) -> None:
    """A large batch: the frame it would save is a small share of its cost, and its answers would hold
    the gateway's next frame of sends for the lookup."""
    cores.append(await redis_core(tmp_path, answer_wait=0.5, max_batch=2))
    core = cores[0][0]
    sink, results = RecordingSink(), Results()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-a")
    link = await core.link("gw-a", sink, FrameLog)
    assert isinstance(link, FrameLog)
    for batch, cmids in enumerate((["a0", "a1"], ["b0", "b1", "b2"])):
        for cmid in cmids:  # submitted in one turn: one frame of sends, one batch
            req = SendRequest(uid=alice, device="d1", cmid=cmid, conv=None, to=bob, type="text", body=b"{}")
            link.submit(req, results.done)
        await eventually(lambda n=2 + 3 * batch: len(results.got) == n and len(sink.messages) == n)  # type: ignore[misc]
    # The batch of two (at most answer_wait_max_batch) waits for its routing: one frame. The batch of
    # three is answered first: its results, then its deliveries.
    assert link.frames == [(2, 0, 2, 0), (3, 0, 0, 0), (0, 0, 3, 0)]
