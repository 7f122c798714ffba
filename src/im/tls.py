"""The server's TLS context, read from certificate and key files and read again when they change.

:class:`ReloadingContext` holds the current :class:`ssl.SSLContext` of a process's client listeners
(HTTP, WebSocket, TCP). Listeners ask for :attr:`ReloadingContext.context` for every new connection, so:

- a new certificate takes effect for the next connection, without a restart; connections already open
  keep the context (and certificate) they were accepted with;
- :meth:`ReloadingContext.check` reloads when either file's stamp (inode, size, mtime) changed since the
  last look: the process calls it every ``reload_interval`` seconds (:meth:`ReloadingContext.watch`);
  :meth:`ReloadingContext.reload` reloads whatever the stamps say (SIGHUP);
- a replacement that does not load (a truncated file, a key that does not match the certificate) is
  logged and the previous context stays in use; the same broken files are not retried or logged again
  until they change. Replace the two files with renames (``mv``), the certificate last: a reader then
  sees each file whole, and a check between the two renames at worst logs one mismatch and keeps the
  old pair until the next check.

Defaults: the server side of :func:`ssl.create_default_context` (its cipher list, no compression, the
server's cipher preference), TLS 1.2 or newer, no renegotiation. The context asks for no client
certificate: clients authenticate with tokens on these listeners (mutual TLS is the gRPC link's).

A leaf module: nothing of im is imported, and nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import stat
from pathlib import Path

from cryptography import x509

log = logging.getLogger(__name__)

#: ``tls.min_version`` values.
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: A certificate expiring sooner than this is logged as a warning at each load.
EXPIRY_WARNING = datetime.timedelta(days=14)

_Stamp = tuple[tuple[int, int, int], tuple[int, int, int]]


class TlsFilesError(ValueError):
    """The certificate or key file cannot be read or do not make a usable server context."""


def server_context(cert_file: Path, key_file: Path, *, min_version: str = "1.2") -> ssl.SSLContext:
    """A server-side context for ``cert_file``/``key_file`` (PEM). Raises :class:`TlsFilesError`
    with the file and the reason when they cannot be used."""
    if min_version not in VERSIONS:
        raise TlsFilesError(f"TLS version {min_version!r} is not one of {', '.join(VERSIONS)}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    for path in (cert_file, key_file):  # load_cert_chain's own errors do not say which file
        if not path.is_file():
            raise TlsFilesError(f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise TlsFilesError(f"{path}: not readable by this process")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFilesError(
            f"{cert_file} / {key_file}: not a PEM certificate chain and its matching private key ({exc})"
        ) from None
    return context


def describe(cert_file: Path) -> str:
    """One line about the certificate in ``cert_file``: subject and expiry (for the log)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return str(cert_file)
    return f"{cert.subject.rfc4514_string()} (valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"


class ReloadingContext:
    """The current server context for ``cert_file``/``key_file``, replaced when the files change.

    Guarantees: :attr:`context` is always a context that loaded successfully (the constructor raises
    :class:`TlsFilesError` rather than start without one); it changes only in :meth:`check` and
    :meth:`reload`, which never raise for bad files: they log and keep the previous context.
    """

    def __init__(self, cert_file: Path, key_file: Path, *, min_version: str = "1.2") -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.min_version = min_version
        self.reloads = 0  # successful reloads after the first load
        self.failures = 0  # replacements that did not load
        try:
            stamp = self._stamp()
        except FileNotFoundError as exc:
            raise TlsFilesError(f"{exc.filename}: no such file") from None
        except OSError as exc:
            raise TlsFilesError(f"{exc.filename}: {exc.strerror}") from None
        self._context = server_context(cert_file, key_file, min_version=min_version)
        self._seen: _Stamp | None = stamp
        self._loaded(first=True)

    @property
    def context(self) -> ssl.SSLContext:
        """The context for a new connection."""
        return self._context

    def check(self) -> bool:
        """Reload if either file changed since the last look; True when a new context is in use."""
        try:
            stamp = self._stamp()
        except OSError as exc:
            if self._seen is not None:  # log once per disappearance
                log.error("TLS: cannot read %s (%s); still serving the previous certificate", exc.filename, exc)
                self._seen = None
                self.failures += 1
            return False
        if stamp == self._seen:
            return False
        return self._load(stamp)

    def reload(self) -> bool:
        """Reload now, changed or not (SIGHUP); True when a new context is in use."""
        try:
            stamp = self._stamp()
        except OSError as exc:
            log.error("TLS: cannot read %s (%s); still serving the previous certificate", exc.filename, exc)
            self.failures += 1
            return False
        return self._load(stamp)

    async def watch(self, interval: float) -> None:
        """Call :meth:`check` every ``interval`` seconds, forever (a background loop of the process)."""
        while True:
            await asyncio.sleep(interval)
            self.check()

    # --- internals ----------------------------------------------------------------------------------

    def _stamp(self) -> _Stamp:
        a, b = os.stat(self.cert_file), os.stat(self.key_file)
        return (a.st_ino, a.st_size, a.st_mtime_ns), (b.st_ino, b.st_size, b.st_mtime_ns)

    def _load(self, stamp: _Stamp) -> bool:
        # The stamp is taken before the files are read: a change during the read is seen by the next check.
        self._seen = stamp
        try:
            context = server_context(self.cert_file, self.key_file, min_version=self.min_version)
        except TlsFilesError as exc:
            self.failures += 1
            log.error("TLS: the new certificate does not load, still serving the previous one: %s", exc)
            return False
        self._context = context
        self.reloads += 1
        self._loaded(first=False)
        return True

    def _loaded(self, *, first: bool) -> None:
        log.info(
            "TLS: %s certificate %s", "serving" if first else "reloaded, new connections get", describe(self.cert_file)
        )
        try:
            cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
            left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            if left < EXPIRY_WARNING:
                log.warning("TLS: the certificate in %s expires in %s: replace it", self.cert_file, left)
            mode = stat.S_IMODE(os.stat(self.key_file).st_mode)
        except (OSError, ValueError):
            return
        if mode & 0o077:
            log.warning("TLS: %s is readable by other users (mode %o): chmod 600 it", self.key_file, mode)
