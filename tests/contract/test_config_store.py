"""The :class:`ConfigStore` contract (the configuration centre), run against every implementation: in
memory and on etcd (the shared private etcd of the suite, under a fresh prefix). Then what etcd adds: a
second process sees the changes, and a watch resumes after an etcd restart."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from im.backends.config import ConfigStore
from im.backends.config.etcd import EtcdConfigStore
from im.backends.config.memory import MemoryConfigStore
from im.backends.registry.etcd import EtcdRegistry
from tests.contract.lifecycle import check_lifecycle
from tests.support.etcd import EtcdProcess, shared_etcd
from tests.support.wait import eventually

HISTORY = 5


class _Stores:
    """Stores of one engine sharing one key space; all closed at the end."""

    def __init__(self, kind: str, endpoint: str | None = None) -> None:
        self.kind = kind
        self.endpoint = endpoint
        self.prefix = f"/im-test/{uuid.uuid4().hex[:12]}/config/"
        self._memory = MemoryConfigStore(history_limit=HISTORY)
        self._registries: list[EtcdRegistry] = []
        self._stores: list[ConfigStore] = []

    def make(self, *, fresh: bool = False) -> ConfigStore:
        """A store on the shared key space (in memory: the one store, unless ``fresh``)."""
        if self.kind == "memory":
            return MemoryConfigStore(history_limit=HISTORY) if fresh else self._memory
        registry = EtcdRegistry(self.endpoint or shared_etcd().endpoint, prefix="/im-test/x/", keepalive=False)
        self._registries.append(registry)
        store = EtcdConfigStore(registry, self.prefix, history_limit=HISTORY)
        self._stores.append(store)
        return store

    async def close(self) -> None:
        for store in self._stores:
            await store.close()
        if self._registries:
            registry = self._registries[0]
            if self.endpoint is None:
                await registry.client.delete_prefix(self.prefix.encode())
        for registry in self._registries:
            await registry.close()
        await self._memory.close()


@pytest.fixture(params=["memory", "etcd"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[_Stores]:
    s = _Stores(request.param)
    yield s
    await s.close()


async def test_set_get_unset_and_history(stores: _Stores) -> None:
    store = stores.make()
    await store.start()
    assert await store.values() == {}
    first = await store.set("limits.send_rate", "500", by="alice@a")
    assert (first.key, first.old, first.new, first.by) == ("limits.send_rate", None, "500", "alice@a")
    second = await store.set("limits.send_rate", "20", by="bob@b")
    assert (second.old, second.new) == ("500", "20")
    await store.set("log_level", "debug", by="bob@b")
    assert await store.values() == {"limits.send_rate": "20", "log_level": "debug"}
    removed = await store.unset("log_level", by="carol@c")
    assert removed is not None and (removed.old, removed.new) == ("debug", None)
    assert await store.unset("log_level", by="carol@c") is None  # not set: nothing recorded
    assert await store.values() == {"limits.send_rate": "20"}
    changes = await store.history()
    assert [(c.key, c.old, c.new, c.by) for c in changes] == [
        ("limits.send_rate", None, "500", "alice@a"),
        ("limits.send_rate", "500", "20", "bob@b"),
        ("log_level", None, "debug", "bob@b"),
        ("log_level", "debug", None, "carol@c"),
    ]
    assert all(a.at <= b.at for a, b in itertools.pairwise(changes))
    assert [c.new for c in await store.history("limits.send_rate")] == ["500", "20"]


async def test_history_is_bounded_newest_kept(stores: _Stores) -> None:
    store = stores.make()
    await store.start()
    for i in range(HISTORY + 3):
        await store.set("limits.send_rate", str(i), by="t")
    kept = await store.history()
    assert [c.new for c in kept] == [str(i) for i in range(3, HISTORY + 3)]


async def test_concurrent_writers_lose_no_history_entry(stores: _Stores) -> None:
    a, b = stores.make(), stores.make()
    await a.start()
    await b.start()
    await asyncio.gather(*(s.set(f"k{i}", str(i), by=f"w{i}") for i, s in enumerate([a, b, a, b])))
    assert await a.values() == {"k0": "0", "k1": "1", "k2": "2", "k3": "3"}
    assert sorted(c.by for c in await b.history()) == ["w0", "w1", "w2", "w3"]


async def test_watch_sees_everything_then_every_change(stores: _Stores) -> None:
    writer, watcher = stores.make(), stores.make()
    await writer.start()
    await watcher.start()
    await writer.set("limits.send_rate", "5", by="t")
    seen: list[dict[str, str]] = []
    stop = watcher.watch(seen.append)
    await eventually(lambda: seen and seen[-1] == {"limits.send_rate": "5"}, timeout=5)
    await writer.set("log_level", "debug", by="t")
    await eventually(lambda: seen[-1] == {"limits.send_rate": "5", "log_level": "debug"}, timeout=5)
    await writer.unset("limits.send_rate", by="t")
    await eventually(lambda: seen[-1] == {"log_level": "debug"}, timeout=5)
    stop()
    count = len(seen)
    await writer.set("log_level", "info", by="t")
    await asyncio.sleep(0.2)  # a stopped watch stays silent: nothing to poll for
    assert len(seen) == count


async def test_lifecycle(stores: _Stores) -> None:
    await check_lifecycle(lambda: stores.make(fresh=True), lambda s: s.values())


@pytest.fixture
def private_etcd() -> Iterator[EtcdProcess]:
    etcd = EtcdProcess().start()
    yield etcd
    etcd.destroy()


async def test_etcd_watch_resumes_after_a_restart(private_etcd: EtcdProcess) -> None:
    stores = _Stores("etcd", private_etcd.endpoint)
    try:
        writer, watcher = stores.make(), stores.make()
        seen: list[dict[str, str]] = []
        watcher.watch(seen.append)
        await writer.set("limits.send_rate", "5", by="t")
        await eventually(lambda: seen and seen[-1] == {"limits.send_rate": "5"}, timeout=5)

        await asyncio.to_thread(private_etcd.restart)

        async def written() -> bool:
            try:
                await writer.set("limits.send_rate", "7", by="t")
            except Exception:
                return False  # the channel is still reconnecting
            return True

        await eventually(written, "a set after the restart", timeout=10)
        await eventually(lambda: seen[-1] == {"limits.send_rate": "7"}, lambda: f"seen {seen[-3:]}", timeout=5)
        assert [c.new for c in await watcher.history()] == ["5", "7"]
    finally:
        await stores.close()
