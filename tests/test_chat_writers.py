"""Two committers on one store (an API process and a transfer node, or two transfer nodes): membership
changed by one is honoured by the other, and the log stays dense."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from im.core.committer import SendRequest
from im.model.cluster import DeviceLocation
from im.model.errors import ErrorCode, ImError
from tests.support.chat import ChatCore, two_writers
from tests.transfer.conftest import RecordingSink


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[ChatCore, ChatCore]]:
    async with two_writers(tmp_path / "im.db", ("ann", "ben", "cat")) as cores:
        yield cores


def send(uid: int, conv: str, cmid: str) -> SendRequest:
    return SendRequest(uid, "d", cmid, conv, None, "text", msgspec.json.encode(cmid))


async def test_membership_changed_elsewhere_is_honoured(pair: tuple[ChatCore, ChatCore]) -> None:
    api, node = pair
    group = await api.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    m, _ = await node.committer.send(send(1, conv, "first"))  # the node caches the group: members 1 and 2
    assert m.seq == 2
    await api.groups.add_members(1, group.gid, [3])  # seq 3, through the other committer
    m, _ = await node.committer.send(send(3, conv, "newcomer"))  # the cache says 3 is no member: re-read, accept
    assert m.seq == 4
    await api.groups.remove_member(1, group.gid, 2)  # seq 5
    with pytest.raises(ImError) as refused:
        await node.committer.send(send(2, conv, "gone"))  # the cache says 2 is a member: the head check catches it
    assert refused.value.code is ErrorCode.NOT_MEMBER
    m, _ = await node.committer.send(send(1, conv, "after"))
    assert m.seq == 6
    page, _ = await api.reads.history(1, conv, after=0, before=None, limit=50)
    assert [x.seq for x in page] == [1, 2, 3, 4, 5, 6]
    assert [x.cmid for x in page if x.type == "text"] == ["first", "newcomer", "after"]


async def test_a_duplicate_first_stored_by_the_other_writer_is_routed_again(
    pair: tuple[ChatCore, ChatCore],
) -> None:
    """A writer that committed and died before routing: the resend through the other writer is answered
    as a duplicate and delivered to the online members (once; sessions drop seqs they already have)."""
    first, second = pair
    group = await first.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    sink = RecordingSink()
    second.router.attach("gw", sink)
    await second.presence.set_online([DeviceLocation(2, "phone", "gw")], 60)
    m, dup = await first.committer.send(send(1, conv, "x"))  # first's router reaches nobody: "died before routing"
    assert (m.seq, dup) == (2, False) and sink.messages == []
    again, dup = await second.committer.send(send(1, conv, "x"))
    assert dup and (again.seq, again.mid) == (m.seq, m.mid)
    assert [(x.seq, r) for x, r in sink.messages] == [(2, [2])]
    # A plain retry that the second writer itself answered before is not routed again.
    await second.committer.send(send(1, conv, "x"))
    assert len(sink.messages) == 1
