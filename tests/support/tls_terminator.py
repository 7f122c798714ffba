"""TLS in front of a plaintext ``im serve``, for the client tests until the server speaks TLS itself.

:class:`TlsTerminator` is a :class:`~tests.support.proxy.TcpProxy` that accepts TLS (with a certificate
made by :mod:`im.certs`) and forwards the decrypted bytes to a plaintext port. :func:`running_tls_server`
puts one in front of each listener of a real ``im serve`` (HTTP, WebSocket, TCP) and tells the server its
public addresses, so ``GET /api/v1/gateway`` hands out the ``wss://`` and ``tls://`` ones.

**The one place to switch to native TLS**: when ``im serve`` has its own ``tls`` settings, only
:func:`running_tls_server` changes (start the server with ``--set tls.cert_file=... tls.key_file=...`` and
point the URLs at its own ports); every test uses the :class:`TlsServer` it yields.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import ssl
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from im.certs import Issued, create_ca, issue, load_certificate
from tests.support.proxy import TcpProxy
from tests.support.server import ServerProcess, free_port, running_server


def server_context(cert: Issued) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


class TlsTerminator(TcpProxy):
    """Accepts TLS on ``port`` (0: a free one) and forwards the plaintext to ``target``.

    A client that does not complete the handshake (plaintext, or refusing the certificate) is dropped
    and never reaches the target.
    """

    def __init__(self, target: tuple[str, int], cert: Issued, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(target, host, port)
        self.ssl = server_context(cert)

    async def _start(self) -> None:
        if self._server is not None:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=sock, ssl=self.ssl, ssl_handshake_timeout=10)


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
    """A running ``im serve`` reached over TLS. ``http``/``ws``/``tcp`` are the TLS addresses; ``ca`` is the
    CA that signed ``cert`` (valid for 127.0.0.1, ::1 and localhost); ``server`` the plaintext process
    (``server.api`` for test set-up that is not about TLS)."""

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


@contextmanager
def running_tls_server(tmp: Path, extra: list[str] | None = None, *, public_ws: bool = True) -> Iterator[TlsServer]:
    """``im serve`` behind TLS terminators on its HTTP, WebSocket and TCP ports (see the module docstring).
    ``public_ws=False`` leaves the server announcing its plaintext ``ws://`` address (a misconfiguration the
    clients must refuse)."""
    ca, cert = make_certs(tmp / "certs")
    https_port, wss_port, tls_port = free_port(), free_port(), free_port()
    ws, tcp = f"wss://127.0.0.1:{wss_port}/ws", f"tls://127.0.0.1:{tls_port}"
    public = [f"gateway.public_tcp_url={tcp}"] + ([f"gateway.public_ws_url={ws}"] if public_ws else [])
    settings = [arg for item in public for arg in ("--set", item)]
    with ExitStack() as stack:
        proc = stack.enter_context(running_server(tmp / "data", [*settings, *(extra or [])]))
        for port, target in ((https_port, proc.http_port), (wss_port, proc.ws_port), (tls_port, proc.tcp_port)):
            stack.enter_context(TlsTerminator(("127.0.0.1", target), cert, port=port))
        yield TlsServer(proc, ca, cert, f"https://127.0.0.1:{https_port}", ws, tcp)
