"""The ``im`` command: ``im serve`` runs everything in one process; ``im api``, ``im gateway`` and
``im transfer`` run the roles of the distributed mode, ``im cluster`` a local cluster of them; ``im config``
shows the configuration and changes the dynamic settings of a cluster (im.config_cli); ``im status``
prints a cluster's nodes from its registry; ``im certs`` makes a private CA and TLS certificates; ``im chat``
is a terminal chat client; ``im bench`` a load generator."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from im import compiled
from im.cli_help import use_everywhere
from im.config import Config, ConfigError, load_config, put_setting
from im.grpc_runtime import use_grpc_defaults
from im.startup import run_start

#: The epilog of im serve and the roles: what their exit status means (im.startup).
EXIT_STATUSES = (
    "Exit status: 0 after a clean stop (Ctrl-C or SIGTERM), 1 when the start failed (one line on stderr "
    "names the problem and the fix), 2 for an invalid setting."
)


def _flags_to_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags as a nested dict over the file and the environment."""
    out: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is not None:
            put_setting(out, path, value)

    put("data_dir", args.data_dir)
    put("log_level", args.log_level)
    put("http.host", args.host)
    put("gateway.host", args.host)
    put("http.port", args.http_port)
    put("gateway.ws_port", args.ws_port)
    put("gateway.tcp_port", args.tcp_port)
    put("tls.cert_file", args.tls_cert)
    put("tls.key_file", args.tls_key)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example limits.max_frame_bytes=65536")
        put(key, value)
    return out


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """The configuration flags; their defaults are the configuration's (shown from it, so never stale)."""
    d = Config.model_construct()  # the defaults alone: no file, no environment
    http, gw = d.http, d.gateway
    p.add_argument(
        "-c", "--config", type=Path, metavar="FILE", help="YAML configuration file (default: none, built-in defaults)"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"where the database and keys live (default: {d.data_dir}, in the current directory)",
    )
    p.add_argument("--host", help=f"bind address of every listener (default: {http.host}; 0.0.0.0 for all)")
    p.add_argument(
        "--http-port", type=int, metavar="PORT", help=f"HTTP API port (default: {http.port}; 0 picks a free one)"
    )
    p.add_argument(
        "--ws-port",
        type=int,
        metavar="PORT",
        help=f"WebSocket gateway port (default: {gw.ws_port}; 0 picks a free one)",
    )
    p.add_argument(
        "--tcp-port", type=int, metavar="PORT", help=f"TCP gateway port (default: {gw.tcp_port}; 0 picks a free one)"
    )
    p.add_argument(
        "--tls-cert", metavar="PEM", help="certificate: every listener speaks TLS only (with --tls-key; default: none)"
    )
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help=f"debug also prints the traceback of a failed start (default: {d.log_level})",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any setting, e.g. limits.send_rate=500 (repeat it; im config shows them all)",
    )


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, _flags_to_overrides(args))


def tune_gc() -> None:
    """A chat server allocates many short-lived objects per message and holds few cycles: collect the
    young generation less often, and keep the objects made so far (start-up) out of every collection."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _setup_logging(config: Config, role: str, node: str = "") -> None:
    """Every line of this process in one format (``logs.format``), naming its node and role."""
    from im.observability.logs import setup

    lc = config.logs
    setup(level=config.log_level, fmt=lc.format, role=role, node=node, client_error_interval=lc.client_error_interval)


def _serve(config: Config, reload: Callable[[], Config] | None = None) -> int:
    """``reload``: SIGHUP's re-read of the file, environment and flags (the dynamic settings apply)."""
    import uvloop

    from im.server import EmbeddedServer

    _setup_logging(config, "serve", config.gateway.node_id)

    def ready(server: EmbeddedServer) -> None:
        print(f"im: HTTP API   {server.http_url}/api/v1   (OpenAPI docs: {server.http_url}/api/v1/docs)", flush=True)
        print(f"im: Web chat   {server.http_url}/", flush=True)
        print(f"im: WebSocket  {server.ws_url}", flush=True)
        if config.metrics.enabled:
            print(f"im: Metrics    {server.http_url}/metrics", flush=True)
        if server.tcp_url:
            print(f"im: TCP        {server.tcp_url}", flush=True)
        print(f"im: build      {compiled.select()}", flush=True)
        print(f"im: data in    {config.data_dir.resolve()}   (Ctrl-C stops)", flush=True)

    async def main() -> None:
        await EmbeddedServer(config, reload=reload).run(ready)

    tune_gc()
    return run_start("serve", config, lambda: uvloop.run(main()))


def _run_role(role: str, config: Config) -> int:
    """``im api`` / ``im gateway`` / ``im transfer``: one role of the distributed mode (im.roles)."""
    import uvloop

    from im.roles import ROLES, ApiNode, GatewayNode, TransferNode

    nodes = {"api": config.http.node_id, "gateway": config.gateway.node_id, "transfer": config.transfer.node_id}
    _setup_logging(config, role, nodes.get(role, ""))

    def ready(n: ApiNode | GatewayNode | TransferNode) -> None:
        if isinstance(n, ApiNode):
            where = f"{n.url}/api/v1"
        elif isinstance(n, GatewayNode):
            where = " ".join(n.addresses.values())
        else:
            where = n.address
        if not isinstance(n, ApiNode) and n.ops is not None:
            where += f" ops={n.ops.url}"
        print(f"im: ready {role} {where} build={compiled.select().kind}", flush=True)

    def start() -> None:
        node = ROLES[role](config)
        tune_gc()
        uvloop.run(node.run(ready))

    return run_start(role, config, start)


DEFAULT_CERTS_DIR = Path("im-certs")


def _add_certs_parser(sub: Any) -> None:
    certs = sub.add_parser(
        "certs",
        help="a private CA and the certificates it signs, for TLS (im certs --help)",
        description="Certificates for a private deployment: im certs ca once, then one im certs node per "
        "server (its host names and addresses as --host); clients trust ca.crt.",
    )
    kinds = certs.add_subparsers(dest="kind", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", type=Path, default=DEFAULT_CERTS_DIR, help="where the files go (default ./im-certs)")
        p.add_argument("--overwrite", action="store_true", help="replace existing files (never done otherwise)")

    ca = kinds.add_parser("ca", help="create the CA: ca.crt (give to clients) and ca.key (keep it safe)")
    ca.add_argument("--name", default="im cluster CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    common(ca)
    node = kinds.add_parser("node", help="a server/node certificate signed by the CA: NAME.crt, NAME.key")
    node.add_argument("name", help="the node's name (its node id, e.g. gw-1): common name and im://node/NAME")
    node.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        help="a DNS name or IP address clients reach it at (repeat; default localhost, 127.0.0.1, ::1)",
    )
    node.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    common(node)
    client = kinds.add_parser("client", help="a client-only certificate signed by the CA: NAME.crt, NAME.key")
    client.add_argument("name", help="the client's name (common name)")
    client.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    common(client)


def _certs(args: argparse.Namespace) -> int:
    """``im certs ca|node|client``: files made by im.certs, with messages that say what to do next."""
    from im import certs

    directory: Path = args.dir
    if args.days < 1:
        print("im certs: --days must be at least 1", file=sys.stderr)
        return 2
    try:
        if args.kind == "ca":
            made = certs.create_ca(directory, common_name=args.name, days=args.days, overwrite=args.overwrite)
            print(f"im certs: CA certificate {made.cert} (clients trust this one)")
            print(f"im certs: CA key         {made.key} (mode 0600; whoever holds it can mint certificates)")
            print(f"next: im certs node NAME --host HOST --dir {directory}")
            return 0
        ca = certs.Issued(directory / f"{certs.CA_NAME}.crt", directory / f"{certs.CA_NAME}.key")
        if not (ca.cert.exists() and ca.key.exists()):
            print(
                f"im certs: no CA in {directory} ({ca.cert}, {ca.key}): run `im certs ca --dir {directory}` first",
                file=sys.stderr,
            )
            return 1
        if args.kind == "node":
            hosts = args.host or ["localhost", "127.0.0.1", "::1"]
            made = certs.issue(directory, ca, args.name, hosts=hosts, days=args.days, overwrite=args.overwrite)
            print(f"im certs: node certificate {made.cert} for {args.name} ({', '.join(hosts)})")
            print(f"im certs: node key         {made.key} (mode 0600)")
            print(f"next: im serve --tls-cert {made.cert} --tls-key {made.key}")
        else:
            made = certs.issue(
                directory, ca, args.name, hosts=(), server=False, client=True, days=args.days, overwrite=args.overwrite
            )
            print(f"im certs: client certificate {made.cert} for {args.name}")
            print(f"im certs: client key         {made.key} (mode 0600)")
    except certs.CertificateExists:
        name = certs.CA_NAME if args.kind == "ca" else args.name
        where = f"{directory / (name + '.crt')} or {directory / (name + '.key')}"
        print(f"im certs: {where} exists already; nothing was written (--overwrite replaces it)", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"im certs: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="encryption at rest: master key rotation, plaintext migration (im keys --help)",
        description="Keys of encryption at rest (docs/security.md, Encryption). Each command takes the same "
        "configuration flags as im serve and works while servers run on the same data.",
    )
    ops = keys.add_subparsers(dest="op", required=True)
    texts = {
        "status": "master keys held, data keys by the master key that wraps them, plaintext bodies and file ids left",
        "migrate": "seal every message body still stored in clear and key the file ids still in clear, online, "
        "showing progress",
        "scrub": "drop what the database keeps of overwritten bodies (SQLite: VACUUM, writers waiting, then a "
        "full WAL checkpoint; PostgreSQL: VACUUM), as migrate does at its end",
        "rotate": "a new master key first in the key file (the old ones kept), then every data key and file "
        "key rewrapped under it",
        "rewrap": "rewrap every data key and file key under the current master key (resumes a rotation)",
        "retire": "remove the older master keys from the key file, refused while anything is wrapped by them",
        "new-key": "print a new random master key (base64), for encryption.key_env",
    }
    for op, text in texts.items():
        p = ops.add_parser(op, help=text, description=text)
        _add_config_flags(p)
        if op in ("rotate", "rewrap", "migrate"):
            p.add_argument("--batch", type=int, default=500, help="rows per page (default 500)")
        if op == "retire":
            p.add_argument(
                "--force", action="store_true", help="do not wait for running servers to re-read a changed key file"
            )
    conv = ops.add_parser(
        "rotate-conversation",
        help="a new data key version for one conversation (new messages use it, old ones stay readable)",
    )
    conv.add_argument("conv", help="the conversation id, e.g. d:1:2 or g:7")
    _add_config_flags(conv)


class _KeysError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _keys(args: argparse.Namespace, config: Config) -> int:
    """``im keys ...``: each operation on the configured store, beside running servers."""
    import asyncio

    from im.backends.keys.aes import encode_master_key, new_master_key

    if args.op == "new-key":
        print(encode_master_key(new_master_key()))
        return 0
    _setup_logging(config, "keys")
    try:
        return asyncio.run(_keys_run(args, config))
    except _KeysError as exc:
        print(f"im keys {args.op}: {exc}", file=sys.stderr)
        return exc.code
    except (ConfigError, OSError, ValueError) as exc:
        print(f"im keys {args.op}: {exc}", file=sys.stderr)
        return 2


async def _keys_run(args: argparse.Namespace, config: Config) -> int:
    import contextlib
    import time

    from im.backends.blobs.encrypted import EncryptedBlobStorage, SealedBlobs
    from im.backends.blobs.s3 import S3BlobStorage
    from im.backends.chat.encrypted import MigrationProgress
    from im.backends.keys import MasterKeyMismatch
    from im.backends.keys import admin as keys_admin
    from im.backends.keys.file import retire_from_key_file, rotate_key_file
    from im.backends.keys.keyring import conv_key_name
    from im.compose import build_backends, build_blobs, file_id_conversion, plaintext_migration

    enc = config.encryption
    key_file = enc.key_file or config.data_dir / "master.key"
    if not enc.key_env and not key_file.exists():
        raise _KeysError(f"no master key file {key_file} (and encryption.key_env is not set)", 2)
    if args.op == "rotate":
        if enc.key_env:
            raise _KeysError(
                f"the master key comes from the environment variable {enc.key_env}: make a key with `im keys "
                f"new-key`, set {enc.key_env}=NEW,OLD on every node (restart them one by one), then run "
                "`im keys rewrap`; once it reports nothing left, `im keys retire` says when OLD may go",
                2,
            )
        new_id, old_ids = rotate_key_file(key_file)
        print(f"im keys: new master key {new_id} is current in {key_file}; kept older: {', '.join(old_ids)}")
        print("im keys: running servers re-read the file (SIGHUP, the periodic check, or their first miss)")
    b = build_backends(config)
    if b.keyring is None:
        raise _KeysError("no keyring (encryption off and no master key)", 2)
    keyring = b.keyring
    last = 0.0

    def say(line: str, *, force: bool = False) -> None:
        nonlocal last
        if force or time.monotonic() - last >= 2.0:
            last = time.monotonic()
            print(f"im keys: {line}", flush=True)

    async with contextlib.AsyncExitStack() as stack:
        try:
            await keyring.start()
        except MasterKeyMismatch as exc:
            raise _KeysError(str(exc), 1) from None
        stack.push_async_callback(keyring.close)
        if args.op == "rotate-conversation":
            if not (await keyring.store.load_keys([conv_key_name(args.conv)])).get(conv_key_name(args.conv)):
                raise _KeysError(f"conversation {args.conv} has no key (no message was stored encrypted in it)")
            version = await keyring.rotate(conv_key_name(args.conv))
            print(f"im keys: conversation {args.conv} now encrypts with key version {version}")
            print(f"im keys: other processes follow within encryption.key_refresh ({enc.key_refresh:g} s)")
            return 0
        if args.op in ("status", "migrate", "scrub"):
            await b.chat_store.start()
            stack.push_async_callback(b.chat_store.close)
            assert b.bodies is not None
            await b.bodies.start()
            stack.push_async_callback(b.bodies.close)
        if args.op == "scrub":
            assert b.bodies is not None
            if not await b.bodies.scrub():
                raise _KeysError("the database stayed busy: old versions remain until the next full checkpoint")
            print("im keys: scrubbed: no overwritten body versions left in the database files")
            return 0
        if args.op == "migrate":
            migration = plaintext_migration(config, b)
            if migration is None:
                raise _KeysError("encryption.enabled is false: turn it on to seal the stored bodies", 2)
            migration.batch = args.batch
            migration.pause = 0.0
            migration.report_interval = 2.0

            def show(p: MigrationProgress) -> None:
                say(p.line(), force=True)

            moved = await migration.run(show)
            print(
                f"im keys: done: {moved.sealed} sealed, {moved.skipped} changed meanwhile ({moved.messages} messages)"
            )
            conversion = file_id_conversion(config, b)
            if conversion is not None:
                await b.file_store.start()
                stack.push_async_callback(b.file_store.close)
                conversion.batch = args.batch
                conversion.report_interval = 2.0
                keyed = await conversion.run(lambda p: say(p.line(), force=True))
                print(f"im keys: file ids: {keyed.rows} table rows keyed ({keyed.files} files)")
                moved.scrubbed = moved.scrubbed and keyed.scrubbed
            if not moved.scrubbed:
                print(
                    "im keys: the old plaintext versions could not be dropped yet (the database was kept busy):"
                    " they stay in the database files until the next full checkpoint; run `im keys scrub`"
                    " when traffic is lower",
                    file=sys.stderr,
                )
                return 1
            return 0
        blobs: SealedBlobs | None = None
        if args.op in ("rewrap", "rotate", "retire", "status"):
            built = build_blobs(config, keyring, migrate=False)
            if isinstance(built, EncryptedBlobStorage) or (isinstance(built, S3BlobStorage) and built.sealed):
                blobs = built
                await built.start()
                stack.push_async_callback(built.close)
            await b.file_store.start()
            stack.push_async_callback(b.file_store.close)
        provider = keyring.provider
        if args.op in ("rewrap", "rotate"):
            done = await keys_admin.rewrap_all(keyring, blobs, b.file_store, page=args.batch, progress=say)
            k, f = done.keys, done.blobs
            same = k.checked - k.rewrapped - k.failed
            print(f"im keys: data keys: {k.rewrapped} rewrapped, {same} already current, {k.failed} failed")
            if f is not None:
                print(f"im keys: file keys: {f.rewritten} rewritten, {f.current} already current, {f.failed} failed")
            if k.failed or (f is not None and f.failed):
                print(
                    "im keys: some keys were not rewrapped (see the log); run `im keys rewrap` again", file=sys.stderr
                )
                return 1
            older = provider.key_ids[1:]
            if older:
                print(f"im keys: nothing needs {', '.join(older)} any more: `im keys retire` removes them")
            return 0
        keys_by, blobs_by = await keys_admin.wrapped_by(keyring, blobs, b.file_store)
        if args.op == "status":
            print(f"master key current: {provider.key_id}; also held: {', '.join(provider.key_ids[1:]) or 'none'}")
            for key_id in sorted(set(keys_by) | set(blobs_by)):
                print(f"  {key_id}: {keys_by.get(key_id, 0)} data keys, {blobs_by.get(key_id, 0)} files")
            assert b.bodies is not None
            plain, total = await b.bodies.count_plaintext()
            print(f"message bodies: {total} stored, {plain} in clear")
            conversion = file_id_conversion(config, b)
            if conversion is not None:
                print(f"file ids: {await conversion.store.count_unconverted()} table rows in clear")
            return 0
        # retire
        older = provider.key_ids[1:]
        if not older:
            print("im keys: only the current master key is held: nothing to retire")
            return 0
        busy = keys_admin.blocking(older, keys_by, blobs_by)
        if busy:
            raise _KeysError(
                "refused: still wrapped by an older master key: "
                + "; ".join(f"{k}: {v}" for k, v in busy.items())
                + " (run `im keys rewrap` first)"
            )
        age = time.time() - key_file.stat().st_mtime if not enc.key_env else float("inf")
        if age < enc.key_reload_interval + 5 and not args.force:
            raise _KeysError(
                f"the key file changed {age:.0f} s ago: servers that have not re-read it yet may still wrap new keys "
                f"with an older master key; wait encryption.key_reload_interval ({enc.key_reload_interval:g} s) or "
                "SIGHUP them, run `im keys rewrap`, then retire (--force skips this wait)"
            )
        if enc.key_env:
            print(f"im keys: nothing is wrapped by {', '.join(older)}: set {enc.key_env} to the current key alone")
            return 0
        removed = retire_from_key_file(key_file, set(older))
        print(f"im keys: retired {', '.join(removed)} from {key_file}; back up the file again")
        return 0


STATUS_ROLES = ("api", "gateway", "transfer")


def _status(args: argparse.Namespace, config: Config) -> int:
    """``im status``: every node the registry lists, as a table or JSON; exit 1 when one is not ready."""
    import asyncio
    import time

    from im.compose import build_registry

    if config.registry.kind != "etcd":
        print(
            "im status: reads a cluster's registry: set registry.kind=etcd and registry.etcd_endpoints "
            "(im serve keeps its registry inside its own process)",
            file=sys.stderr,
        )
        return 2

    async def read() -> list[Any]:
        async with build_registry(config, keepalive=False) as registry:
            async with asyncio.timeout(args.timeout):
                return [i for role in STATUS_ROLES for i in await registry.instances(role)]

    try:
        nodes = asyncio.run(read())
    except (TimeoutError, Exception) as exc:
        where = ",".join(config.registry.endpoints())
        print(f"im status: the registry at {where} did not answer ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    now = time.time()
    if args.json:
        rows = [
            {
                "role": n.role,
                "node": n.node,
                "ready": n.ready,
                "version": n.version,
                "load": n.load,
                "started_at": n.started_at or None,
                "addresses": n.addresses,
            }
            for n in nodes
        ]
        print(json.dumps(rows, indent=2))
    elif not nodes:
        print(f"im status: no node is registered under {config.registry.prefix}")
    else:
        table = [("ROLE", "NODE", "READY", "VERSION", "LOAD", "UP", "ADDRESSES")]
        for n in nodes:
            up = _duration(now - n.started_at) if n.started_at else "-"
            addresses = " ".join(f"{k}={v}" for k, v in sorted(n.addresses.items())) or "-"
            row = (n.role, n.node, "yes" if n.ready else "NO", n.version or "-", str(n.load), up, addresses)
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0 if all(n.ready for n in nodes) else 1


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


#: The distributed roles, each a subcommand: its one-line help.
ROLE_HELP = {
    "api": "the HTTP API alone (distributed mode; any number)",
    "gateway": "a WebSocket and TCP gateway node (distributed mode; any number)",
    "transfer": "a transfer node: the message core behind gRPC (distributed mode; any number)",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``im`` command but ``bench``, ``cluster`` and ``config`` (their own: im.bench.cli,
    im.cluster, im.config_cli)."""
    parser = argparse.ArgumentParser(
        prog="im",
        description="im: an instant-messaging server. Each command has its own help: im COMMAND --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_text = "run the HTTP API and the WebSocket and TCP gateways in one process"
    serve = sub.add_parser(
        "serve",
        help=serve_text,
        description=f"{serve_text}, on embedded engines (SQLite, a data directory) unless configured otherwise. "
        "Settings: defaults < a YAML file (-c) < IM_... environment variables < these flags.",
        epilog=EXIT_STATUSES,
    )
    _add_config_flags(serve)
    for role, text in ROLE_HELP.items():
        role_description = (
            f"{text}. Needs store.kind=postgres, presence.kind=redis and registry.kind=etcd, and the same "
            "auth.secret as the other nodes (README, Distributed mode)."
        )
        _add_config_flags(sub.add_parser(role, help=text, description=role_description, epilog=EXIT_STATUSES))
    sub.add_parser("cluster", help="api, two gateways and two transfer nodes on local engines (im cluster --help)")
    sub.add_parser(
        "config",
        help="the effective configuration; get/set/unset/history of the configuration centre (im config --help)",
    )
    status = sub.add_parser(
        "status",
        help="every node of a cluster from its registry (etcd): role, addresses, version, load, readiness",
        description="Reads the registry (registry.etcd_endpoints, registry.prefix: the same configuration "
        "flags as the roles). Exit status 0 when every node listed is ready, 1 when one is not, 2 when the "
        "registry cannot be read.",
    )
    _add_config_flags(status)
    status.add_argument("--json", action="store_true", help="a JSON list instead of the table")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the registry (default 10)")
    _add_certs_parser(sub)
    _add_keys_parser(sub)
    sub.add_parser("bench", help="load generator: throughput, latency, delivery check (see im bench --help)")
    chat = sub.add_parser("chat", help="a terminal chat client (needs a running server)")
    chat.add_argument("--server", default="http://127.0.0.1:8080", help="server URL (default http://127.0.0.1:8080)")
    chat.add_argument("--user", default="", help="user name to fill in on the login screen")
    chat.add_argument("--device", default="im-chat", help="device name, stable per installation (default im-chat)")
    chat.add_argument("--transport", choices=["ws", "tcp"], default="ws", help="gateway transport (default ws)")
    chat.add_argument(
        "--ca-file",
        metavar="PEM",
        help="for an https:// server: trust only the CA(s) in this file instead of the system store",
    )
    chat.add_argument(
        "--insecure-skip-verify",
        action="store_true",
        help="DANGEROUS: accept any TLS certificate (encrypted, but anyone on the path can pose as the server)",
    )
    use_everywhere(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_grpc_defaults()  # before anything imports grpc, which reads them once; children inherit them
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["bench"]:  # its own parser: `im bench --help`, `im bench idle --help`
        from im.bench.cli import main as bench_main

        return bench_main(list(args_list[1:]))
    if args_list[:1] == ["cluster"]:
        from im.cluster import main as cluster_main

        return cluster_main(list(args_list[1:]))
    if args_list[:1] == ["config"]:  # its own parser: show, get, set, unset, history
        from im.config_cli import main as config_main

        return config_main(list(args_list[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "certs":
        return _certs(args)
    if args.command == "chat":
        from im.chat_tui import run

        if args.ca_file and args.insecure_skip_verify:
            parser.error("--ca-file and --insecure-skip-verify contradict each other: give one")
        tls: dict[str, Any] = {}
        if args.ca_file:
            tls["ca_file"] = args.ca_file
        if args.insecure_skip_verify:
            tls["insecure_skip_verify"] = True
        return run(server=args.server, username=args.user, device=args.device, transport=args.transport, **tls)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"im: {exc}", file=sys.stderr)
        return 2
    if args.command in ROLE_HELP:
        return _run_role(args.command, config)
    if args.command == "keys":
        return _keys(args, config)
    if args.command == "status":
        return _status(args, config)
    return _serve(config, lambda: _load(args))


if __name__ == "__main__":
    raise SystemExit(main())
