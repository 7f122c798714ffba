"""The composition root's security part: the secrets, keys and TLS settings of a process, read from the
configuration and checked at start (a missing or bad file is a :class:`~im.config.ConfigError` naming it,
never a failure at first use). :mod:`im.compose` builds the backends and services with them."""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from im.backends.durable import create_once
from im.backends.keys import KeyProvider
from im.backends.keys.env import EnvKeyProvider
from im.backends.keys.file import FileKeyProvider
from im.backends.tls import ClientTls
from im.certs import node_identity
from im.config import Config, ConfigError
from im.lifecycle import Loop
from im.net import Admission, TlsAccept
from im.tls import ReloadingContext, TlsFilesError

if TYPE_CHECKING:  # the link's module (gRPC) is imported by build_link_tls: im serve has no transfer link
    from im.transfer.tls import LinkTls

log = logging.getLogger("im")


def master_key_provider(config: Config, *, create: bool = True) -> KeyProvider | None:
    """The master key: from the environment variable ``encryption.key_env`` when set, else from the key
    file (``encryption.key_file``, default ``<data_dir>/master.key``; created when missing). Without
    ``create`` (encryption off): only a key that is there already, else None."""
    enc = config.encryption
    key_file = enc.key_file or config.data_dir / "master.key"
    if not create and not (os.environ.get(enc.key_env) if enc.key_env else key_file.exists()):
        return None
    if enc.key_env:
        text = os.environ.get(enc.key_env)
        if not text:
            raise ConfigError(
                f"encryption.key_env is {enc.key_env}, but that environment variable is not set (a base64 master "
                "key, the same on every node; see docs/security.md, Encryption)"
            )
        try:
            return EnvKeyProvider(text, name=enc.key_env)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return FileKeyProvider(key_file, create=create)


def private_dir(path: os.PathLike[str] | str) -> None:
    """Create the data directory 0700, or take group and other permissions off an existing one (it holds
    the database, the token secret and, by default, the master key)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        log.warning("data directory %s was mode %04o; now %04o", path, mode, mode & 0o700)


def client_tls(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ClientTls | None:
    """An engine's TLS settings, or None when none is set (TLS then depends on the URL alone)."""
    if ca_file is None and cert_file is None:
        return None
    tls = ClientTls(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    try:
        tls.context()  # reads the files now: a missing or bad one is named at start, not at first use
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS files {ca_file}, {cert_file}, {key_file}: {exc}") from None
    return tls


def redis_tls(config: Config) -> ClientTls | None:
    """TLS to the presence Redis: shared by presence, the rate limits (same client) and the push dedupe."""
    pc = config.presence
    return client_tls(pc.redis_ca_file, pc.redis_cert_file, pc.redis_key_file)


def build_link_tls(config: Config, node: str) -> LinkTls | None:
    """This node's mutual-TLS identity on the transfer link (``cluster_tls``), or None (plaintext).
    The certificate must name ``node`` (its node id): a mismatch is a configuration error at start,
    since every peer would refuse it."""
    ct = config.cluster_tls
    if ct.ca_file is None or ct.cert_file is None or ct.key_file is None:
        return None
    from im.transfer.tls import LinkTls

    tls = LinkTls(ct.ca_file, ct.cert_file, ct.key_file, node_identity, handshake_timeout=ct.handshake_timeout)
    try:
        named = tls.own_node()
        tls.server_credentials()  # reads the three files: a missing one fails here, with its name
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cluster_tls: {exc}") from None
    if named != node:
        raise ConfigError(
            f"cluster_tls.cert_file {ct.cert_file} names node {named!r}, but this node is {node!r} "
            f"(make one with: im certs node {node})"
        )
    return tls


def load_secret(config: Config) -> bytes:
    """The token-signing key: configured, or generated once and kept in the data directory."""
    if config.auth.secret:
        return config.auth.secret.encode()
    path = config.data_dir / "secret.key"
    if not path.exists():  # nodes of a cluster sharing the directory may get here at the same moment
        path.parent.mkdir(parents=True, exist_ok=True)
        create_once(path, secrets.token_urlsafe(48).encode())
    return path.read_text().strip().encode()


@dataclass(frozen=True, slots=True)
class ProcessTls:
    """TLS on the client listeners of one process: the certificate files (re-read when they change or on
    SIGHUP) and how every listener accepts with them."""

    files: ReloadingContext
    accept: TlsAccept
    #: Seconds between checks of the files (0: SIGHUP only).
    reload_interval: float
    hsts_max_age: int

    def loops(self) -> list[Loop]:
        """The background check of the files' modification times (none when ``reload_interval`` is 0)."""
        if not self.reload_interval:
            return []
        return [("im-tls-reload", self.files.watch(self.reload_interval))]


def build_tls(config: Config) -> ProcessTls | None:
    """The process's TLS from the ``tls`` section; None when it is off. Raises ConfigError when the files
    do not load (the process does not start without a usable certificate)."""
    tc = config.tls
    if tc.cert_file is None or tc.key_file is None:
        return None
    try:
        files = ReloadingContext(tc.cert_file, tc.key_file, min_version=tc.min_version)
    except TlsFilesError as exc:
        raise ConfigError(f"tls: {exc}") from None
    slots = Admission(max_connections=tc.max_handshakes, max_per_address=tc.max_handshakes_per_address, max_refusing=0)
    accept = TlsAccept(
        lambda: files.context, slots, handshake_timeout=tc.handshake_timeout, shutdown_timeout=tc.handshake_timeout
    )
    return ProcessTls(files, accept, tc.reload_interval, tc.hsts_max_age)
