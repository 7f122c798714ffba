"""Mutual TLS on the transfer link: every node proves its name with a certificate of the cluster CA.

A node's certificate (made by ``im certs``, :mod:`im.certs`) carries its node name; :class:`LinkTls` holds
this node's certificate and key, the cluster CA, and the function that reads a node name out of a
certificate (``identify``: the composition root passes :func:`im.certs.node_identity`).

- **Transfer side** (:func:`~im.transfer.server.serve_transfer` with ``tls``): the gRPC port is TLS only
  and requires a client certificate signed by the cluster CA (a plaintext peer, one without a
  certificate and one with a certificate of another CA fail the handshake). The servicer then checks
  that the certificate's node name is the node the stream's ``hello`` names, and aborts the stream with
  ``PERMISSION_DENIED`` otherwise (:meth:`LinkTls.peer_node`).
- **Dialing side** (:class:`~im.transfer.client.TransferLink` with ``tls``): gRPC verifies the transfer
  node's certificate against the cluster CA and the host name of the address it dials (the registry
  entry's ``grpc`` address), and presents this node's certificate. gRPC's Python API does not show the
  client the server's certificate, so the node name is checked by a TLS handshake of our own to the
  same address just before each stream (:meth:`LinkTls.server_node`): a certificate naming another node
  than the registry entry dialled stops the link (it retries with backoff, logging why).

What this does not do: that pre-check runs on its own connection, so a peer that holds a cluster
certificate valid for the dialled host could answer the gRPC connection instead of the checked one (an
attacker needs a cluster certificate and that address: a compromised node). Certificates are read when
a channel or server is made: a rotated client certificate is used from the next reconnect; the transfer
node's own certificate from its next start. No revocation list: remove a node's access by changing the
CA (``im certs``) or by firewalling it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

#: Reads a node name out of a certificate (None: the certificate names no node).
Identify = Callable[[x509.Certificate], str | None]


@dataclass(frozen=True, slots=True)
class LinkTls:
    """This node's TLS identity on the link: the cluster CA, its certificate and key (PEM files)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    identify: Identify
    #: Seconds the dialing side's identity check may take (connect and handshake).
    handshake_timeout: float = 5.0

    def own_node(self) -> str | None:
        """The node name this node's certificate carries."""
        return self.identify(x509.load_pem_x509_certificate(self.cert_file.read_bytes()))

    # --- transfer side --------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS only, a client certificate of the cluster CA required."""
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.ca_file.read_bytes(),
            require_client_auth=True,
        )

    def peer_node(self, context: Any) -> str | None:
        """The node name in the certificate the peer of a call presented (None: none, or no node name)."""
        pems = context.auth_context().get("x509_pem_cert") or []
        for pem in pems:
            try:
                return self.identify(x509.load_pem_x509_certificate(bytes(pem)))
            except ValueError:
                return None
        return None

    # --- dialing side ---------------------------------------------------------------------------------

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.ca_file.read_bytes(), self.key_file.read_bytes(), self.cert_file.read_bytes()
        )

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        ctx.set_alpn_protocols(["h2"])
        return ctx

    async def server_node(self, address: str) -> str | None:
        """Handshake with ``host:port`` as gRPC would (cluster CA, host name checked, this node's
        certificate presented) and return the node name of the server's certificate. Raises
        ``OSError``/``ssl.SSLError``/``TimeoutError`` when the handshake fails."""
        host, port = split_address(address)
        async with asyncio.timeout(self.handshake_timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=self.client_context(), server_hostname=host)
        try:
            obj = writer.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
        finally:
            # Abort, not close: nothing was sent, and a TLS close waits for the peer's close_notify (under
            # uvloop up to its 30 s shutdown timeout; a gRPC server does not send one).
            writer.transport.abort()
        if der is None:
            return None
        return self.identify(x509.load_der_x509_certificate(der))


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"a transfer address is host:port, not {address!r}")
    return host.strip("[]"), int(port)
