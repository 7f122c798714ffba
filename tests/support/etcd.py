"""A private etcd subprocess on free ports, for the etcd backend tests.

``EtcdProcess`` (from :mod:`im.cluster`, which ``im cluster`` uses too) owns one etcd: a temporary data
directory, a client and a peer port. ``stop`` then ``start`` restarts it on the same ports and data
directory (what an operator's restart looks like to clients). ``shared_etcd()`` is the one the contract
suite uses: started on first use, stopped when the test process exits.

When the ``etcd`` binary is missing, :class:`EtcdMissing` says how to install it: the tests that need etcd
then fail; they never skip.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from im.backends.tls import ClientTls
from im.cluster import ETCD_INSTALL_HINT, EtcdMissing, EtcdProcess, free_port, stop_process
from tests.support.pki import EnginePki

INSTALL_HINT = ETCD_INSTALL_HINT
__all__ = ["INSTALL_HINT", "EtcdMissing", "EtcdProcess", "TlsEtcd", "shared_etcd", "shared_tls_etcd", "tls_client"]


_shared: EtcdProcess | None = None
_shared_error: BaseException | None = None


def shared_etcd() -> EtcdProcess:
    """The test process's etcd, started on first use (a free port clash gets two more tries) and
    destroyed at exit. A failure to start is remembered, so every later caller fails at once with it."""
    global _shared, _shared_error
    if _shared is not None:
        return _shared
    if _shared_error is not None:
        raise RuntimeError(f"the shared etcd failed to start: {_shared_error}") from _shared_error
    for attempt in range(3):
        etcd = EtcdProcess()
        try:
            etcd.start()
        except EtcdMissing as e:
            etcd.destroy()
            _shared_error = e
            raise
        except RuntimeError as e:
            etcd.destroy()
            if attempt == 2:
                _shared_error = e
                raise
            continue
        _shared = etcd
        atexit.register(etcd.destroy)
        return etcd
    raise AssertionError("unreachable")


@dataclass
class TlsEtcd:
    """A private single-member etcd whose client port speaks only TLS and, with ``client_cert_auth``,
    requires a client certificate of ``pki``'s CA (``--client-cert-auth``). ``destroy`` stops it."""

    pki: EnginePki
    client_cert_auth: bool = True
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="im-etcd-tls-")))
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def log(self) -> str:
        try:
            return (self.data_dir / "etcd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout: float = 20.0) -> TlsEtcd:
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdMissing(INSTALL_HINT)
        client = f"https://{self.endpoint}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            binary,
            "--name=im-tls",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=im-tls={peer}",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            f"--cert-file={self.pki.server.cert}",
            f"--key-file={self.pki.server.key}",
            f"--trusted-ca-file={self.pki.ca.cert}",
            f"--client-cert-auth={'true' if self.client_cert_auth else 'false'}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        with open(self.data_dir / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        ctx.load_cert_chain(str(self.pki.client.cert), str(self.pki.client.key))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{client}/health", timeout=1, verify=ctx).json().get("health") == "true":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        self.destroy()
        raise RuntimeError(f"etcd with TLS did not become healthy in {timeout}s:\n{self.log()}")

    def destroy(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL, 10.0, raise_on_timeout=False)
            self.proc = None
        shutil.rmtree(self.data_dir, ignore_errors=True)


_shared_tls: TlsEtcd | None = None


def shared_tls_etcd() -> TlsEtcd:
    """The test process's etcd with TLS and client certificates required, started on first use (its
    certificates in a temporary directory) and destroyed at exit."""
    global _shared_tls
    if _shared_tls is None:
        pki = EnginePki.create(Path(tempfile.mkdtemp(prefix="im-etcd-pki-")))
        etcd = TlsEtcd(pki).start()
        atexit.register(etcd.destroy)
        atexit.register(shutil.rmtree, pki.dir, True)
        _shared_tls = etcd
    return _shared_tls


def tls_client(pki: EnginePki) -> ClientTls:
    """What a node of the cluster presents to etcd: the CA and its client certificate."""
    return ClientTls(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key)
