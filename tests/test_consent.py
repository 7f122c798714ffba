"""The consent rules (im.core.consent) over a real account store: what a check refuses, and how long a
cached block lasts in distributed mode (``ttl``) versus in ``im serve`` (until ``forget``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from im.backends.accounts import AccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.consent import Consent
from im.model.errors import ErrorCode, ImError


class Clock:
    now = 1_000.0

    def __call__(self) -> float:
        return self.now


def refused(code: ErrorCode, fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(ImError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    assert info.value.code is code, info.value
    return info.value.message


async def test_checks_and_cache_lifetimes(store: AccountStore, tmp_path: Path) -> None:
    chat = SqliteChatStore(SqliteDatabase(tmp_path / "chat.db"))
    await chat.start()
    try:
        a, m, c = [await store.create_user(n, n, "h", 1) for n in ("ann", "mal", "cat")]
        clock = Clock()
        serve = Consent(store, chat)  # im serve: cached until forget
        cluster = Consent(store, chat, ttl=2.0, clock=clock)  # distributed: read again after 2 s
        for consent in (serve, cluster):
            await consent.prepare({a.uid, m.uid, c.uid}, [], [f"d:{a.uid}:{m.uid}"])
            consent.check_send(m.uid, a.uid, new=False)
            assert consent.restricted == set()
        assert f"d:{a.uid}:{m.uid}" in serve.fresh_convs()

        await store.block(a.uid, m.uid, 2)
        await store.set_contacts_only(c.uid, True)
        # Cached: neither sees the change yet.
        for consent in (serve, cluster):
            await consent.prepare({a.uid, m.uid}, [])
            consent.check_send(m.uid, a.uid, new=False)
        # im serve: the account service calls forget; the change is seen at once.
        serve.forget(a.uid)
        serve.forget(c.uid)
        assert serve.fresh_convs() == set()
        await serve.prepare({a.uid, m.uid, c.uid}, [(m.uid, c.uid)])
        same = refused(ErrorCode.FORBIDDEN, serve.check_send, m.uid, a.uid, new=False)
        assert refused(ErrorCode.FORBIDDEN, serve.check_send, m.uid, c.uid, new=True) == same.replace(
            str(a.uid), str(c.uid)
        ), "a block and contacts-only read the same"
        serve.check_send(m.uid, c.uid, new=False)  # contacts-only does not stop an existing conversation
        assert "unblock" in refused(ErrorCode.FORBIDDEN, serve.check_send, a.uid, m.uid, new=False)
        refused(ErrorCode.FORBIDDEN, serve.check_add, m.uid, a.uid)
        serve.check_add(c.uid, a.uid)
        assert serve.restricted == {a.uid, c.uid}
        assert await serve.hidden_from(a.uid, [m.uid, c.uid]) == {m.uid}
        assert await serve.hidden_from(m.uid, [a.uid, c.uid]) == {a.uid}
        # Distributed: within the TTL the old answer, after it the new one.
        clock.now += 1.5
        assert f"d:{a.uid}:{m.uid}" in cluster.fresh_convs()
        await cluster.prepare({a.uid, m.uid}, [])
        cluster.check_send(m.uid, a.uid, new=False)
        clock.now += 1.0
        assert cluster.fresh_convs() == set()
        await cluster.prepare({a.uid, m.uid}, [])
        refused(ErrorCode.FORBIDDEN, cluster.check_send, m.uid, a.uid, new=False)
        # Unknown and deleted users take nothing.
        await serve.prepare({99_999}, [])
        refused(ErrorCode.NOT_FOUND, serve.check_send, m.uid, 99_999, new=True)
        refused(ErrorCode.NOT_FOUND, serve.check_add, m.uid, 99_999)
    finally:
        await chat.close()
