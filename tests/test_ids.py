"""Message ids (im.core.ids.Snowflake) and the committer's refusal while no node id is held."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence.memory import MemoryPresence
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.committer import SendRequest
from im.core.ids import _EPOCH_MS, Snowflake
from im.model.errors import ErrorCode, ImError
from tests.support.chat import chat_core

T = _EPOCH_MS + 1_000_000


def parts(mid: int) -> tuple[int, int, int]:
    return (mid >> 22) + _EPOCH_MS, (mid >> 12) & 0x3FF, mid & 0xFFF


def test_ids_increase_within_a_millisecond_and_borrow_the_next_past_4096() -> None:
    ids = Snowflake(5)
    mids = [ids.next(T) for _ in range(4097)]
    assert mids == sorted(set(mids))
    assert parts(mids[0]) == (T, 5, 0)
    assert parts(mids[-1]) == (T + 1, 5, 0)  # borrowed
    assert ids.next(T - 10) > mids[-1]  # the clock stepping back changes nothing


def test_a_new_claim_mints_after_its_predecessor_and_above_its_own_past() -> None:
    ids = Snowflake(None)
    assert ids.node is None and not ids.can_mint(T)
    with pytest.raises(RuntimeError, match="no node id"):
        ids.next(T)
    ids.assign(7, after_ms=T + 500)  # the previous holder of 7 used up to T + 500
    first = ids.next(T)  # this clock reads earlier
    assert parts(first) == (T + 501, 7, 0)
    ids.revoke()
    assert not ids.can_mint(T + 600)
    ids.assign(3)  # another id: still above every id minted here, though 3 < 7
    assert ids.next(T) > first


def test_minting_stays_within_the_reservation() -> None:
    ids = Snowflake(None)
    ids.assign(1, until_ms=T + 100)
    assert ids.can_mint(T) and ids.can_mint(T + 99)
    assert not ids.can_mint(T + 100)  # the borrowed millisecond too must fit
    assert not ids.can_mint(T, 4096 * 200)
    ids.extend(T + 1000)
    assert ids.can_mint(T + 100)
    with pytest.raises(ValueError, match=r"0\.\.1023"):
        ids.assign(1024)


async def test_the_committer_refuses_sends_while_no_node_id_is_held(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "im.db")
    chat, accounts = SqliteChatStore(db), SqliteAccountStore(db)
    await chat.start()
    await accounts.start()
    svc = chat_core(chat, accounts, MemoryRouter(), MemoryPresence())
    svc.committer.start()
    try:
        a = (await accounts.create_user("ann", "ann", "hash", 0)).uid
        b = (await accounts.create_user("ben", "ben", "hash", 0)).uid
        m, _ = await svc.committer.send(send(a, b, "before"))
        svc.committer.ids.revoke()  # the claim was lost
        with pytest.raises(ImError) as refused:
            await svc.committer.send(send(a, b, "during"))
        assert refused.value.code is ErrorCode.UNAVAILABLE and "retry" in refused.value.message
        with pytest.raises(ImError) as no_group:
            await svc.groups.create_group(a, "g", [b])
        assert no_group.value.code is ErrorCode.UNAVAILABLE
        svc.committer.ids.assign(9)  # claimed again (another id)
        again, dup = await svc.committer.send(send(a, b, "during"))  # the client's resend: stored once, now
        assert not dup and again.seq == m.seq + 1 and (again.mid >> 12) & 0x3FF == 9 and again.mid > m.mid
    finally:
        await svc.committer.stop()
        await accounts.close()
        await chat.close()


def send(uid: int, to: int, cmid: str) -> SendRequest:
    return SendRequest(uid, "d", cmid, None, to, "text", msgspec.json.encode(cmid))
