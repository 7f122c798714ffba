"""amqps://: the relay and the push consumer dial RabbitMQ with the configured CA and client certificate.

The plumbing tests use a TLS listener that requires a client certificate of the test CA and records who
completed the handshake (then hangs up, so the workers keep retrying); the last test runs the whole
pipeline against a private RabbitMQ node that speaks only TLS and requires client certificates
(tests/support/tls_rabbitmq.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from im.backends.chat import ChatStore, Outbox
from im.backends.dedupe.memory import MemoryDedupe
from im.backends.presence.memory import MemoryPresence
from im.backends.tls import ClientTls
from im.compose import event_workers
from im.config import ConfigError, load_config
from im.events.push import PushConsumer
from im.events.relay import OutboxRelay
from im.events.topology import connect
from im.model.cluster import DeviceLocation
from tests.events.conftest import Names, WebhookReceiver, members_of
from tests.events.test_pipeline import C, check_pushes, traffic
from tests.support.pki import EnginePki
from tests.support.tls_rabbitmq import shared_tls_rabbitmq
from tests.support.wait import eventually, running


class TlsPeer:
    """A TLS listener that requires a client certificate of ``pki``'s CA; ``seen`` lists the subject CN
    of every client that completed the handshake, ``failed`` counts handshakes that did not."""

    def __init__(self, pki: EnginePki) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca.cert))
        self.ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.seen: list[str] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert: Any = writer.get_extra_info("peercert") or {}
        subject = dict(pair[0] for pair in cert.get("subject", ()))
        self.seen.append(str(subject.get("commonName", "")))
        writer.close()

    async def __aenter__(self) -> TlsPeer:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"amqps://guest:guest@localhost:{self.port}/"


class NoOutbox:
    @contextlib.asynccontextmanager
    async def outbox_exclusive(self) -> AsyncIterator[None]:
        yield


@pytest.fixture
def pki(tmp_path: Path) -> EnginePki:
    return EnginePki.create(tmp_path)


async def run_until_seen(worker: Any, peer: TlsPeer) -> None:
    task = asyncio.create_task(worker)
    try:
        await eventually(lambda: peer.seen, "no client completed a TLS handshake", timeout=10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def tls(pki: EnginePki) -> ClientTls:
    return ClientTls(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key)


async def test_the_relay_dials_amqps_with_the_client_certificate(pki: EnginePki) -> None:
    async with TlsPeer(pki) as peer:
        relay = OutboxRelay(cast(Outbox, NoOutbox()), peer.url, tls=tls(pki), backoff=0.05, connect_timeout=2)
        await run_until_seen(relay.run(), peer)
    assert peer.seen[0] == "im-client"


async def test_the_push_consumer_dials_amqps_with_the_client_certificate(pki: EnginePki) -> None:
    async def members(conv: str) -> list[int]:
        return []

    async with TlsPeer(pki) as peer:
        consumer = PushConsumer(
            peer.url,
            MemoryPresence(),
            members,
            "http://127.0.0.1:1/hook",
            cast(Any, None),
            tls=tls(pki),
            backoff=0.05,
            connect_timeout=2,
        )
        await run_until_seen(consumer.run(), peer)
    assert peer.seen[0] == "im-client"


async def test_event_workers_pass_the_configured_files(pki: EnginePki, tmp_path: Path) -> None:
    async with TlsPeer(pki) as peer:
        config = load_config(
            overrides={
                "data_dir": str(tmp_path),
                "events": {
                    "kind": "rabbitmq",
                    "amqp_url": peer.url,
                    "amqp_ca_file": str(pki.ca.cert),
                    "amqp_cert_file": str(pki.client.cert),
                    "amqp_key_file": str(pki.client.key),
                },
            }
        )

        class B:
            chat_store = NoOutbox()
            presence = MemoryPresence()

        (relay,) = event_workers(config, cast(Any, B()))
        await run_until_seen(relay, peer)
    assert set(peer.seen) == {"im-client"}


async def test_a_broker_of_an_untrusted_ca_is_not_talked_to(pki: EnginePki, tmp_path: Path) -> None:
    untrusted = ClientTls(ca_file=pki.dir / "other" / "ca.crt", cert_file=pki.client.cert, key_file=pki.client.key)
    async with TlsPeer(pki) as peer:
        relay = OutboxRelay(cast(Outbox, NoOutbox()), peer.url, tls=untrusted, backoff=0.05, connect_timeout=2)
        task = asyncio.create_task(relay.run())
        try:
            await eventually(lambda: relay.failures >= 2)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert peer.seen == []  # the client refused the server's certificate: no handshake completed


def test_tls_files_need_amqps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="amqps://"):
        load_config(overrides={"events": {"amqp_ca_file": str(tmp_path / "ca.crt")}})
    with pytest.raises(ValueError, match="amqps://"):
        OutboxRelay(cast(Outbox, NoOutbox()), "amqp://x/", tls=ClientTls(ca_file=tmp_path / "ca.crt"))


async def test_the_pipeline_runs_over_amqps_to_a_broker_that_requires_client_certificates(
    outbox_store: ChatStore, webhook: WebhookReceiver
) -> None:
    """Outbox -> relay -> a private TLS-only RabbitMQ -> push consumer -> webhook, with the CA and client
    certificate the settings give; a client without a certificate is refused by that broker."""
    broker = shared_tls_rabbitmq()
    with pytest.raises(Exception, match=r"CERTIFICATE_REQUIRED|certificate required|reset by peer"):
        # topology.connect closes the half-made connection (aio_pika.connect would leave it to __del__)
        await connect(broker.url, ssl_context=ClientTls(ca_file=broker.pki.ca.cert).context(), timeout=5)
    messages = await traffic(outbox_store)
    names = Names(f"im.test.events.{uuid.uuid4().hex[:8]}", f"im.test.push.{uuid.uuid4().hex[:8]}")
    relay = OutboxRelay(
        outbox_store, broker.url, exchange=names.exchange, queue=names.queue, poll=0.02, tls=broker.client_tls()
    )
    p = MemoryPresence()
    await p.set_online([DeviceLocation(C, "phone", "n1")], ttl=600)
    push = PushConsumer(
        broker.url,
        p,
        members_of(outbox_store),
        webhook.url,
        MemoryDedupe(),
        exchange=names.exchange,
        queue=names.queue,
        retry_delay=0.05,
        tls=broker.client_tls(),
    )
    async with running(relay.run(), push.run()):
        await eventually(lambda: len(webhook.requests) >= len(messages))
    check_pushes(webhook, messages)
    assert relay.failures == 0 and relay.published == len(messages)
