"""TLS for the SDK's connections: one way to build the client ``ssl.SSLContext``, one error for a refused
certificate.

The secure schemes are ``https://`` (the HTTP API), ``wss://`` (the WebSocket gateway) and ``tls://`` (the
TCP gateway with TLS, docs/protocol.md); ``http://``, ``ws://`` and ``tcp://`` stay plaintext. What a
secure connection checks, by default:

- the server's certificate chains to a trusted CA: the system store (``ssl.create_default_context()``),
  or, with ``ca_file``, **only** the CAs in that PEM file (instead of the system store, as ``curl
  --cacert`` does: a private deployment trusts its own CA and nothing else);
- the certificate names the host of the URL (a DNS or IP subject alternative name);
- TLS 1.2 or newer.

``insecure_skip_verify=True`` turns both checks off (the connection is encrypted but anyone on the path
can impersonate the server). It exists for a first look at a server with a self-made certificate; every
use logs a warning. A refused certificate raises :class:`TlsVerificationError`; nothing here ever falls
back to plaintext.
"""

from __future__ import annotations

import logging
import os
import ssl
from urllib.parse import urlsplit

__all__ = [
    "SECURE_SCHEMES",
    "PlaintextRefused",
    "TlsError",
    "TlsVerificationError",
    "client_context",
    "is_secure",
    "trust_of",
    "verification_error",
    "warn_insecure",
]

log = logging.getLogger("im.client.tls")

#: URL schemes that mean "TLS": HTTP API, WebSocket gateway, TCP gateway.
SECURE_SCHEMES = frozenset({"https", "wss", "tls"})


class TlsError(ConnectionError):
    """A TLS requirement was not met; :class:`~im.client.Client` stops rather than retry."""


class PlaintextRefused(TlsError):
    """A plaintext address (``ws://``, ``tcp://``) offered where TLS is required: the API was reached
    over ``https://``, so the gateway connection must be encrypted too."""

    def __init__(self, url: str, origin: str) -> None:
        super().__init__(
            f"TLS: refusing the plaintext gateway address {url} handed out by {origin}: the login token would "
            "cross the network in clear (the server should announce wss:// or tls:// addresses)"
        )
        self.url = url


class TlsVerificationError(TlsError):
    """The server's certificate was refused (unknown CA, wrong host name, expired, ...).

    Not retried by :class:`~im.client.Client` (the same certificate would be refused again) and never
    answered by a plaintext attempt. ``url`` is where the client connected, ``reason`` OpenSSL's words.
    """

    def __init__(self, url: str, reason: str, trust: str) -> None:
        super().__init__(
            f"TLS: the server certificate of {url} was refused: {reason} (trusting {trust}; "
            "pass ca_file= the CA that signed the server's certificate, or fix the host name in the URL)"
        )
        self.url = url
        self.reason = reason


def is_secure(url: str) -> bool:
    """Whether ``url`` asks for TLS (``https``, ``wss`` or ``tls``)."""
    return urlsplit(url).scheme.lower() in SECURE_SCHEMES


def client_context(
    *, ca_file: str | os.PathLike[str] | None = None, insecure_skip_verify: bool = False
) -> ssl.SSLContext:
    """A client context: TLS 1.2+, the server's certificate and host name verified against the system
    CA store, or against ``ca_file`` alone when given. ``insecure_skip_verify`` verifies nothing (and
    says so in a warning); it cannot be combined with ``ca_file``."""
    if insecure_skip_verify and ca_file is not None:
        raise ValueError("ca_file and insecure_skip_verify contradict each other: give one")
    if ca_file is not None:
        if not os.path.isfile(ca_file):
            raise FileNotFoundError(f"ca_file {os.fspath(ca_file)!r} does not exist")
        try:
            ctx = ssl.create_default_context(cafile=os.fspath(ca_file))  # only this file: no system CAs
        except ssl.SSLError as exc:
            raise ValueError(f"ca_file {os.fspath(ca_file)!r} holds no usable PEM certificate: {exc}") from exc
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def trust_of(ctx: ssl.SSLContext, ca_file: str | os.PathLike[str] | None) -> str:
    """What ``ctx`` trusts, in words for error messages."""
    if ctx.verify_mode == ssl.CERT_NONE:
        return "anything (insecure_skip_verify)"
    return f"only the CA file {os.fspath(ca_file)}" if ca_file is not None else "the system CA store"


def warn_insecure(ctx: ssl.SSLContext, url: str) -> None:
    """Log a warning when ``ctx`` verifies nothing (called at every connection that uses it)."""
    if ctx.verify_mode == ssl.CERT_NONE:
        log.warning(
            "TLS certificate verification is OFF for %s (insecure_skip_verify): the connection is encrypted "
            "but anyone on the path can pose as the server and read it",
            url,
        )


def verification_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate refusal behind ``exc`` (itself, or in its cause/context chain), or None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
