"""AccountService over a real SQLite store: passwords, tokens, rotation, reuse detection, revocation."""

from __future__ import annotations

import asyncio
import hashlib

import jwt
import pytest

from im.backends.accounts.sqlite import SqliteAccountStore
from im.core.accounts import AccountService, Principal
from im.model.accounts import AuthSession
from im.model.errors import ErrorCode, ImError

SECRET = b"test-secret-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_service(store: SqliteAccountStore, clock: Clock, **kw: object) -> AccountService:
    args: dict[str, object] = {
        "secret": SECRET,
        "access_ttl": 60.0,
        "refresh_ttl": 3600.0,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 8,
        "argon2_parallelism": 1,
        "min_password_length": 8,
        "clock": clock,
    }
    args.update(kw)
    return AccountService(store, **args)  # type: ignore[arg-type]


@pytest.fixture
def accounts(store: SqliteAccountStore, clock: Clock) -> AccountService:
    return make_service(store, clock)


async def refused(code: ErrorCode, aw: object) -> ImError:
    with pytest.raises(ImError) as info:
        await aw  # type: ignore[misc]
    assert info.value.code is code, info.value
    return info.value


async def test_register_validates_and_refuses_taken_names(accounts: AccountService) -> None:
    user = await accounts.register("Alice", "password1", "Alice Liddell")
    assert user.username == "Alice" and user.display_name == "Alice Liddell"
    assert (await accounts.register("bob", "password1")).display_name == "bob"
    await refused(ErrorCode.CONFLICT, accounts.register("alice", "password2"))
    for bad in ("ab", "x" * 33, "has space", "émile", "semi;colon", ""):
        await refused(ErrorCode.INVALID, accounts.register(bad, "password1"))
    await refused(ErrorCode.INVALID, accounts.register("carol", "short"))
    await refused(ErrorCode.INVALID, accounts.register("carol", "p" * 2000))
    await refused(ErrorCode.INVALID, accounts.register("carol", "password1", "   "))
    await refused(ErrorCode.INVALID, accounts.register("carol", "password1", "x" * 65))
    assert (await accounts.register("c.a-r_ol", "password1")).uid > user.uid


async def test_password_is_hashed_with_argon2id(accounts: AccountService, store: SqliteAccountStore) -> None:
    await accounts.register("alice", "password1")
    found = await store.find_user("alice")
    assert found is not None and found[1].startswith("$argon2id$") and "password1" not in found[1]


async def test_login_and_authenticate(accounts: AccountService, clock: Clock) -> None:
    user = await accounts.register("alice", "password1")
    tokens = await accounts.login("ALICE", "password1")
    assert tokens.uid == user.uid and tokens.token_type == "bearer" and tokens.expires_in == 60
    claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
    assert claims["sub"] == str(user.uid) and claims["typ"] == "access"
    assert claims["exp"] - claims["iat"] == 60
    sid = tokens.refresh_token.split(".", 1)[0]
    assert claims["sid"] == sid
    assert await accounts.authenticate(tokens.access_token) == Principal(uid=user.uid, sid=sid)
    clock.now += 61
    await refused(ErrorCode.AUTH_FAILED, accounts.authenticate(tokens.access_token))


async def test_bad_credentials_look_the_same(accounts: AccountService) -> None:
    await accounts.register("alice", "password1")
    wrong = await refused(ErrorCode.BAD_CREDENTIALS, accounts.login("alice", "password2"))
    unknown = await refused(ErrorCode.BAD_CREDENTIALS, accounts.login("nobody", "password1"))
    assert wrong.message == unknown.message


async def test_forged_or_foreign_tokens_fail(accounts: AccountService, store: SqliteAccountStore, clock: Clock) -> None:
    await accounts.register("alice", "password1")
    tokens = await accounts.login("alice", "password1")
    other = make_service(store, clock, secret=b"another-secret-0123456789abcdef")
    await refused(ErrorCode.AUTH_FAILED, other.authenticate(tokens.access_token))
    for bad in ("", "garbage", tokens.access_token + "x", tokens.refresh_token):
        await refused(ErrorCode.AUTH_FAILED, accounts.authenticate(bad))
    claims = {"sub": "1", "sid": "x", "iat": 1, "exp": 2**40, "typ": "access"}
    unsigned = jwt.encode(claims, "", algorithm="none")
    await refused(ErrorCode.AUTH_FAILED, accounts.authenticate(unsigned))


async def test_refresh_rotates(accounts: AccountService) -> None:
    user = await accounts.register("alice", "password1")
    first = await accounts.login("alice", "password1")
    second = await accounts.refresh(first.refresh_token)
    assert second.uid == user.uid and second.refresh_token != first.refresh_token
    third = await accounts.refresh(second.refresh_token)
    principal = await accounts.authenticate(third.access_token)
    assert principal.uid == user.uid
    assert principal.sid == first.refresh_token.split(".")[0]  # same session throughout


async def test_refresh_token_reuse_revokes_the_session(accounts: AccountService) -> None:
    await accounts.register("alice", "password1")
    first = await accounts.login("alice", "password1")
    second = await accounts.refresh(first.refresh_token)
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh(first.refresh_token))  # reuse: stolen token
    # The legitimate holder's newer tokens are dead too.
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh(second.refresh_token))
    await refused(ErrorCode.AUTH_FAILED, accounts.authenticate(second.access_token))
    # Other sessions are untouched.
    other = await accounts.login("alice", "password1")
    await accounts.authenticate(other.access_token)


async def test_concurrent_refresh_with_one_token_lets_one_win_at_most(accounts: AccountService) -> None:
    await accounts.register("alice", "password1")
    first = await accounts.login("alice", "password1")
    attempts = (accounts.refresh(first.refresh_token) for _ in range(3))
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) <= 1
    assert any(isinstance(r, ImError) and r.code is ErrorCode.AUTH_FAILED for r in results)


async def test_refresh_rejects_garbage_and_expired(accounts: AccountService, clock: Clock) -> None:
    await accounts.register("alice", "password1")
    for bad in ("", ".", "nosid", "unknown.token"):
        await refused(ErrorCode.AUTH_FAILED, accounts.refresh(bad))
    tokens = await accounts.login("alice", "password1")
    clock.now += 3601
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh(tokens.refresh_token))


async def test_logout_ends_refresh_and_access(accounts: AccountService) -> None:
    await accounts.register("alice", "password1")
    tokens = await accounts.login("alice", "password1")
    principal = await accounts.authenticate(tokens.access_token)  # now cached as live
    await accounts.logout(principal.sid)
    await refused(ErrorCode.AUTH_FAILED, accounts.authenticate(tokens.access_token))
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh(tokens.refresh_token))


async def test_logout_through_another_process_takes_effect_after_the_cache_ttl(
    store: SqliteAccountStore, clock: Clock
) -> None:
    api = make_service(store, clock, session_cache_ttl=0.05)
    gateway = make_service(store, clock, session_cache_ttl=0.05)
    await api.register("alice", "password1")
    tokens = await api.login("alice", "password1")
    principal = await gateway.authenticate(tokens.access_token)
    await api.logout(principal.sid)
    await asyncio.sleep(0.06)
    await refused(ErrorCode.AUTH_FAILED, gateway.authenticate(tokens.access_token))


async def test_login_rehashes_when_parameters_change(store: SqliteAccountStore, clock: Clock) -> None:
    await make_service(store, clock).register("alice", "password1")
    before = await store.find_user("alice")
    stronger = make_service(store, clock, argon2_time_cost=2)
    await stronger.login("alice", "password1")
    after = await store.find_user("alice")
    assert before is not None and after is not None
    assert before[1] != after[1] and "t=2" in after[1]
    await stronger.login("alice", "password1")  # still verifies
    again = await store.find_user("alice")
    assert again is not None and again[1] == after[1]  # no rehash when nothing changed


async def test_contacts_rules(accounts: AccountService) -> None:
    alice = await accounts.register("alice", "password1")
    bob = await accounts.register("bob", "password1")
    await refused(ErrorCode.INVALID, accounts.add_contact(alice.uid, alice.uid))
    await refused(ErrorCode.NOT_FOUND, accounts.add_contact(alice.uid, 9999))
    await accounts.add_contact(alice.uid, bob.uid)
    assert await accounts.contacts(alice.uid) == [bob]
    await accounts.remove_contact(alice.uid, bob.uid)
    await refused(ErrorCode.NOT_FOUND, accounts.remove_contact(alice.uid, bob.uid))


async def test_short_secret_is_refused(store: SqliteAccountStore, clock: Clock) -> None:
    with pytest.raises(ValueError):
        make_service(store, clock, secret=b"short")


async def test_idle_and_absolute_session_lifetimes(store: SqliteAccountStore, clock: Clock) -> None:
    accounts = make_service(store, clock, refresh_ttl=100.0, session_max_age=250.0)
    await accounts.register("ivy", "password1")
    tokens = await accounts.login("ivy", "password1")
    # Idle: a refresh within the idle time moves it on ...
    for _ in range(2):
        clock.now += 90
        tokens = await accounts.refresh(tokens.refresh_token)
    # ... but never past the absolute limit, 250 s after the login (now at +180; the next expiry is capped).
    clock.now += 60
    tokens = await accounts.refresh(tokens.refresh_token)
    clock.now += 11  # +251: past the absolute limit, though only 11 s idle
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh(tokens.refresh_token))
    # Idle expiry on its own: unused for longer than refresh_ttl.
    other = await accounts.login("ivy", "password1")
    clock.now += 101
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh(other.refresh_token))


async def test_forged_refresh_token_revokes_nothing(accounts: AccountService) -> None:
    await accounts.register("jay", "password1")
    tokens = await accounts.login("jay", "password1")
    me = await accounts.authenticate(tokens.access_token)
    for forged in (f"{me.sid}.x", f"{me.sid}.1.{'A' * 43}", f"{me.sid}.0.", f"{me.sid}..", f"x{tokens.refresh_token}"):
        error = await refused(ErrorCode.AUTH_FAILED, accounts.refresh(forged))
        assert "reused" not in error.message
    assert await accounts.authenticate(tokens.access_token) == me  # the session lives on
    assert (await accounts.refresh(tokens.refresh_token)).uid == me.uid


async def test_change_password_revokes_the_other_sessions(accounts: AccountService) -> None:
    await accounts.register("kay", "password1")
    mine, other = await accounts.login("kay", "password1"), await accounts.login("kay", "password1")
    me = await accounts.authenticate(mine.access_token)
    revoked: list[str] = []
    accounts.on_revoke(revoked.append)
    await refused(ErrorCode.FORBIDDEN, accounts.change_password(me, "wrong-password", "password2"))
    await refused(ErrorCode.INVALID, accounts.change_password(me, "password1", "short"))
    assert revoked == []
    await accounts.change_password(me, "password1", "password2")
    assert revoked == [other.refresh_token.split(".")[0]]
    await accounts.refresh(mine.refresh_token)  # this session goes on
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh(other.refresh_token))
    await refused(ErrorCode.BAD_CREDENTIALS, accounts.login("kay", "password1"))
    assert [s.current for s in await accounts.sessions(me)] == [True]


async def test_refresh_token_of_the_older_format_works_once_and_proves_nothing(
    accounts: AccountService, store: SqliteAccountStore, clock: Clock
) -> None:
    """Sessions stored by a version before signed refresh tokens keep working after an upgrade."""
    user = await accounts.register("lee", "password1")
    legacy = "legacysid0123456789abc.some-random-part"
    digest = hashlib.sha256(legacy.encode()).hexdigest()
    await store.create_session(AuthSession("legacysid0123456789abc", user.uid, digest, int(clock.now + 100), False))
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh("legacysid0123456789abc.wrong"))  # revokes nothing
    tokens = await accounts.refresh(legacy)
    assert tokens.refresh_token.count(".") == 2
    await refused(ErrorCode.AUTH_FAILED, accounts.refresh(legacy))  # used: refused, but proves no reuse
    assert (await accounts.refresh(tokens.refresh_token)).uid == user.uid


async def test_blocks_per_user_are_capped(store: SqliteAccountStore, clock: Clock) -> None:
    accounts = make_service(store, clock, max_blocks=2)
    me = await accounts.register("blocker", "password1")
    others = [await accounts.register(f"other{i}", "password1") for i in range(3)]
    await accounts.block(me.uid, others[0].uid)
    await accounts.block(me.uid, others[1].uid)
    await accounts.block(me.uid, others[1].uid)  # idempotent at the cap
    with pytest.raises(ImError) as refused:
        await accounts.block(me.uid, others[2].uid)
    assert refused.value.code is ErrorCode.INVALID
    assert [u.uid for u in await accounts.blocks(me.uid)] == sorted(u.uid for u in others[:2])
