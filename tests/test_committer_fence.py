"""Fencing in the committer: two committers on one store (two processes) minting under the same node id
one after the other, as when a node paused past its lease wakes up after another took its node id over.
The store refuses the old holder's batches; the old holder refuses its sends ``unavailable`` (retryable),
stops minting and tells its claim; nothing it sent lands in the log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from im.core.committer import SendRequest
from im.model.errors import ErrorCode, ImError
from im.model.ids import direct_conv
from tests.support.chat import ChatCore, two_writers


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[ChatCore, ChatCore]]:
    async with two_writers(tmp_path / "im.db", ("ann", "ben")) as cores:
        yield cores


def send(cmid: str) -> SendRequest:
    return SendRequest(1, "d", cmid, None, 2, "text", msgspec.json.encode(cmid))


async def test_the_old_holder_of_a_node_id_is_fenced_off(pair: tuple[ChatCore, ChatCore]) -> None:
    old, new = pair
    lost: list[str] = []
    old.committer.ids.on_refused = lambda: lost.append("lost")
    old.committer.ids.assign(5, token=10)
    first, _ = await old.committer.send(send("a"))  # records token 10 for node id 5, then commits
    assert (first.mid >> 12) & 0x3FF == 5
    # Another process claims node id 5 (a later claim: a higher token) and commits under it.
    new.committer.ids.assign(5, after_ms=old.committer.ids.last_ms, token=11)
    second, _ = await new.committer.send(send("b"))
    assert second.seq == 2
    # The old holder wakes up still believing it holds node id 5: the store refuses its batch.
    with pytest.raises(ImError) as refused:
        await old.committer.send(send("c"))
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert old.committer.fence_refusals == 1 and lost == ["lost"]
    assert old.committer.ids.node is None  # it mints nothing more until a new claim
    with pytest.raises(ImError) as again:
        await old.committer.send(send("c"))
    assert again.value.code is ErrorCode.UNAVAILABLE
    log = await new.store.read_range(direct_conv(1, 2), 0, None, 10)
    assert [m.cmid for m in log] == ["a", "b"]
    # Claimed again (another id, a new token), the same send (same cmid) goes through.
    old.committer.ids.assign(6, token=12)
    third, dup = await old.committer.send(send("c"))
    assert (third.seq, dup, (third.mid >> 12) & 0x3FF) == (3, False, 6)


async def test_a_new_claim_whose_token_is_already_beaten_mints_nothing(pair: tuple[ChatCore, ChatCore]) -> None:
    """Recording the token comes before minting: a claim older than the one recorded (a late claimant's
    first pass) is refused before any id is minted under it."""
    old, new = pair
    new.committer.ids.assign(7, token=20)
    await new.committer.send(send("a"))
    old.committer.ids.assign(7, token=19)
    with pytest.raises(ImError) as refused:
        await old.committer.send(send("b"))
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert old.committer.ids.node is None and old.committer.ids.last_ms == 0  # nothing minted
    assert [m.cmid for m in await new.store.read_range(direct_conv(1, 2), 0, None, 10)] == ["a"]


async def test_a_group_creation_of_the_old_holder_is_fenced_off(pair: tuple[ChatCore, ChatCore]) -> None:
    old, new = pair
    old.committer.ids.assign(5, token=10)
    await old.committer.create_group(1, "before", {1: "owner", 2: "member"})
    new.committer.ids.assign(5, after_ms=old.committer.ids.last_ms, token=11)
    await new.committer.send(send("b"))  # records token 11
    with pytest.raises(ImError) as refused:
        await old.committer.create_group(1, "after", {1: "owner", 2: "member"})
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert old.committer.ids.node is None and old.committer.fence_refusals == 1
    names = {c.title for c in await new.store.list_conversations(1)}
    assert "before" in names and "after" not in names
