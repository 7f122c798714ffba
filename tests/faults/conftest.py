"""Nemesis tests: faults a real deployment meets (a database killed, a paused node, partitions, bad links,
reconnect storms, broker redelivery), over real ``im cluster`` processes and, where an engine must be
killed, private engine instances the tests start themselves. Every history is judged by the checker
(tests/support/checker.py). docs/reliability.md lists each scenario, its promise and its figures.

Long variants run only with ``IM_FAULTS_LONG=1`` (the suite keeps the short ones).

Shared here: the bad link of issue 14 and the proxies that reset it (test_links.py,
test_engine_links.py); a cluster whose victim nodes reach their engines through fault proxies
(:func:`proxied_net`, the module-scoped :func:`net`), the workload its tests run, and the victim as the
kernel sees it (test_partitions.py, test_engine_links.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from im.cluster import LocalCluster
from im.faultproxy import FaultProxy
from im.model.ids import direct_conv
from tests.cluster.conftest import (
    ClusterView,
    client_on,
    cluster,  # noqa: F401  (the cluster fixtures, shared)
    history,  # noqa: F401
    make_cluster,
    stop_checked,
)
from tests.cluster.test_cluster_faults import transfer_for
from tests.events.conftest import AMQP_URL
from tests.support.apps import (
    App,
    Target,
    apps,  # noqa: F401  (the SDK apps' fixture, shared)
    create_group,
    pairs_and_group,
    start_app,
    unanswered,
)
from tests.support.checker import History
from tests.support.client import Account, ChatClient, register
from tests.support.postgres import (
    DSN,
    pg,  # noqa: F401  (a private PostgreSQL a test may stop and crash)
)


@pytest.fixture
def long_run() -> bool:
    """True when the long variants were asked for (``IM_FAULTS_LONG=1``)."""
    return os.environ.get("IM_FAULTS_LONG", "") not in ("", "0")


# --- bad links ---------------------------------------------------------------------------------------------

#: The bad link of the issue: 300 ms ± 200 ms each way, 8 KB/s, one byte per write.
BAD_LINK: dict[str, Any] = {"latency": 0.3, "jitter": 0.2, "bandwidth": 8192, "slice": 1}
#: Seconds between two resets (each time of every connection of one proxy, chosen at random).
RESET_EVERY = (1.0, 2.5)


@dataclass
class Proxies:
    """Fault proxies made bad and reset together, by the port they stand in front of."""

    by_port: dict[int, FaultProxy] = field(default_factory=dict)

    def add(self, port: int, seed: int) -> FaultProxy:
        p = FaultProxy(("127.0.0.1", port), seed=seed).start()
        self.by_port[port] = p
        return p

    def route(self, url: str) -> str:
        """``url`` (ws://host:port/... or tcp://host:port) with the port of the proxy in front of it."""
        scheme, rest = url.split("://", 1)
        hostport, _, path = rest.partition("/")
        host, port = hostport.rsplit(":", 1)
        proxy = self.by_port[int(port)]
        return f"{scheme}://{host}:{proxy.port}" + (f"/{path}" if path else "")

    def set(self, **faults: Any) -> None:
        for p in self.by_port.values():
            p.set(**faults)

    def close(self) -> None:
        for p in self.by_port.values():
            p.close()

    @property
    def resets(self) -> int:
        return sum(p.resets for p in self.by_port.values())

    def figures(self) -> dict[str, int]:
        ps = self.by_port.values()
        return {
            "connections": sum(p.accepted for p in ps),
            "resets": self.resets,
            "bytes_up": sum(p.bytes_up for p in ps),
            "bytes_down": sum(p.bytes_down for p in ps),
        }


async def reset_now_and_then(proxies: Proxies, stop: asyncio.Event, rng: random.Random) -> dict[str, Any]:
    """Until ``stop``: every RESET_EVERY seconds, reset every connection of one proxy (in turn, so that
    each path is hit)."""
    order = list(proxies.by_port.values())
    rounds = 0
    while await pause(stop, rng):
        await asyncio.to_thread(order[rounds % len(order)].reset_all)
        rounds += 1
    return {"reset_rounds": rounds}


async def pause(stop: asyncio.Event, rng: random.Random) -> bool:
    """Wait RESET_EVERY seconds, or less if ``stop`` comes first; True unless it came."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), rng.uniform(*RESET_EVERY))
    return not stop.is_set()


# --- a cluster whose victims reach their engines through proxies -------------------------------------------

VICTIM = "tr-1"
#: The other transfer node (its RabbitMQ link goes through a proxy too).
PEER = "tr-2"
#: The victim of the gateway scenarios: it reaches PostgreSQL (replays, sync points, cursors), Redis
#: (presence, shared rate limits) and etcd (its registration, the configuration centre) each through its
#: own proxy.
GATEWAY_VICTIM = "gw-1"
#: The gRPC link's keepalive interval and ping timeout here (transfer.keepalive, keepalive_timeout;
#: 10 s and 5 s by default), so that a silent link is found dead within a short partition.
KEEPALIVE = 1.0


@dataclass
class Net:
    """The cluster, and the proxies on the victims' paths (by path name)."""

    cluster: LocalCluster
    proxies: dict[str, FaultProxy]  # tr-1's paths: postgres, redis, rabbitmq, etcd, links
    names: tuple[str, str]  # the private exchange and queue
    gateway_proxies: dict[str, FaultProxy] = field(default_factory=dict)  # gw-1's paths: postgres, redis, etcd
    #: tr-2's path to RabbitMQ: the outbox relay runs on one transfer node at a time, either of them.
    peer_proxies: dict[str, FaultProxy] = field(default_factory=dict)


def host_port(url: str) -> tuple[str, int]:
    """The host and port of an engine URL (``scheme://[user@]host:port/...``)."""
    netloc = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = netloc.rpartition(":")
    return host, int(port)


def through(url: str, proxy: FaultProxy) -> str:
    """``url`` with its host:port replaced by the proxy's."""
    host, port = host_port(url)
    return url.replace(f"{host}:{port}", proxy.address, 1)


async def _delete_names(exchange: str, queue: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)


#: aiormq logs a warning with a traceback for every connection the broker drops: library noise. The
#: committer and the gateway hub log one record per window (with a traceback: im.throttled_log) for each
#: kind of request they refused because an engine was away ("refused batches: storage unavailable"):
#: expected while a victim is cut off or its links are bad; any other record of theirs fails the test.
NOISY_LOGGERS = ("aiormq.connection", "im.core.committer", "im.gateway.hub")
#: What the committers and hubs may log while a node's engines are away: the store away (sends, replays,
#: sync points, logins, cursor flushes, catch-ups refused or retried ``unavailable``), presence away
#: (committed messages held and routed again: im.core.live_routes; presence updates and refreshes
#: failed), the registration lost (clients asked to reconnect).
_EXPECTED = re.compile(
    r"refused (\d+ |[\d,]+ )?("
    r"batches: storage unavailable|live routes \(presence unreachable; held, routed again\)"
    r"|connections: sync points unavailable|authentications: account store unavailable"
    r"|replays: storage unavailable|presence updates: presence unavailable"
    r"|cursor flushes: storage unavailable|catch-ups after a relink: storage unavailable)"
    r"|presence refresh failed |registration lost: asking \d+ connections to reconnect"
)
_RECORDS = re.compile(
    r"^\S+ (WARNING|ERROR|CRITICAL) \S+ \S+ (?:im\.core\.committer|im\.gateway\.hub): (.*)$", re.MULTILINE
)


def expected_outage_records(c: LocalCluster) -> None:
    """Every warning or error the committers and hubs logged is an outage of the victims' engines (what
    NOISY_LOGGERS hides from the stop check), nothing else."""
    for node in c.nodes.values():
        for level, text in _RECORDS.findall(node.log()):
            assert _EXPECTED.match(text), f"{node.name}: {level} {text}"


@contextlib.contextmanager
def proxied_net(data_dir: Path) -> Iterator[Net]:
    """A started cluster, events on through RabbitMQ (a private exchange and queue), with tr-1's paths
    (its engines, and every other node's link to it: tr-1 advertises the proxy's address), gw-1's
    engines and tr-2's RabbitMQ behind proxies, clean until a test makes them bad. Every node must still
    stop cleanly at the end."""
    token = uuid.uuid4().hex[:8]
    names = (f"im.test.events.{token}", f"im.test.push.{token}")
    c = make_cluster(data_dir, amqp_url=AMQP_URL)
    c.extra += ["--set", f"events.exchange={names[0]}", "--set", f"events.queue={names[1]}"]
    c.extra += ["--set", f"transfer.keepalive={KEEPALIVE}", "--set", f"transfer.keepalive_timeout={KEEPALIVE}"]
    proxies = {
        "postgres": FaultProxy(host_port(DSN)),
        "redis": FaultProxy(host_port(c.redis_url)),
        "rabbitmq": FaultProxy(host_port(AMQP_URL)),
        "etcd": FaultProxy(("127.0.0.1", c.base_port + 5)),  # the private etcd (im.cluster's layout)
        "links": FaultProxy(("127.0.0.1", c.base_port + 13)),  # tr-1's gRPC port
    }
    gateway_proxies = {
        "postgres": FaultProxy(host_port(DSN)),
        "redis": FaultProxy(host_port(c.redis_url)),
        "etcd": FaultProxy(("127.0.0.1", c.base_port + 5)),
    }
    peer_proxies = {"rabbitmq": FaultProxy(host_port(AMQP_URL))}
    every = [*proxies.values(), *gateway_proxies.values(), *peer_proxies.values()]
    for p in every:
        p.start()
    c.node_args[GATEWAY_VICTIM] = [
        *("--set", f"store.postgres_dsn={through(DSN, gateway_proxies['postgres'])}"),
        *("--set", f"presence.redis_url={through(c.redis_url, gateway_proxies['redis'])}"),
        *("--set", f"registry.etcd_endpoint={gateway_proxies['etcd'].address}"),
    ]
    c.node_args[PEER] = ["--set", f"events.amqp_url={through(AMQP_URL, peer_proxies['rabbitmq'])}"]
    c.node_args[VICTIM] = [
        *("--set", f"store.postgres_dsn={through(DSN, proxies['postgres'])}"),
        *("--set", f"presence.redis_url={through(c.redis_url, proxies['redis'])}"),
        *("--set", f"events.amqp_url={through(AMQP_URL, proxies['rabbitmq'])}"),
        *("--set", f"registry.etcd_endpoint={proxies['etcd'].address}"),
        *("--set", f"transfer.public_address={proxies['links'].address}"),
    ]
    try:
        c.start()
        yield Net(c, proxies, names, gateway_proxies, peer_proxies)
    finally:
        try:
            for p in every:
                p.heal()  # whatever a failed test left
            stop_checked(c, ignore_loggers=NOISY_LOGGERS)
            expected_outage_records(c)
        finally:
            for p in every:
                p.close()
            asyncio.run(_delete_names(*names))


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """One proxied cluster per module (each test makes its own users and conversations)."""
    with proxied_net(tmp_path_factory.mktemp("net") / "cluster") as n:
        yield n


@pytest.fixture
async def net_history(net: Net) -> AsyncIterator[History]:
    """The checker over what the recording clients of one test on :func:`net` saw."""
    h = History(ClusterView(net.cluster.api))  # type: ignore[arg-type]
    yield h
    await h.close_all()
    await h.check()


# --- the victim as the kernel sees it ----------------------------------------------------------------

#: Bounds on a victim while cut off or on a bad link, over its level just before the fault. Its engine
#: clients are pools of fixed size (PostgreSQL pool_max 10, one Redis pool, one AMQP connection, one etcd
#: channel) and the gRPC server holds one stream per linked node, so a fault may cost a few reconnecting
#: sockets, never one per retry; the sends waiting meanwhile are a few thousand small requests (well
#: under 10 MiB).
FD_BOUND = 40
RSS_BOUND_KIB = 64 * 1024
#: After the heal, descriptors back within this of the level before the cut (pools refilled, nothing kept).
FD_SETTLED = 12


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def ready(c: LocalCluster, node: str, timeout: float = 5.0) -> bool:
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            r = await http.get(f"http://127.0.0.1:{c.nodes[node].ports['ops']}/health/ready")
        return r.status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Samples:
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    not_ready: int = 0
    ready_probes: int = 0
    stall: float = 0.0  # the longest a raw client's send waited for its answer, seen so far


async def watch(c: LocalCluster, node: str, until: float, out: Samples, w: Workload | None) -> None:
    """Until ``until``: the node's RSS and descriptors and the clients' waits every 0.25 s, and its
    readiness as often as its health endpoint answers (a probe may take its engine checks' 2 s)."""
    pid = c.nodes[node].proc.pid  # type: ignore[union-attr]

    async def probe_ready() -> None:
        while time.monotonic() < until:
            if not await ready(c, node, timeout=max(0.1, until - time.monotonic())):
                out.not_ready += 1
            out.ready_probes += 1
            await asyncio.sleep(0.1)

    prober = asyncio.create_task(probe_ready())
    try:
        while time.monotonic() < until:
            out.rss.append(rss_kib(pid))
            out.fds.append(fds(pid))
            if w is not None:
                note_stall(out, w)
            await asyncio.sleep(0.25)
    finally:
        await prober


def note_stall(out: Samples, w: Workload) -> None:
    now = time.monotonic()
    for rc, sent in zip(w.raw, w.raw_sent, strict=True):
        waiting = unanswered(rc, sent)
        if waiting:
            out.stall = max(out.stall, now - min(sent[x] for x in waiting))


# --- the workload ------------------------------------------------------------------------------------


async def user_with(api: str, tag: str, peer: Account, node: str) -> Account:
    """A new user whose direct conversation with ``peer`` the gateways send to transfer node ``node``."""
    for i in range(64):
        u = await register(api, f"{tag}{i}")
        if transfer_for(direct_conv(u.uid, peer.uid)) == node:
            return u
    raise AssertionError(f"no direct conversation on {node} in 64 tries")


@dataclass
class Workload:
    apps: list[App]
    targets: list[list[Target]]
    members: dict[str, list[App]]
    raw: list[ChatClient]
    raw_peer: list[int]
    raw_sent: list[dict[str, float]]
    raw_conv: str
    victim_convs: set[str]


async def start_workload(n: Net, h: History, into: list[App], tag: str) -> Workload:
    """SDK clients (a pair on tr-1, a pair on tr-2, a group of all four, over both gateways and both
    transports; appended to ``into``) and two raw protocol clients (a pair on tr-1, recorded by ``h``),
    connected."""
    c = n.cluster
    a0 = await register(c.api, f"{tag}a0")
    a1 = await user_with(c.api, f"{tag}a1-", a0, VICTIM)
    a2 = await register(c.api, f"{tag}a2")
    a3 = await user_with(c.api, f"{tag}a3-", a2, "tr-2")
    users = [a0, a1, a2, a3]
    group = await create_group(c, a0, [a1, a2, a3])
    started = await asyncio.gather(
        *(
            start_app(c, u, f"dev{i}", transport="tcp" if i % 2 else "ws", first_on="gw-1" if i % 2 == 0 else "gw-2")
            for i, u in enumerate(users)
        )
    )
    into.extend(started)
    targets, members = pairs_and_group(users, group, started)
    r0 = await register(c.api, f"{tag}r0")
    r1 = await user_with(c.api, f"{tag}r1-", r0, VICTIM)
    raw = [client_on(h, c, "gw-1", r0, "raw0"), client_on(h, c, "gw-2", r1, "raw1", tcp=True)]
    for rc in raw:
        assert (await rc.connect())["t"] == "auth_ok"
    raw_conv = direct_conv(r0.uid, r1.uid)
    victim_convs = {conv for conv in [*members, raw_conv] if transfer_for(conv) == VICTIM}
    return Workload(started, targets, members, raw, [r1.uid, r0.uid], [{}, {}], raw_conv, victim_convs)


def acked(w: Workload, conv: str) -> int:
    """Sends to ``conv`` acked so far, SDK and raw clients together."""
    sdk = sum(ack.conv == conv for a in w.apps for ack in a.acks)
    return sdk + sum(bool(ack["conv"] == conv) for c in w.raw for ack in c.acks.values())
