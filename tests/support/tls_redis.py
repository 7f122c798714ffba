"""A private Redis whose only port speaks TLS, for tests of ``rediss://`` with client certificates.

Debian's ``redis-server`` 7.0 is built with TLS (``--tls-port``); this starts one on a free port with
``--port 0`` (no plaintext port), ``--tls-auth-clients yes`` (a client certificate of the test CA
required, unless ``auth_clients`` is False), nothing kept on disk. :func:`shared_tls_redis` is the one the
contract suite uses: started on first use, stopped when the test process exits. The shared Redis on 6379
is never touched.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from im.backends.tls import ClientTls
from im.procs import free_port, stop_process
from tests.support.pki import EnginePki


@dataclass
class TlsRedis:
    pki: EnginePki
    auth_clients: bool = True
    port: int = field(default_factory=free_port)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="im-redis-tls-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client_tls(self) -> ClientTls:
        return ClientTls(ca_file=self.pki.ca.cert, cert_file=self.pki.client.cert, key_file=self.pki.client.key)

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout: float = 10.0) -> TlsRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: apt-get install -y redis-server")
        cmd = [
            binary,
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.pki.server.cert),
            "--tls-key-file", str(self.pki.server.key),
            "--tls-ca-cert-file", str(self.pki.ca.cert),
            "--tls-auth-clients", "yes" if self.auth_clients else "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        tls = self.client_tls()
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(tls.ca_file),
            ssl_certfile=str(tls.cert_file),
            ssl_keyfile=str(tls.key_file),
            socket_timeout=1,
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.destroy()
        raise RuntimeError(f"redis-server with TLS did not answer in {timeout}s:\n{self.log()}")

    def destroy(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL, 10.0, raise_on_timeout=False)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: TlsRedis | None = None


def shared_tls_redis() -> TlsRedis:
    """The test process's TLS Redis (client certificates required), started on first use."""
    global _shared
    if _shared is None:
        pki = EnginePki.create(Path(tempfile.mkdtemp(prefix="im-redis-pki-")))
        r = TlsRedis(pki).start()
        atexit.register(r.destroy)
        atexit.register(shutil.rmtree, pki.dir, True)
        _shared = r
    return _shared
