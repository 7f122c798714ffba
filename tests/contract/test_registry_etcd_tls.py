"""EtcdRegistry over TLS, against a private etcd whose client port speaks only TLS and requires a client
certificate of its CA: who gets in and who does not, and a list of endpoints with a dead one first.
(The whole registry contract also runs over it: ``etcd-tls`` in tests/contract/test_registry.py.)"""

from __future__ import annotations

import uuid

import aetcd
import pytest

from im.backends.registry.etcd import EtcdRegistry
from im.backends.tls import ClientTls
from im.model.cluster import ServiceInstance
from im.procs import free_port
from tests.support.tls_etcd import shared_tls_etcd, tls_client


def prefix() -> str:
    return f"/im-test/{uuid.uuid4().hex[:12]}/"


async def test_a_node_with_the_ca_and_a_client_certificate_registers_and_reads() -> None:
    etcd = shared_tls_etcd()
    async with EtcdRegistry([etcd.endpoint], tls=tls_client(etcd.pki), prefix=prefix(), timeout=3) as reg:
        await reg.register(ServiceInstance("gateway", "gw-1", {"ws": "wss://a"}), ttl=5)
        assert [i.node for i in await reg.instances("gateway")] == ["gw-1"]
        await reg.deregister("gw-1")


@pytest.mark.parametrize(
    "who",
    ["plaintext", "no client certificate", "client certificate of another CA", "server not trusted"],
)
async def test_etcd_refuses_or_is_refused(who: str) -> None:
    etcd = shared_tls_etcd()
    pki = etcd.pki
    tls: ClientTls | None = {
        "plaintext": None,
        "no client certificate": ClientTls(ca_file=pki.ca.cert),
        "client certificate of another CA": ClientTls(
            ca_file=pki.ca.cert, cert_file=pki.stranger.cert, key_file=pki.stranger.key
        ),
        "server not trusted": ClientTls(
            ca_file=pki.dir / "other" / "ca.crt", cert_file=pki.client.cert, key_file=pki.client.key
        ),
    }[who]
    async with EtcdRegistry(etcd.endpoint, tls=tls, prefix=prefix(), timeout=2) as reg:
        with pytest.raises(aetcd.ClientError):
            await reg.instances("gateway")


async def test_a_dead_member_first_in_the_list_is_passed_over() -> None:
    etcd = shared_tls_etcd()
    dead = f"127.0.0.1:{free_port()}"
    async with EtcdRegistry(f"{dead},{etcd.endpoint}", tls=tls_client(etcd.pki), prefix=prefix(), timeout=2) as reg:
        assert reg.client.target == dead
        assert await reg.instances("gateway") == []  # the dead member: the call moves on and succeeds
        assert reg.client.target == etcd.endpoint
        await reg.register(ServiceInstance("gateway", "gw-1", {"ws": "wss://a"}), ttl=5)
        assert [i.node for i in await reg.instances("gateway")] == ["gw-1"]
        await reg.deregister("gw-1")
