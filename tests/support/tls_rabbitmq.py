"""A private RabbitMQ node whose only listener speaks TLS and requires a client certificate of the test
CA (``ssl_options.fail_if_no_peer_cert``), for tests of ``amqps://``.

Debian's broker runs a second node beside the shared one: its own node name, data and log directories,
distribution port, an empty plugin list and a HOME of its own (for its Erlang cookie); it shares epmd.
It starts in about 5 s here. :func:`shared_tls_rabbitmq` starts one on first use and stops it at exit.
The shared broker on 5672 is never touched.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from im.backends.tls import ClientTls
from im.procs import free_port, stop_process
from tests.support.pki import EnginePki

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


@dataclass
class TlsRabbitMQ:
    pki: EnginePki
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="im-rabbit-tls-")))
    node: str = field(default_factory=lambda: f"imtls{uuid.uuid4().hex[:8]}@localhost")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqps://guest:guest@localhost:{self.port}/"

    def client_tls(self) -> ClientTls:
        return ClientTls(ca_file=self.pki.ca.cert, cert_file=self.pki.client.cert, key_file=self.pki.client.key)

    def log(self) -> str:
        try:
            return (self.dir / "out.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout: float = 60.0) -> TlsRabbitMQ:
        if not os.path.exists(SERVER):
            raise RuntimeError(f"{SERVER} is missing: apt-get install -y rabbitmq-server")
        conf = self.dir / "rabbit.conf"
        conf.write_text(
            "listeners.tcp = none\n"
            f"listeners.ssl.default = {self.port}\n"
            f"ssl_options.cacertfile = {self.pki.ca.cert}\n"
            f"ssl_options.certfile = {self.pki.server.cert}\n"
            f"ssl_options.keyfile = {self.pki.server.key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
        )
        (self.dir / "plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }
        with open(self.dir / "out.log", "ab") as out:
            self.proc = subprocess.Popen(
                [SERVER],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}:\n{self.log()}")
            if "Server startup complete" in self._node_log():
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    return self
            time.sleep(0.2)
        self.destroy()
        raise RuntimeError(f"rabbitmq-server with TLS did not start in {timeout}s:\n{self.log()}")

    def _node_log(self) -> str:
        try:
            return (self.dir / "log" / f"{self.node}.log").read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        if self.proc is not None:
            # The whole session: the script's Erlang VM (and its helpers) go with it.
            with_group = self.proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(with_group, signal.SIGTERM)
            stop_process(self.proc, signal.SIGTERM, 20.0, raise_on_timeout=False)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(with_group, signal.SIGKILL)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: TlsRabbitMQ | None = None


def shared_tls_rabbitmq() -> TlsRabbitMQ:
    """The test process's TLS RabbitMQ node (client certificates required), started on first use."""
    global _shared
    if _shared is None:
        pki = EnginePki.create(Path(tempfile.mkdtemp(prefix="im-rabbit-pki-")))
        r = TlsRabbitMQ(pki).start()
        atexit.register(r.destroy)
        atexit.register(shutil.rmtree, pki.dir, True)
        _shared = r
    return _shared
