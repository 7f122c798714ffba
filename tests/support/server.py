"""A real ``im serve`` subprocess on free ports, for end-to-end tests and benchmarks."""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from im.procs import free_port, stop_process
from tests.support.zygote import ZYGOTE, ForkedProcess

FAST_ARGON2 = [
    "--set",
    "auth.argon2_time_cost=1",
    "--set",
    "auth.argon2_memory_kib=1024",
    "--set",
    "auth.argon2_parallelism=1",
]

#: Login and registration limits out of the way, for tests that are not about them: they register and log
#: in many users from 127.0.0.1, often concurrently, far past the per-address defaults. The send, typing,
#: receipt and upload limits stay at their defaults (normal use never meets them). tests/security/ runs
#: without these (``relaxed=False``).
RELAXED_RATES_SETTINGS = {
    "rates.login_per_account_address": "100000/60",
    "rates.login_per_account": "100000/60",
    "rates.login_per_address": "100000/60",
    "rates.register_per_address": "100000/60",
    "rates.hash_per_address": "1000",
    "rates.hash_queue": "1000",
}
RELAXED_RATES = [arg for key, value in RELAXED_RATES_SETTINGS.items() for arg in ("--set", f"{key}={value}")]
#: The same, as the ``rates`` section of a configuration built in-process (``load_config(None, {...})``).
RELAXED_RATES_CONFIG = {key.removeprefix("rates."): value for key, value in RELAXED_RATES_SETTINGS.items()}


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key, and the CA clients trust (made with ``im.certs``)."""

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and verifies the host name."""
        return ssl.create_default_context(cafile=self.ca)


def make_tls(directory: Path, name: str = "server") -> TlsFiles:
    """A new CA and a server certificate for localhost, 127.0.0.1 and ::1 in ``directory``."""
    from im import certs

    ca = certs.create_ca(directory)
    node = certs.issue(directory, ca, name)
    return TlsFiles(ca.cert, node.cert, node.key)


@dataclass
class ServerProcess:
    data_dir: Path
    extra: list[str] = field(default_factory=list)
    http_port: int = field(default_factory=free_port)
    ws_port: int = field(default_factory=free_port)
    tcp_port: int = field(default_factory=free_port)
    proc: ForkedProcess | None = None
    #: Open-file limit (soft and hard) to start the server under, like ``ulimit -n``; None: inherited.
    nofile: int | None = None
    log_path: Path | None = None
    #: FAST_ARGON2 and RELAXED_RATES before ``extra`` (False: the defaults, for tests/security/).
    relaxed: bool = True
    #: TLS on every listener (``--tls-cert``/``--tls-key``): the URLs become https/wss.
    tls: TlsFiles | None = None

    @property
    def http(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client passes as ``verify``: the test CA's context over TLS."""
        return self.tls.client_context() if self.tls else True

    @property
    def api(self) -> str:
        return f"{self.http}/api/v1"

    @property
    def ws(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.ws_port}/ws"

    @property
    def tcp(self) -> tuple[str, int]:
        return ("127.0.0.1", self.tcp_port)

    def start(self, timeout: float = 20.0) -> ServerProcess:
        return self.launch().wait_ready(timeout)

    def launch(self) -> ServerProcess:
        """Start the process (forked from the suite's zygote, tests/support/zygote.py) without waiting."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "server.log"
        args = [
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--http-port",
            str(self.http_port),
            "--ws-port",
            str(self.ws_port),
            "--tcp-port",
            str(self.tcp_port),
            *(FAST_ARGON2 + RELAXED_RATES if self.relaxed else []),
            *(["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)] if self.tls else []),
            *self.extra,
        ]
        self.proc = ZYGOTE.spawn(args, self.log_path, nofile=self.nofile)
        return self

    def wait_ready(self, timeout: float = 20.0) -> ServerProcess:
        """Wait until the launched server answers on every listener; raises if it exits first."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"im serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.api}/health", timeout=1, verify=self.verify).status_code == 200:
                    with socket.create_connection(("127.0.0.1", self.ws_port), timeout=1):
                        pass
                    with socket.create_connection(self.tcp, timeout=1):
                        return self
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"im serve did not start in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Stop the server (SIGTERM: graceful; SIGKILL: crash) and return its exit code."""
        assert self.proc is not None
        return stop_process(self.proc, sig, timeout)

    def restart(self, sig: int = signal.SIGTERM) -> ServerProcess:
        self.stop(sig)
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


@contextmanager
def running_server(
    data_dir: Path,
    extra: list[str] | None = None,
    *,
    nofile: int | None = None,
    relaxed: bool = True,
    tls: TlsFiles | None = None,
    ws_port: int | None = None,
) -> Iterator[ServerProcess]:
    """A started ``im serve``; on exit it must stop cleanly on SIGTERM (exit 0, no traceback logged).
    ``ws_port``: the gateway's WebSocket port (None: a free one), for a proxy set up before the server."""
    proc = ServerProcess(data_dir, extra=list(extra or []), nofile=nofile, relaxed=relaxed, tls=tls)
    if ws_port is not None:
        proc.ws_port = ws_port
    proc.start()
    try:
        yield proc
    except BaseException:
        proc.stop()  # the test failed: do not leave the server running
        raise
    code = proc.stop()
    assert code == 0, f"im serve exited with {code} on SIGTERM:\n{proc.log()[-4000:]}"
    assert "Traceback" not in proc.log(), proc.log()[-4000:]
