"""TLS client settings for the engines (PostgreSQL, Redis, RabbitMQ, etcd), as one small value.

:class:`ClientTls` says whom to trust and what to present: a CA file (None: the system's trust store), and
optionally a client certificate and its key (for engines that require client certificates). The
composition root builds one per engine from the configuration; each backend turns it into what its
driver takes (an ``ssl.SSLContext`` for asyncpg and aio-pika, ``ssl_*`` keyword arguments for redis-py,
gRPC credentials for etcd). Nothing here reads the configuration or touches the network.

Defaults are the safe ones: the server's certificate is verified against the CA and its host name is
checked, TLS 1.2 at least. ``check_hostname=False`` (PostgreSQL's ``verify-ca``) still verifies the
chain; ``verify=False`` (PostgreSQL's ``require``) encrypts without authenticating the server, and is
only ever chosen by an explicit setting.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by redis_client: the other engines' clients do without redis-py
    import redis.asyncio as aioredis


@dataclass(frozen=True, slots=True)
class ClientTls:
    """Trust and identity for one engine connection. ``cert_file`` and ``key_file`` go together."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Check that the server's certificate names the host dialled (off only for PostgreSQL ``verify-ca``).
    check_hostname: bool = True
    #: Verify the server's certificate at all (off only for PostgreSQL ``require`` without a CA file).
    verify: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if self.check_hostname and not self.verify:
            raise ValueError("checking the host name needs verification on")

    def context(self) -> ssl.SSLContext:
        """A client ``SSLContext`` with these settings (reads the files now: a missing or unreadable
        file raises ``OSError``/``ssl.SSLError`` naming it)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        if self.verify:
            ctx.verify_mode = ssl.CERT_REQUIRED
            if self.ca_file is not None:
                ctx.load_verify_locations(cafile=str(self.ca_file))
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file is not None and self.key_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate) as PEM bytes, None where not set: what gRPC's credentials take."""

        def load(path: Path | None) -> bytes | None:
            return None if path is None else path.read_bytes()

        return load(self.ca_file), load(self.key_file), load(self.cert_file)


def redis_options(url: str, tls: ClientTls | None) -> dict[str, Any]:
    """redis-py's ``from_url`` keyword arguments for ``tls`` (``{}`` for None). TLS itself is chosen by
    the URL (``rediss://``); settings for a plaintext URL are an error, never silently ignored."""
    if tls is None:
        return {}
    if not url.startswith("rediss://"):
        raise ValueError(f"TLS settings for Redis need a rediss:// URL, not {url.split('://')[0]}://")
    options: dict[str, Any] = {
        "ssl_cert_reqs": "required" if tls.verify else "none",
        "ssl_check_hostname": tls.check_hostname,
        "ssl_min_version": ssl.TLSVersion.TLSv1_2,
    }
    if tls.ca_file is not None:
        options["ssl_ca_certs"] = str(tls.ca_file)
    if tls.cert_file is not None and tls.key_file is not None:
        options["ssl_certfile"] = str(tls.cert_file)
        options["ssl_keyfile"] = str(tls.key_file)
    return options


def amqp_context(url: str, tls: ClientTls | None) -> ssl.SSLContext | None:
    """The ``ssl_context`` for aio-pika's ``connect`` (None for None). TLS itself is chosen by the URL
    (``amqps://``); settings for a plaintext URL are an error, never silently ignored."""
    if tls is None:
        return None
    if not url.startswith("amqps://"):
        raise ValueError(f"TLS settings for RabbitMQ need an amqps:// URL, not {url.split('://')[0]}://")
    return tls.context()


def redis_client(url: str, *, timeout: float | None, tls: ClientTls | None) -> aioredis.Redis:
    """A Redis client (no connection yet) whose connecting and every reply are bounded by ``timeout``, so
    a hung Redis raises instead of stalling its caller; with ``tls`` for ``rediss://`` URLs."""
    import redis.asyncio as aioredis

    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, **redis_options(url, tls))
