"""A private etcd subprocess on free ports, for the etcd backend tests.

``EtcdProcess`` owns one etcd: a temporary data directory, a client and a peer port. ``stop`` then
``start`` restarts it on the same ports and data directory (what an operator's restart looks like to
clients). ``shared_etcd()`` is the one the contract suite uses: started on first use, stopped when the
test process exits.

When the ``etcd`` binary is missing, :class:`EtcdMissing` says how to install it: the tests that need etcd
then fail; they never skip.
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

import httpx

from tests.support.server import free_port

INSTALL_HINT = (
    "the etcd tests need the `etcd` binary on PATH: install it with "
    "`apt-get install -y etcd-server` (as root; Debian's etcd 3.4), or run `bash scripts/test.sh`, "
    "which installs it when missing"
)


class EtcdMissing(RuntimeError):
    """No ``etcd`` binary on PATH."""


@dataclass
class EtcdProcess:
    """One single-member etcd. Fast elections (10 ms heartbeat, 100 ms election timeout) make it ready
    within a fraction of a second after each start, and bring the smallest lease TTL down to 1 s."""

    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="im-etcd-")))
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client URL, as :class:`im.backends.etcd_registry.EtcdRegistry` takes it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdMissing(INSTALL_HINT)
        assert self.proc is None or self.proc.poll() is not None, "etcd is running already"
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            binary, "--name", "im-test", "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"im-test={peer}",
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--logger", "zap", "--log-outputs", "stderr",
        ]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # /health answers true once the member has a leader and serves requests.
                if httpx.get(f"{client}/health", timeout=1).json().get("health") == "true":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.02)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"etcd did not become healthy in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop etcd (SIGTERM: clean; SIGKILL: crash), keeping the data directory for a restart."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, sig: int = signal.SIGTERM, down: float = 0.0) -> None:
        """Stop, stay down ``down`` seconds, and start again on the same ports and data directory."""
        self.stop(sig)
        time.sleep(down)
        self.start()

    def destroy(self) -> None:
        """Stop etcd and delete its data directory."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)


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
