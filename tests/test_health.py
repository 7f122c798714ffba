"""Readiness (im.observability.health) on real engines, and ``/api/v1/health`` of a real ``im serve`` whose
database goes away and comes back."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from im.backends.chat.postgres import PostgresChatStore
from im.backends.presence.redis import RedisPresence
from im.backends.registry.memory import MemoryRegistry
from im.observability.health import Readiness
from im.procs import free_port
from tests.support.postgres import DSN, PgSchema
from tests.support.proxy import TcpProxy
from tests.support.server import running_server
from tests.support.wait import eventually


async def test_checks_name_what_fails_and_a_flood_of_probes_costs_one_round() -> None:
    live = RedisPresence("redis://127.0.0.1:6379/0", prefix="im-health-test:")
    dead = RedisPresence(f"redis://127.0.0.1:{free_port()}/0", prefix="im-health-test:")
    registry = MemoryRegistry()
    pings = 0

    async def counted() -> None:
        nonlocal pings
        pings += 1
        await live.ping()

    now = [1000.0]  # the cache's clock: moved by hand, so a slow machine cannot expire the cache mid-flood
    r = Readiness(cache_for=0.5, clock=lambda: now[0])
    r.add("presence", counted)
    r.add("registry", registry.ping)
    async with live, dead, registry:
        ok, details = await r.check()
        assert not ok and details["registered"] is False and details["draining"] is False  # not registered yet
        assert {name: c["ok"] for name, c in details["checks"].items()} == {"presence": True, "registry": True}  # type: ignore[attr-defined]
        r.registered = True
        results = await asyncio.gather(*(r.check() for _ in range(200)))
        assert all(ok for ok, _ in results) and pings == 1 and r.rounds == 1  # cached: one round for all
        now[0] += 0.49
        assert (await r.check())[0] and pings == 1  # still cached
        now[0] += 0.02
        assert (await r.check())[0] and pings == 2  # the cache expired: the next probe asks again
        r.start_draining()
        ok, details = await r.check()
        assert not ok and details["draining"] is True

        # A dead engine fails with its error; a silent one fails by the check's timeout.
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts into the backlog, never answers
        mute = RedisPresence(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", prefix="x:", timeout=30)
        try:
            bad = Readiness(cache_for=0)
            bad.add("dead", dead.ping, timeout=2.0)
            bad.add("mute", mute.ping, timeout=0.3)
            bad.registered = True
            ok, details = await bad.check()
        finally:
            await mute.close()
            silent.close()
        checks = details["checks"]
        assert isinstance(checks, dict) and not ok
        assert checks["dead"]["ok"] is False and "Connection" in str(checks["dead"]["error"])
        assert checks["mute"] == {"ok": False, "ms": checks["mute"]["ms"], "error": "no answer within 0.3 s"}


async def test_store_ping_fails_when_postgres_is_cut_off() -> None:
    schema = PgSchema()
    host, port = DSN.split("@", 1)[1].split("/", 1)[0].split(":")
    with TcpProxy((host, int(port))) as proxy:
        db = schema.database()
        db.dsn = DSN.replace(f"{host}:{port}", proxy.address)
        db.command_timeout = 2.0
        store = PostgresChatStore(db)
        try:
            async with store:
                await store.ping()
                proxy.stop()
                with pytest.raises((OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                    await asyncio.wait_for(store.ping(), 5)
                proxy.start()
                await eventually(_pings(store), "the pool reconnects", timeout=10)
        finally:
            await schema.drop()


def _pings(store: PostgresChatStore) -> Callable[[], Awaitable[bool]]:
    async def ok() -> bool:
        try:
            await store.ping()
        except Exception:
            return False
        return True

    return ok


async def test_serve_health_is_503_while_its_database_is_gone(tmp_path: Path) -> None:
    schema = PgSchema()
    host, port = DSN.split("@", 1)[1].split("/", 1)[0].split(":")
    with TcpProxy((host, int(port))) as proxy:
        dsn = DSN.replace(f"{host}:{port}", proxy.address)
        extra = [
            *("--set", "store.kind=postgres"),
            *("--set", f"store.postgres_dsn={dsn}"),
            *("--set", f"store.postgres_schema={schema.name}"),
        ]
        try:
            with running_server(tmp_path / "data", extra) as server:
                async with httpx.AsyncClient(timeout=10) as http:
                    r = await http.get(f"{server.api}/health")
                    assert (r.status_code, r.json()) == (200, {"status": "ok"})
                    proxy.stop()

                    async def unavailable() -> bool:
                        r = await http.get(f"{server.api}/health/ready")
                        return r.status_code == 503 and r.json() == {"status": "unavailable", "failing": ["store"]}

                    await eventually(unavailable, "readiness fails without the database", timeout=15)
                    r = await http.get(f"{server.api}/health")
                    assert r.status_code == 503 and r.json()["failing"] == ["store"]
                    assert (await http.get(f"{server.api}/health/live")).status_code == 200
                    proxy.start()

                    async def ok() -> bool:
                        return (await http.get(f"{server.api}/health")).status_code == 200

                    await eventually(ok, "ready again once the database is back", timeout=15)
        finally:
            await schema.drop()


async def test_sqlite_store_ping_answers_while_open_and_raises_once_closed(tmp_path: Path) -> None:
    from im.backends.chat.sqlite import SqliteChatStore
    from im.backends.sql.sqlite_db import SqliteDatabase

    store = SqliteChatStore(SqliteDatabase(tmp_path / "im.sqlite3"))
    async with store:
        await store.ping()
    with pytest.raises(RuntimeError, match="not open"):
        await store.ping()
