"""A real ``im serve`` speaking TLS itself, for the client tests.

:func:`running_tls_server` starts ``im serve`` with its own certificate (``--tls-cert``/``--tls-key``, made
by :mod:`im.certs`): HTTPS, ``wss://`` and TLS over TCP on its own ports, and ``GET /api/v1/gateway`` hands
out the ``wss://`` and ``tls://`` addresses. Every client test uses the :class:`TlsServer` it yields.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from im.certs import Issued, create_ca, issue, load_certificate
from tests.support.server import ServerProcess, TlsFiles


def spki_sha256(cert_path: Path) -> str:
    """Base64 SHA-256 of a certificate's SubjectPublicKeyInfo (Chromium's
    ``--ignore-certificate-errors-spki-list`` takes these)."""
    spki = (
        load_certificate(cert_path)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@dataclass
class TlsServer:
    """A running ``im serve`` speaking TLS itself. ``http``/``ws``/``tcp`` are its own https://, wss:// and
    tls:// addresses; ``ca`` is the CA that signed ``cert`` (the server's, valid for ``hosts`` of
    :func:`running_tls_server`); ``server`` the process (``server.api`` is https too: set-up calls trust the
    test CA with ``verify=server.verify``)."""

    server: ServerProcess
    ca: Issued
    cert: Issued
    http: str
    ws: str
    tcp: str

    @property
    def api(self) -> str:
        return f"{self.http}/api/v1"


def make_certs(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")) -> tuple[Issued, Issued]:
    """A test CA and a server certificate it signed (``directory``/ca.crt, server.crt)."""
    ca = create_ca(directory)
    return ca, issue(directory, ca, "server", hosts=hosts, client=False)


@dataclass
class _NativeTlsProcess(ServerProcess):
    """:class:`ServerProcess` with TLS whose start-up probe (``verify``) may skip the host-name check: for a
    server deliberately given a certificate for another host. The chain is always checked against the CA."""

    check_hostname: bool = True

    @property
    def verify(self) -> ssl.SSLContext | bool:
        ctx = super().verify
        if isinstance(ctx, ssl.SSLContext):
            ctx.check_hostname = self.check_hostname
        return ctx


@contextmanager
def running_tls_server(
    tmp: Path,
    extra: list[str] | None = None,
    *,
    public_ws: bool = True,
    hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"),
) -> Iterator[TlsServer]:
    """``im serve`` with TLS on its HTTP, WebSocket and TCP listeners, its certificate for ``hosts`` signed by
    a new test CA. ``public_ws=False``: the server announces a plaintext ``ws://`` address
    (``gateway.public_ws_url``) behind its HTTPS API, a misconfiguration the clients must refuse. A
    certificate whose ``hosts`` leave out 127.0.0.1 is for the wrong-host-name tests (the start-up probe
    then checks the chain only). On exit the server must stop cleanly, as with ``running_server``."""
    ca, cert = make_certs(tmp / "certs", hosts)
    files = TlsFiles(ca.cert, cert.cert, cert.key)
    proc = _NativeTlsProcess(tmp / "data", extra=list(extra or []), tls=files, check_hostname="127.0.0.1" in hosts)
    if not public_ws:
        proc.extra[:0] = ["--set", f"gateway.public_ws_url=ws://127.0.0.1:{proc.ws_port}/ws"]
    proc.start()
    try:
        yield TlsServer(proc, ca, cert, proc.http, proc.ws, f"tls://127.0.0.1:{proc.tcp_port}")
    except BaseException:
        proc.stop()  # the test failed: do not leave the server running
        raise
    code = proc.stop()
    assert code == 0, f"im serve exited with {code} on SIGTERM:\n{proc.log()[-4000:]}"
    assert "Traceback" not in proc.log(), proc.log()[-4000:]
