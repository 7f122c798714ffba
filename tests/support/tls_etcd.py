"""A private etcd whose client port speaks only TLS and requires client certificates, for tests of the
registry over TLS (``--cert-file --key-file --trusted-ca-file --client-cert-auth``). :func:`shared_tls_etcd`
is the one the contract suite uses (its ``etcd-tls`` parameter): started on first use with certificates
from :mod:`im.certs` in a temporary directory, destroyed at exit.
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
from im.cluster import ETCD_INSTALL_HINT, EtcdMissing
from im.procs import free_port, stop_process
from tests.support.pki import EnginePki

__all__ = ["TlsEtcd", "shared_tls_etcd", "tls_client"]


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
            raise EtcdMissing(ETCD_INSTALL_HINT)
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
