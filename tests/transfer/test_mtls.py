"""The transfer link over mutual TLS: only nodes with a certificate of the cluster CA that names them.

A real transfer node (Committer on SQLite) serves the Transfer service with ``LinkTls``; certificates
come from :mod:`im.certs`. Refused: plaintext, a client without a certificate, a certificate of another
CA, a certificate naming another node than the hello claims; and on the dialing side, a server whose
certificate names another node than the registry entry dialled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import uvloop

from im import certs
from im.core.committer import SendRequest
from im.transfer import LinkTls, TransferLink
from im.transfer.gen import transfer_pb2 as pb
from im.transfer.wire import CHANNEL_OPTIONS, LINK_METHOD
from tests.support.wait import eventually
from tests.transfer.conftest import Core, RecordingSink, Results, close_core, open_core


@dataclass
class Pki:
    dir: Path
    ca: certs.Issued
    other_ca: certs.Issued

    def node(self, name: str, *, other: bool = False) -> LinkTls:
        """A node's LinkTls: its certificate signed by the cluster CA (or, ``other``, by a foreign CA,
        with that CA as the trust root, so only the peer can refuse it)."""
        d = self.dir / ("other" if other else "cluster")
        ca = self.other_ca if other else self.ca
        try:
            issued = certs.issue(d, ca, name)
        except certs.CertificateExists:
            issued = certs.Issued(d / f"{name}.crt", d / f"{name}.key")
        return LinkTls(ca.cert, issued.cert, issued.key, certs.node_identity, handshake_timeout=3.0)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(
        tmp_path,
        certs.create_ca(tmp_path / "cluster"),
        certs.create_ca(tmp_path / "other", common_name="someone else's CA"),
    )


@pytest.fixture
async def secure_core(tmp_path: Path, pki: Pki) -> AsyncIterator[Core]:
    c = await open_core(tmp_path, tls=pki.node("tr-1"))
    yield c
    await close_core(c)


def send(uid: int, to: int, cmid: str) -> SendRequest:
    return SendRequest(uid=uid, device="d1", cmid=cmid, conv=None, to=to, type="text", body=b'{"text":"hi"}')


async def open_stream(address: str, credentials: grpc.ChannelCredentials | None, node: str) -> pb.TransferFrame:
    """A raw Link stream saying hello as ``node``; returns the first frame the server sends (or raises
    the AioRpcError that ended the stream)."""
    if credentials is None:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    async with channel:
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[pb.GatewayFrame]:
            yield pb.GatewayFrame(hello=pb.Hello(node=node))
            await stop.wait()

        call = channel.stream_stream(
            LINK_METHOD,
            request_serializer=pb.GatewayFrame.SerializeToString,
            response_deserializer=pb.TransferFrame.FromString,
        )(requests())
        try:
            async with asyncio.timeout(10):
                frame: pb.TransferFrame = await call.read()
                if frame is grpc.aio.EOF:
                    await call
                return frame
        finally:
            stop.set()
            call.cancel()


async def test_a_node_with_a_cluster_certificate_naming_it_links_and_sends(secure_core: Core, pki: Pki) -> None:
    alice, bob = await secure_core.user("alice", "gw-1"), await secure_core.user("bob", "gw-1")
    sink = RecordingSink()
    link = TransferLink(secure_core.address, "gw-1", sink, tls=pki.node("gw-1"), peer="tr-1", backoff_initial=0.02)
    secure_core.links.append(link)
    link.start()
    await asyncio.wait_for(link.wait_connected(), 10)
    assert link.transfer_node == "tr-1" and secure_core.router.linked() == ["gw-1"]
    results = Results()
    for i in range(5):
        link.submit(send(alice, bob, f"c{i}"), results.done)
    await eventually(lambda: len(results.got) == 5 and len(sink.messages) == 5)
    assert [m.seq for _, m, _, err in results.got if m is not None and err is None] == [1, 2, 3, 4, 5]


async def test_plaintext_is_refused(secure_core: Core) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await open_stream(secure_core.address, None, "gw-1")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert secure_core.servicer.streams == 0 and secure_core.router.linked() == []


async def test_a_client_without_a_certificate_is_refused(secure_core: Core, pki: Pki) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await open_stream(secure_core.address, grpc.ssl_channel_credentials(pki.ca.cert.read_bytes()), "gw-1")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no certificate
    assert secure_core.router.linked() == []


async def test_a_certificate_of_another_ca_is_refused(secure_core: Core, pki: Pki) -> None:
    foreign = pki.node("gw-1", other=True)
    credentials = grpc.ssl_channel_credentials(
        pki.ca.cert.read_bytes(),  # it trusts the cluster CA, but presents a certificate of its own CA
        foreign.key_file.read_bytes(),
        foreign.cert_file.read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await open_stream(secure_core.address, credentials, "gw-1")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert secure_core.router.linked() == []


async def test_a_certificate_naming_another_node_than_the_hello_is_refused(secure_core: Core, pki: Pki) -> None:
    gw2 = pki.node("gw-2")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await open_stream(secure_core.address, gw2.channel_credentials(), "gw-1")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "gw-2" in (e.value.details() or "")
    assert secure_core.servicer.refused == 1 and secure_core.router.linked() == []
    # the same certificate, honest about its name, is welcome
    welcome = await open_stream(secure_core.address, gw2.channel_credentials(), "gw-2")
    assert welcome.welcome.node == "tr-1"


async def test_a_link_refuses_a_server_whose_certificate_names_another_node(secure_core: Core, pki: Pki) -> None:
    # the registry said tr-2 is at this address, but the certificate there is tr-1's
    link = TransferLink(secure_core.address, "gw-1", RecordingSink(), tls=pki.node("gw-1"), peer="tr-2")
    link._backoff_initial = link._backoff_max = 0.05
    secure_core.links.append(link)
    link.start()
    await eventually(lambda: link.refusals >= 2)
    assert not link.connected and secure_core.router.linked() == []
    assert "names node 'tr-1', not 'tr-2'" in link.last_error


async def test_a_link_with_a_foreign_ca_does_not_trust_the_cluster(secure_core: Core, pki: Pki) -> None:
    link = TransferLink(
        secure_core.address, "gw-1", RecordingSink(), tls=pki.node("gw-1", other=True), peer="tr-1", backoff_max=0.05
    )
    secure_core.links.append(link)
    link.start()
    await eventually(lambda: "TLS handshake" in link.last_error)
    assert not link.connected and secure_core.router.linked() == []


async def test_a_plaintext_transfer_node_is_not_dialled_in_clear(tmp_path: Path, pki: Pki) -> None:
    plain = await open_core(tmp_path)
    try:
        link = TransferLink(plain.address, "gw-1", RecordingSink(), tls=pki.node("gw-1"), peer="tr-1", backoff_max=0.05)
        plain.links.append(link)
        link.start()
        await eventually(lambda: "TLS handshake" in link.last_error)
        assert not link.connected and plain.router.linked() == []
    finally:
        await close_core(plain)


def test_the_identity_check_is_quick_under_uvloop(tmp_path: Path, pki: Pki) -> None:
    """The roles run on uvloop, whose TLS close waits up to 30 s for a close_notify that a gRPC server
    never sends: the check must not wait for it."""

    async def check() -> tuple[str | None, float]:
        core = await open_core(tmp_path, tls=pki.node("tr-1"))
        try:
            started = time.monotonic()
            name = await pki.node("gw-1").server_node(core.address)
            return name, time.monotonic() - started
        finally:
            await close_core(core)

    name, took = uvloop.run(check())
    assert name == "tr-1" and took < 2.0
