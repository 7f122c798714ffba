"""What :class:`EtcdRegistry` promises beyond the shared contract: its own keepalives (a crashed owner
goes within its TTL, a clean stop at once), recovery of a lost lease, and an etcd restart (watches reopen
and see later changes, registrations survive). Needs the ``etcd`` binary: these tests fail, never skip,
when it is missing (``tests/support/etcd.py`` says how to install it)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aetcd
import aetcd.rpc
import grpc
import pytest

from im.backends.registry.etcd import EtcdRegistry
from im.model.cluster import ServiceInstance
from im.procs import free_port
from tests.support.etcd import EtcdCluster, EtcdMissing, EtcdProcess, shared_etcd
from tests.support.wait import eventually

TTL = 2.0  # etcd leases are whole seconds
EXPIRY_LAG = 1.0  # etcd revokes expired leases every 0.5 s; a margin on a busy machine


def gw(node: str, load: int = 0) -> ServiceInstance:
    return ServiceInstance("gateway", node, {"ws": f"ws://{node}:8081/ws"}, load)


def record_into(seen: dict[str, list[str]], role: str) -> Callable[[list[ServiceInstance]], None]:
    """A watch callback that keeps the nodes of ``role`` listed last in ``seen[role]``."""

    def record(live: list[ServiceInstance]) -> None:
        seen[role] = [i.node for i in live]

    return record


def by_node(instances: list[ServiceInstance]) -> list[ServiceInstance]:
    return sorted(instances, key=lambda i: i.node)


async def retrying(call: Callable[[], Awaitable[object]], timeout: float = 5.0) -> None:
    """Repeat ``call`` until etcd answers (a call right after a restart may find the channel down)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await call()
            return
        except aetcd.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class Listing:
    """The instances of a role as ``observer`` reads them from etcd, polled (not watched)."""

    def __init__(self, observer: EtcdRegistry, role: str = "gateway") -> None:
        self.observer, self.role = observer, role

    async def wait_for(self, expected: list[ServiceInstance], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        got: list[ServiceInstance] = []
        while time.monotonic() < deadline:
            try:
                got = by_node(await self.observer.instances(self.role))
            except aetcd.ClientError:
                got = []
            else:
                if got == expected:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {expected}, still {got} after {timeout}s")


@pytest.fixture
def prefix() -> Iterator[str]:
    yield f"/im-test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture
async def registries(prefix: str) -> AsyncIterator[Callable[..., EtcdRegistry]]:
    """Registries on the shared etcd under one private prefix; all closed, and the prefix deleted, after."""
    made: list[EtcdRegistry] = []

    def make(endpoint: str | None = None, **kwargs: object) -> EtcdRegistry:
        reg = EtcdRegistry(endpoint or shared_etcd().endpoint, prefix=prefix, **kwargs)  # type: ignore[arg-type]
        made.append(reg)
        return reg

    yield make
    for reg in made:
        await reg.close()
    async with EtcdRegistry(shared_etcd().endpoint, prefix=prefix) as cleaner:
        await cleaner.client.delete_prefix(prefix.encode())


@pytest.fixture
def private_etcd() -> Iterator[EtcdProcess]:
    """An etcd of the test's own, to restart without disturbing the others."""
    etcd = EtcdProcess().start()
    yield etcd
    etcd.destroy()


async def test_keepalive_outlives_the_ttl_and_a_killed_owner_goes_within_it(
    registries: Callable[..., EtcdRegistry],
) -> None:
    owner, observer = registries(), registries()
    listing = Listing(observer)
    await owner.register(gw("gw-1"), TTL)
    await asyncio.sleep(TTL * 2)  # nobody calls update_load: the keepalive task alone renews
    assert await observer.instances("gateway") == [gw("gw-1")]

    # A crash: the keepalive stops and the connection goes, nothing is revoked.
    await owner.close()
    killed = time.monotonic()
    assert await observer.instances("gateway") == [gw("gw-1")]  # not removed by the close itself
    await listing.wait_for([], timeout=TTL + EXPIRY_LAG)
    assert time.monotonic() - killed > TTL / 2


async def test_clean_deregister_goes_at_once(registries: Callable[..., EtcdRegistry]) -> None:
    owner, observer = registries(), registries()
    seen: list[list[ServiceInstance]] = []
    observer.watch("gateway", lambda live: seen.append(by_node(live)))
    await owner.register(gw("gw-1"), 60)
    await owner.register(gw("gw-2"), 60)
    await eventually(lambda: bool(seen) and seen[-1] == [gw("gw-1"), gw("gw-2")])
    await owner.deregister("gw-1")
    assert await observer.instances("gateway") == [gw("gw-2")]  # no waiting: the lease was revoked
    await eventually(lambda: seen[-1] == [gw("gw-2")], timeout=1.0)  # far within the 60 s TTL


async def test_a_lost_lease_is_granted_again(registries: Callable[..., EtcdRegistry]) -> None:
    owner, observer = registries(), registries()
    seen: list[list[ServiceInstance]] = []
    observer.watch("gateway", lambda live: seen.append(by_node(live)))
    await owner.register(gw("gw-1", 7), TTL)
    await eventually(lambda: bool(seen) and seen[-1] == [gw("gw-1", 7)])
    # Someone (an operator, or etcd while the owner was cut off) ends the lease under the owner.
    kv = (await observer.client.get_prefix(f"{owner.prefix}gateway/".encode()))[0]
    await observer.client.revoke_lease(kv.lease)
    await eventually(lambda: seen[-1] == [], timeout=1.0)
    await eventually(lambda: seen[-1] == [gw("gw-1", 7)], timeout=TTL)  # the next keepalive puts it back
    new = (await observer.client.get_prefix(f"{owner.prefix}gateway/".encode()))[0]
    assert new.lease != kv.lease


async def test_update_load_after_expiry_registers_again(registries: Callable[..., EtcdRegistry]) -> None:
    owner, observer = registries(keepalive=False), registries()
    listing = Listing(observer)
    await owner.register(gw("gw-1"), 1)
    await listing.wait_for([], timeout=1 + EXPIRY_LAG + 0.5)  # the owner stalled past its TTL
    await owner.update_load("gw-1", 5)  # ... and is back: alive, so listed again
    assert await observer.instances("gateway") == [gw("gw-1", 5)]


async def test_a_lease_refresh_leaves_no_grpc_call_behind(registries: Callable[..., EtcdRegistry]) -> None:
    """Each keepalive's LeaseKeepAlive call is over and freed when the refresh returns. aetcd's own
    ``refresh_lease`` left each one suspended in a reference cycle (about 18 KiB each, mostly in gRPC's C
    core) until a full garbage collection: an API node, which allocates little, held thousands."""
    owner = registries(keepalive=False)
    await owner.register(gw("gw-1"), 60)
    lease = (await owner.client.get_prefix(f"{owner.prefix}gateway/".encode()))[0].lease

    def calls() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, grpc.aio.StreamStreamCall))

    gc.collect()
    gc.disable()  # only reference counting frees anything below
    try:
        before = calls()
        for _ in range(20):
            reply = await owner.client.refresh_lease(lease)
            assert int(reply.TTL) > 0
        assert calls() == before
    finally:
        gc.enable()
    await owner.client.revoke_lease(lease)
    reply = await owner.client.refresh_lease(lease)  # a lease etcd no longer has: TTL 0, as before
    assert reply is None or int(reply.TTL) <= 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill"])
async def test_etcd_restart(
    private_etcd: EtcdProcess, registries: Callable[..., EtcdRegistry], sig: signal.Signals
) -> None:
    owner, observer = registries(private_etcd.endpoint), registries(private_etcd.endpoint)
    listing = Listing(observer)
    seen: list[list[ServiceInstance]] = []
    observer.watch("gateway", lambda live: seen.append(by_node(live)))
    await owner.register(gw("gw-1"), TTL)
    await eventually(lambda: bool(seen) and seen[-1] == [gw("gw-1")])

    # Down for longer than the TTL: keepalives and the watch fail meanwhile; the event loop runs on.
    await asyncio.to_thread(private_etcd.stop, sig)
    await asyncio.sleep(TTL * 1.5)
    await asyncio.to_thread(private_etcd.start)

    # The registration survived (etcd re-arms leases on start) and the watch reopened: it sees what
    # changes after the restart.
    await listing.wait_for([gw("gw-1")])
    await retrying(lambda: owner.register(gw("gw-2"), TTL))
    await eventually(lambda: seen[-1] == [gw("gw-1"), gw("gw-2")], timeout=5.0)
    await retrying(lambda: owner.update_load("gw-1", 9))
    await eventually(lambda: seen[-1] == [gw("gw-1", 9), gw("gw-2")], timeout=5.0)

    # The keepalives got through again: both outlive their TTL.
    await asyncio.sleep(TTL * 2)
    assert by_node(await observer.instances("gateway")) == [gw("gw-1", 9), gw("gw-2")]
    assert seen[-1] == [gw("gw-1", 9), gw("gw-2")]

    await owner.deregister("gw-1")
    await eventually(lambda: seen[-1] == [gw("gw-2")], timeout=1.0)


async def test_close_cancels_every_task_and_unsubscribe_stops_the_view(
    registries: Callable[..., EtcdRegistry],
) -> None:
    def etcd_tasks() -> set[asyncio.Task[object]]:
        return {t for t in asyncio.all_tasks() if t.get_name().startswith("etcd-") and not t.done()}

    reg = registries()
    await reg.register(gw("gw-1"), TTL)
    seen: list[list[ServiceInstance]] = []
    stop_a = reg.watch("gateway", lambda live: seen.append(live))
    stop_b = reg.watch("gateway", lambda live: seen.append(live))
    reg.watch("api", lambda live: None)
    await eventually(lambda: len(seen) == 2)
    assert {t.get_name() for t in etcd_tasks()} == {"etcd-keepalive-gw-1", "etcd-watch-gateway", "etcd-watch-api"}
    stop_a()
    stop_a()  # twice: harmless
    await asyncio.sleep(0.1)
    assert {t.get_name() for t in etcd_tasks()} == {"etcd-keepalive-gw-1", "etcd-watch-gateway", "etcd-watch-api"}
    stop_b()  # the last subscriber of "gateway" leaves: its view stops
    await eventually(lambda: "etcd-watch-gateway" not in {t.get_name() for t in etcd_tasks()})
    await reg.close()
    assert etcd_tasks() == set()


async def test_a_dead_first_member_is_passed_over_within_the_call(prefix: str) -> None:
    """The first member named does not answer: every call moves to the next one and succeeds there (the
    first call too: a node that starts while a member is down starts)."""
    dead = f"127.0.0.1:{free_port()}"
    async with EtcdRegistry([dead, shared_etcd().endpoint], prefix=prefix) as reg:
        await reg.register(gw("gw-1"), TTL)
        assert reg.client.target == shared_etcd().endpoint
        assert await reg.instances("gateway") == [gw("gw-1")]
        await reg.ping()
        await reg.deregister("gw-1")
        assert await reg.instances("gateway") == []
    async with EtcdRegistry([dead, f"127.0.0.1:{free_port()}"], prefix=prefix, timeout=1.0) as nowhere:
        with pytest.raises(aetcd.ConnectionFailedError):
            await nowhere.ping()  # every member tried once, then the error


async def test_many_reports_of_one_failure_move_the_client_once(prefix: str) -> None:
    """Every call and stream on a member fails at once and reports it: only the first report (of the epoch
    the calls began in) moves the client; the later ones, and any made after the move, leave it where it
    is. Three watches are open, so closing the old channel takes a while (the reports arrive meanwhile)."""
    endpoint = shared_etcd().endpoint
    async with EtcdRegistry([endpoint] * 3, prefix=prefix) as reg:
        seen: dict[str, list[str]] = {}
        for role in ("gateway", "transfer", "api"):
            reg.watch(role, record_into(seen, role))
        await eventually(lambda: len(seen) == 3, "three views listed")
        dead = aetcd.ConnectionFailedError("Stream removed (Socket closed)")
        assert await asyncio.gather(*(reg.client.failed(dead, 0) for _ in range(3))) == [True] * 3
        assert reg.client.epoch == 1
        assert await reg.client.failed(dead, 0) and reg.client.epoch == 1  # a late report of the old member
        assert not await reg.client.failed(aetcd.InvalidArgumentError("bad"), 1) and reg.client.epoch == 1
        leader_changed = aetcd.ConnectionFailedError("etcdserver: leader changed")  # the member answered: kept
        assert await reg.client.failed(leader_changed, 1) and reg.client.epoch == 1
        await reg.register(gw("gw-1"), TTL)  # the watches reopened on the new channel
        await eventually(lambda: seen.get("gateway") == ["gw-1"], "the gateway view sees the registration")
        assert reg.client.epoch == 1


async def test_a_keepalive_whose_channel_closes_under_it_goes_on_in_time(prefix: str) -> None:
    """A lease refresh in flight when another call's failure moves the client (and closes the channel
    under the refresh) fails instead of waiting forever for its stream to start (what gRPC does), within
    TTL/3: the keepalive retries on the new channel and the registration never leaves the listing."""
    endpoint = shared_etcd().endpoint
    async with (
        EtcdRegistry([endpoint, endpoint], prefix=prefix) as reg,
        EtcdRegistry(endpoint, prefix=prefix) as view,
    ):
        await reg.register(gw("gw-1"), TTL)
        real, refreshes = reg.client.refresh_lease, 0

        async def refresh_while_moving(lease: int, *, within: float | None = None) -> object:
            nonlocal refreshes
            refreshes += 1
            if refreshes > 1:
                return await real(lease, within=within)
            call = asyncio.ensure_future(real(lease, within=within))
            await asyncio.sleep(0)  # the refresh has its stream; now another call finds the member gone
            await reg.client.failed(aetcd.ConnectionFailedError("Socket closed"), reg.client.epoch)
            return await call

        reg.client.refresh_lease = refresh_while_moving  # type: ignore[method-assign,assignment]
        until = time.monotonic() + 2 * TTL
        while time.monotonic() < until:
            assert await view.instances("gateway") == [gw("gw-1")]
            await asyncio.sleep(0.1)
        assert refreshes >= 3  # the keepalive went on after the one that lost its channel
        assert {t.get_name() for t in reg._tasks} == {"etcd-keepalive-gw-1"}


async def is_leader(endpoint: str) -> bool:
    """Whether the etcd member at ``endpoint`` is its cluster's leader (its own status says so)."""
    async with EtcdRegistry(endpoint, prefix="/im-test/status/") as one:
        await one.client.connect()
        status = await one.client.maintenancestub.Status(aetcd.rpc.StatusRequest(), timeout=5)
        return bool(status.header.member_id == status.leader)


async def test_a_member_killed_under_watches_and_keepalives_moves_the_client_once(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A registry with watches and keepalives open on the first of three members; SIGKILL it: every
    stream and call on it fails together and each reports it, yet the client moves once, to the second
    member, and stays there (it used to move once per report: round to the dead member again, closing the
    live channel under the calls that had moved, whose failures moved it again, until a lease expired).
    The registrations stay listed throughout, and the watches see a later change. The member killed is a
    follower, so that no election runs (keepalives wait through one, and may time out and move on: the
    cluster test with its first member stopped covers that)."""
    etcd = EtcdCluster(3).start()
    try:
        caplog.set_level(logging.WARNING, logger="im.backends.registry.etcd")
        leader = [await is_leader(endpoint) for endpoint in etcd.endpoints]
        first = leader.index(False)  # a follower
        order = [first, *(i for i in range(len(etcd.members)) if i != first)]
        endpoints = [etcd.endpoints[i] for i in order]
        async with EtcdRegistry(endpoints, prefix=prefix, timeout=2.0) as reg:
            seen: dict[str, list[str]] = {}
            for role in ("gateway", "transfer", "api"):
                reg.watch(role, record_into(seen, role))
            await reg.register(gw("gw-1"), TTL)
            await reg.register(ServiceInstance("transfer", "tr-1", {"grpc": "tr-1:9000"}), TTL)
            await eventually(lambda: seen.get("gateway") == ["gw-1"] and seen.get("transfer") == ["tr-1"], "watched")
            caplog.clear()

            await asyncio.to_thread(etcd.members[first].stop, signal.SIGKILL)
            async with EtcdRegistry(endpoints[1:], prefix=prefix, timeout=2.0) as view:
                until = time.monotonic() + 2 * TTL
                while time.monotonic() < until:
                    listed = [i.node for role in ("gateway", "transfer") for i in await view.instances(role)]
                    assert listed == ["gw-1", "tr-1"], listed
                    await asyncio.sleep(0.1)
                moves = [r.getMessage() for r in caplog.records if "etcd member unreachable" in r.getMessage()]
                assert len(moves) == 1 and reg.client.epoch == 1, moves
                assert reg.client.target == endpoints[1]

                await view.register(ServiceInstance("api", "api-1", {"http": "http://api-1:8080"}), TTL)
                await eventually(lambda: seen.get("api") == ["api-1"], "the api watch sees a later change")
                await view.deregister("api-1")
    finally:
        etcd.destroy()


def test_bad_endpoints_are_refused() -> None:
    with pytest.raises(ValueError, match="host:port"):
        EtcdRegistry("localhost")
    with pytest.raises(ValueError, match="host:port"):
        EtcdRegistry(["10.0.0.1:2379", "10.0.0.2"])
    with pytest.raises(ValueError, match="no etcd endpoint"):
        EtcdRegistry(" , ")
    with pytest.raises(ValueError, match="prefix"):
        EtcdRegistry("localhost:2379", prefix="/no-slash")


def test_a_missing_etcd_binary_fails_with_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EtcdMissing, match="apt-get install -y etcd-server"):
        EtcdProcess(data_dir=tmp_path).start()
