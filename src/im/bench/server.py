"""The server under test: spawning ``python -m im serve`` in a temporary data directory, and reading a
process's CPU time and memory from /proc."""

from __future__ import annotations

import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from im.certs import create_ca, issue

__all__ = [
    "BENCH_SERVER_SETTINGS",
    "ENGINES",
    "EngineCpu",
    "MachineCpu",
    "SpawnedServer",
    "cpu_seconds",
    "raise_nofile",
    "rss_bytes",
]

#: Settings of a spawned server: cheap password hashing and no registration and login limits (the bench
#: creates many accounts from one address, 16 at a time), no per-connection send rate limit (the bench
#: is the load) and no per-address connection cap (all its clients come from one or a few loopback
#: addresses), no login admission rate (it opens its connections as fast as the server takes them). The
#: shared send, receipt and typing limits stay at their defaults.
BENCH_SERVER_SETTINGS = [
    "auth.argon2_time_cost=1",
    "auth.argon2_memory_kib=1024",
    "auth.argon2_parallelism=1",
    "limits.send_rate=1000000",
    "limits.max_connections_per_address=0",
    "limits.auth_rate=1000000",
    "limits.auth_burst=1000000",
    "rates.register_per_address=1000000/60",
    "rates.login_per_address=1000000/60",
    "rates.hash_per_address=64",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _name_and_cpu(pid: int | str) -> tuple[str, float]:
    """Process ``pid``'s name (``comm``) and user + system CPU seconds (all its threads), from
    /proc/<pid>/stat (the name is in parentheses and may hold any character: split at the last one)."""
    head, _, rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
    fields = rest.split()
    return head.partition("(")[2], (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    return _name_and_cpu(pid)[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (``VmRSS`` of /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class MachineCpu:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat: to tell how much of the
    machine went to something else than the server and the bench during a measurement."""

    @staticmethod
    def busy_seconds() -> tuple[float, float]:
        """(seconds in processes: user, nice, system, steal; seconds in irq and softirq). Loopback
        networking runs largely in softirq, which the kernel may not charge to any process."""
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
        return (user + nice + system + steal) / _CLK_TCK, (irq + softirq) / _CLK_TCK


#: The engines whose processes' CPU a measurement reports beside the server's, by process name
#: (``/proc/PID/comm``): what im's own CPU figure leaves out when the store or presence is not in im's
#: process. All processes of that name on the machine count, whatever they serve.
ENGINES = {"postgres": "PostgreSQL", "redis-server": "Redis", "etcd": "etcd", "beam.smp": "RabbitMQ"}


class EngineCpu:
    """CPU seconds of the engines' processes (:data:`ENGINES`) over a measurement: :meth:`snapshot` at
    its start and :meth:`since` at its end. A process that started in between counts whole (PostgreSQL
    starts a backend per new connection); one that ended in between is lost (its CPU since the start
    cannot be read any more), so a measurement must end before the server closes its engine
    connections."""

    @staticmethod
    def snapshot() -> dict[int, tuple[str, float]]:
        """pid → (engine, CPU seconds so far) for every engine process now running."""
        out: dict[int, tuple[str, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                name, seconds = _name_and_cpu(entry.name)
            except OSError:  # ended meanwhile
                continue
            engine = ENGINES.get(name)
            if engine is not None:
                out[int(entry.name)] = (engine, seconds)
        return out

    @staticmethod
    def since(start: dict[int, tuple[str, float]]) -> dict[str, float]:
        """Engine → CPU seconds its processes spent since ``start`` (only engines that spent some)."""
        spent: dict[str, float] = {}
        for pid, (engine, seconds) in EngineCpu.snapshot().items():
            before = start.get(pid)
            used = seconds - before[1] if before is not None and before[0] == engine else seconds
            if used > 0:
                spent[engine] = spent.get(engine, 0.0) + used
        return spent


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


_URL = re.compile(r"^im: (HTTP API|WebSocket|TCP)\s+(\S+)")


@dataclass
class SpawnedServer:
    """``python -m im serve`` on free ports (port 0, read back from its start-up lines) in a temporary
    data directory, stopped (SIGTERM) and cleaned up by :meth:`stop` or ``with``.

    ``tls=True``: a private CA and a server certificate for 127.0.0.1/localhost are made in the temporary
    directory (:mod:`im.certs`), the server gets them (:meth:`tls_settings`), and ``ca_file`` is the CA
    the bench's clients trust; the URLs are then https://, wss:// and tls://."""

    settings: list[str] = field(default_factory=list)
    tls: bool = False
    #: With ``tls``: the CA certificate that signed the server's (for the clients' ``ca_file``).
    ca_file: str | None = None
    data_dir: Path | None = None
    log_level: str = "warning"
    proc: subprocess.Popen[str] | None = None
    http: str = ""
    ws: str = ""
    tcp: str = ""
    _tmp: str | None = None
    log_path: Path | None = None
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> SpawnedServer:
        if self.data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="im-bench-")
            self.data_dir = Path(self._tmp) / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / "server.log" if self._tmp else self.data_dir / "server.log"
        tls_settings: list[str] = []
        if self.tls:
            certs = self.data_dir.parent / "certs"
            ca = create_ca(certs, overwrite=True)
            cert = issue(certs, ca, "bench-server", hosts=("127.0.0.1", "localhost"), client=False, overwrite=True)
            self.ca_file = str(ca.cert)
            tls_settings = self.tls_settings(cert.cert, cert.key)
        cmd = [
            sys.executable,
            "-m",
            "im",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--http-port",
            "0",
            "--ws-port",
            "0",
            "--tcp-port",
            "0",
            "--log-level",
            self.log_level,
        ]
        for item in [*BENCH_SERVER_SETTINGS, *tls_settings, *self.settings]:
            cmd += ["--set", item]
        log = open(self.log_path, "ab")  # noqa: SIM115 -- the child keeps its own descriptor
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        finally:
            log.close()
        urls: dict[str, str] = {}
        lines: list[str] = []

        def read() -> None:  # start-up lines; the rest of stdout is drained so the server never blocks
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line)
                m = _URL.match(line)
                if m:
                    urls[m.group(1)] = m.group(2)

        self._reader = threading.Thread(target=read, daemon=True, name="im-bench-server-stdout")
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"im serve exited with {self.proc.returncode}:\n{''.join(lines)}{self.log()}")
            if {"HTTP API", "WebSocket", "TCP"} <= urls.keys():
                self.http = urls["HTTP API"].removesuffix("/api/v1")
                self.ws, self.tcp = urls["WebSocket"], urls["TCP"]
                try:
                    if self._health():
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        message = f"im serve did not start within {timeout}s:\n{''.join(lines)}{self.log()}"
        self.stop()
        raise RuntimeError(message)

    def tls_settings(self, cert: Path, key: Path) -> list[str]:
        """The ``im serve --set`` items that turn TLS on with ``cert``/``key`` (the server's ``tls`` section)."""
        return [f"tls.cert_file={cert}", f"tls.key_file={key}"]

    def _health(self) -> bool:
        verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        return httpx.get(f"{self.http}/api/v1/health", timeout=2, verify=verify).status_code == 200

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            if self._reader is not None:
                self._reader.join(5)  # it ends at the pipe's EOF, now that the server has exited
            self.proc.stdout.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def __enter__(self) -> SpawnedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
