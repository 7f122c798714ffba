"""im.certs: a private CA and the node certificates it signs, checked by real TLS handshakes."""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from im.certs import CertificateExists, create_ca, issue, load_certificate, node_identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_node_certificate(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    node = issue(tmp_path, ca, "gw-1", hosts=["chat.example", "10.0.0.7"])
    assert _mode(ca.key) == 0o600 and _mode(node.key) == 0o600
    ca_cert, cert = load_certificate(ca.cert), load_certificate(node.cert)
    cert.verify_directly_issued_by(ca_cert)
    assert node_identity(cert) == "gw-1"
    assert node_identity(ca_cert) is None
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["chat.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_nothing_is_overwritten_unless_asked(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    first = issue(tmp_path, ca, "tr-1")
    before = first.cert.read_bytes()
    with pytest.raises(CertificateExists):
        create_ca(tmp_path)
    with pytest.raises(CertificateExists):
        issue(tmp_path, ca, "tr-1")
    assert first.cert.read_bytes() == before
    assert issue(tmp_path, ca, "tr-1", overwrite=True).cert.read_bytes() != before


@pytest.mark.parametrize("name", ["", "ca", "a/b"])
def test_unusable_names_are_refused(tmp_path: Path, name: str) -> None:
    ca = create_ca(tmp_path)
    with pytest.raises(ValueError):
        issue(tmp_path, ca, name)


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> bytes:
    """One TLS connection over loopback: the client sends a line, the server echoes its peer's node name."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        name = node_identity(x509.load_der_x509_certificate(peer)) if peer else None
        await reader.readline()
        writer.write((name or "-").encode() + b"\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname
        )
        writer.write(b"hello\n")
        line = await reader.readline()
        writer.close()
        return line.strip()
    finally:
        server.close()
        await server.wait_closed()


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = create_ca(tmp_path)
    srv = issue(tmp_path, ca, "tr-1")
    cli = issue(tmp_path, ca, "gw-1", server=False)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca.cert)
    server_ctx.load_cert_chain(srv.cert, srv.key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=ca.cert)
    client_ctx.load_cert_chain(cli.cert, cli.key)
    return server_ctx, client_ctx


async def test_mutual_tls_handshake_carries_the_node_name(tmp_path: Path) -> None:
    server_ctx, client_ctx = _contexts(tmp_path)
    assert await _handshake(server_ctx, client_ctx, "127.0.0.1") == b"gw-1"


async def test_a_host_not_in_the_certificate_fails_verification(tmp_path: Path) -> None:
    server_ctx, client_ctx = _contexts(tmp_path)
    assert client_ctx.check_hostname
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(server_ctx, client_ctx, "elsewhere.example")


async def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    server_ctx, _ = _contexts(tmp_path / "a")
    _, stranger_ctx = _contexts(tmp_path / "b")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(server_ctx, stranger_ctx, "127.0.0.1")
