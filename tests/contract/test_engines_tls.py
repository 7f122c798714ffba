"""TLS to the engines as the composition root wires it: settings in, TLS clients out, against private
Redis and etcd instances that speak only TLS and require client certificates; and what a TLS-only
Redis refuses. (The presence, dedupe, rate-limit and registry contracts also run over these engines:
their ``redis-tls`` and ``etcd-tls`` parameters.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from im.backends.presence.redis import RedisPresence
from im.backends.rate_limit import FailOpen, Hit, Rule
from im.backends.rate_limit.redis import RedisRateLimiter
from im.backends.registry.etcd import EtcdRegistry
from im.backends.tls import ClientTls, redis_options
from im.compose import build_backends
from im.config import ConfigError, load_config
from im.model.cluster import DeviceLocation, ServiceInstance
from tests.support.tls_etcd import shared_tls_etcd
from tests.support.tls_redis import shared_tls_redis


async def test_build_backends_puts_presence_rate_limits_and_the_registry_on_tls(tmp_path: Path) -> None:
    r, e = shared_tls_redis(), shared_tls_etcd()
    config = load_config(
        overrides={
            "data_dir": str(tmp_path),
            "presence": {
                "kind": "redis",
                "redis_url": r.url,
                "redis_prefix": "im-test-compose:",
                "redis_ca_file": str(r.pki.ca.cert),
                "redis_cert_file": str(r.pki.client.cert),
                "redis_key_file": str(r.pki.client.key),
            },
            "registry": {
                "kind": "etcd",
                "etcd_endpoints": f"127.0.0.1:1,{e.endpoint}",  # a dead member first
                "prefix": "/im-test-compose/",
                "etcd_ca_file": str(e.pki.ca.cert),
                "etcd_cert_file": str(e.pki.client.cert),
                "etcd_key_file": str(e.pki.client.key),
            },
        }
    )
    b = build_backends(config)
    assert isinstance(b.presence, RedisPresence) and isinstance(b.registry, EtcdRegistry)
    assert isinstance(b.rate_limiter, FailOpen) and isinstance(b.rate_limiter.limiter, RedisRateLimiter)
    await b.start()
    try:
        await b.presence.set_online([DeviceLocation(7, "d1", "gw-1")], ttl=30)
        assert [loc.node for loc in (await b.presence.locate([7]))[7]] == ["gw-1"]
        await b.presence.set_offline([DeviceLocation(7, "d1", "gw-1")])
        rule = Rule("tls-test", 1, 60.0)
        assert await b.rate_limiter.check([Hit(rule, "k"), Hit(rule, "k")]) == [0.0, pytest.approx(60.0, abs=1)]
        assert b.rate_limiter.failures == 0  # decided in the TLS Redis, not failed open
        instance = ServiceInstance("gateway", "gw-1", {"ws": "wss://x"})
        for _ in range(2):  # the first call may find the dead member and move on
            try:
                await b.registry.register(instance, ttl=5)
                break
            except Exception:
                continue
        assert [i.node for i in await b.registry.instances("gateway")] == ["gw-1"]
        await b.registry.deregister("gw-1")
    finally:
        await b.close()


@pytest.mark.parametrize("who", ["plaintext redis://", "no client certificate", "certificate of another CA"])
async def test_a_tls_redis_refuses(who: str) -> None:
    r = shared_tls_redis()
    pki = r.pki
    if who == "plaintext redis://":
        client = aioredis.from_url(r.url.replace("rediss://", "redis://"), socket_timeout=2)
    else:
        tls = (
            ClientTls(ca_file=pki.ca.cert)
            if who == "no client certificate"
            else ClientTls(ca_file=pki.ca.cert, cert_file=pki.stranger.cert, key_file=pki.stranger.key)
        )
        client = aioredis.from_url(r.url, socket_timeout=2, **redis_options(r.url, tls))
    try:
        with pytest.raises((RedisConnectionError, OSError)):
            await client.ping()
    finally:
        await client.aclose()


async def test_a_client_that_does_not_trust_the_server_refuses_it() -> None:
    r = shared_tls_redis()
    tls = ClientTls(ca_file=r.pki.dir / "other" / "ca.crt", cert_file=r.pki.client.cert, key_file=r.pki.client.key)
    client = aioredis.from_url(r.url, socket_timeout=2, **redis_options(r.url, tls))
    try:
        with pytest.raises(RedisConnectionError, match="certificate verify failed"):
            await client.ping()
    finally:
        await client.aclose()


def test_tls_settings_on_a_plaintext_url_are_refused(tmp_path: Path) -> None:
    ca = str(tmp_path / "ca.crt")
    with pytest.raises(ConfigError, match="rediss://"):
        load_config(overrides={"presence": {"redis_ca_file": ca}})
    with pytest.raises(ConfigError, match="amqps://"):
        load_config(overrides={"events": {"amqp_ca_file": ca}})
    with pytest.raises(ConfigError, match="go together"):
        load_config(overrides={"presence": {"redis_url": "rediss://x:1", "redis_cert_file": ca}})
    with pytest.raises(ConfigError, match="sslmode"):
        load_config(overrides={"store": {"postgres_sslmode": "prefer", "postgres_sslrootcert": ca}})
    with pytest.raises(ConfigError, match="etcd_ca_file"):
        load_config(overrides={"registry": {"etcd_cert_file": ca, "etcd_key_file": ca}})
    with pytest.raises(ValueError, match="rediss://"):
        redis_options("redis://x:1", ClientTls(ca_file=tmp_path / "ca.crt"))


def test_a_missing_tls_file_is_named_at_start(tmp_path: Path) -> None:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path),
            "presence": {
                "kind": "redis",
                "redis_url": "rediss://127.0.0.1:1",
                "redis_ca_file": str(tmp_path / "no.crt"),
            },
        }
    )
    with pytest.raises(ConfigError, match=r"no\.crt"):
        build_backends(config)
