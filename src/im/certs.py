"""Certificates for a private deployment: one cluster CA, and the certificates it signs.

    ca.crt / ca.key            the cluster CA (keep ca.key offline once the nodes have theirs)
    <name>.crt / <name>.key    a node's certificate: serves TLS (HTTPS, wss://, TCP over TLS, gRPC) and,
                               as a client certificate, proves the node's identity on the gRPC link

A node's identity is its name (``gw-1``, ``tr-2``, ...), carried as the certificate's common name and as a
URI subject alternative name ``im://node/<name>`` (:func:`node_identity` reads it back), so a peer can
check the certificate against the registry entry it claims. Host names and IP addresses the node is
reached at go in DNS and IP SANs: clients verify them as for any server.

Keys are ECDSA P-256 (fast handshakes, small certificates); private keys are written with mode 0600,
atomically, and never overwritten unless asked. Nothing here talks to the network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The URI SAN prefix that carries a node's name.
NODE_URI_PREFIX = "im://node/"
CA_NAME = "ca"


@dataclass(frozen=True, slots=True)
class Issued:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


class CertificateExists(FileExistsError):
    """The certificate (or its key) is there already; pass ``overwrite=True`` to replace it."""


def create_ca(
    directory: Path, *, common_name: str = "im cluster CA", days: int = 3650, overwrite: bool = False
) -> Issued:
    """A new self-signed CA in ``directory`` (``ca.crt``, ``ca.key``)."""
    issued = _paths(directory, CA_NAME, overwrite)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(issued, cert, key)
    return issued


def issue(
    directory: Path,
    ca: Issued,
    name: str,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    server: bool = True,
    client: bool = True,
    days: int = 825,
    overwrite: bool = False,
) -> Issued:
    """A certificate for node (or client) ``name`` signed by ``ca``, valid for ``hosts`` (DNS names or IP
    addresses), written as ``<name>.crt`` / ``<name>.key`` in ``directory``. ``server`` and ``client``
    choose its extended key usages (a node needs both: it serves and it dials the gRPC link)."""
    if not name or "/" in name or name == CA_NAME:
        raise ValueError(f"not a usable certificate name: {name!r}")
    if not (server or client):
        raise ValueError("a certificate must be usable for server or client authentication")
    ca_cert = load_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key}: not an EC private key made by `im certs`")
    issued = _paths(directory, name, overwrite)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(NODE_URI_PREFIX + name)]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(issued, cert, key)
    return issued


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def node_identity(cert: x509.Certificate) -> str | None:
    """The node name a certificate made by :func:`issue` carries (its ``im://node/`` URI SAN), or None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(NODE_URI_PREFIX):
            return uri[len(NODE_URI_PREFIX) :]
    return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _paths(directory: Path, name: str, overwrite: bool) -> Issued:
    issued = Issued(directory / f"{name}.crt", directory / f"{name}.key")
    if not overwrite and (issued.cert.exists() or issued.key.exists()):
        raise CertificateExists(f"{issued.cert} or {issued.key} exists already (overwrite to replace)")
    return issued


def _write(issued: Issued, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    issued.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _atomic_write(issued.key, key_pem, 0o600)
    _atomic_write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write to a temporary file created with ``mode`` (a key is never readable by others, even briefly),
    fsync, then rename over ``path``: a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
