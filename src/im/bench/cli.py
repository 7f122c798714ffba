"""``im bench``: the command line of the load generator.

    im bench [--pairs P | --groups K --group-size G] [--window W | --rate R] [--transport ws|tcp|mixed]
             [--duration S] [--warmup S] [--procs N] [--spawn [--tls] | --server URL [--server-pid PID]
             [--ca-file PEM | --insecure-skip-verify]] [--json FILE] [--png FILE]
    im bench idle --connections K [--transport ws|tcp|mixed] [--procs N] [...]

Exit status: 0 when the run delivered messages with no anomaly (lost, duplicated, out of order, refused,
errors, disconnects), 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from im.cli_help import HelpFormatter, RawHelpFormatter

if TYPE_CHECKING:
    from im.bench.accounts import BenchTls

__all__ = ["main"]

EXAMPLES = """
examples:
  im bench --pairs 10 --window 16 --duration 10 --procs 2           # closed loop over WebSocket
  im bench --pairs 100 --transport tcp --json out.json --png out.png
  im bench --groups 20 --group-size 10 --group-senders 2 --transport mixed
  im bench --pairs 50 --rate 5000                                     # fixed offered rate
  im bench --server http://127.0.0.1:8080 --server-pid $(pgrep -f 'im serve')
  im bench idle --connections 10000 --transport tcp
  im bench --pairs 10 --tls                                           # spawned server with TLS on
  im bench --server https://chat.example.com --ca-file ca.crt
"""


def _pids(text: str) -> list[int]:
    try:
        pids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PID or PID,PID,...: {text!r}") from None
    if not pids:
        raise argparse.ArgumentTypeError("expected at least one pid")
    return pids


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--transport",
        choices=["ws", "tcp", "mixed"],
        default="ws",
        help="client connections: WebSocket, TCP, or half each (default ws)",
    )
    p.add_argument("--encoding", choices=["json", "msgpack"], default="json", help="frame encoding (default json)")
    p.add_argument(
        "--procs",
        type=int,
        default=None,
        help="client processes (default: 2; im bench idle: as many as the open-file limit needs)",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--spawn", action="store_true", help="run python -m im serve in a temporary data directory (the default)"
    )
    target.add_argument("--server", metavar="URL", help="use a running server: its HTTP root, http://host:port")
    p.add_argument(
        "--server-pid",
        type=_pids,
        metavar="PID[,PID...]",
        help="pid of the --server process, to read its CPU and memory; for a cluster (load only), "
        "every server process's pid, comma-separated: their CPU is added up",
    )
    p.add_argument(
        "--server-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the spawned server (as im serve --set)",
    )
    tls = p.add_argument_group("TLS")
    tls.add_argument(
        "--tls",
        action="store_true",
        help="spawn the server with TLS on (https://, wss://, tls://): a private CA and a certificate are made "
        "for the run and the clients trust that CA; compare with a run without it to see what TLS costs",
    )
    tls.add_argument(
        "--ca-file",
        metavar="PEM",
        help="--server over TLS: trust only the CA(s) in this file instead of the system store",
    )
    tls.add_argument(
        "--insecure-skip-verify",
        action="store_true",
        help="DANGEROUS: --server over TLS: accept any certificate (warned once for the run)",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="im bench",
        description="Load generator for im: closed-loop or fixed-rate messaging through a real server, "
        "with throughput, server CPU, latency and a delivery check (lost / duplicated / out of order).",
        epilog=EXAMPLES,
        formatter_class=RawHelpFormatter,
    )
    shape = ap.add_argument_group("users")
    shape.add_argument("--pairs", type=int, default=10, help="1:1 pairs, a sender and a receiver each (default 10)")
    shape.add_argument("--groups", type=int, default=0, help="groups instead of pairs")
    shape.add_argument("--group-size", type=int, default=5, help="members per group (default 5)")
    shape.add_argument("--group-senders", type=int, default=1, help="members of each group who send (default 1)")
    load = ap.add_argument_group("load")
    load.add_argument(
        "--window",
        type=int,
        default=16,
        help="closed loop: messages in flight per sender until every recipient has them (default 16)",
    )
    load.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="fixed offered rate, messages/s in total over all senders (instead of the window)",
    )
    load.add_argument("--body-size", type=int, default=100, help="message body, characters (default 100)")
    load.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    load.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)")
    load.add_argument(
        "--drain", type=float, default=10.0, help="seconds to wait after the load for messages in flight (default 10)"
    )
    _common(ap)
    ap.add_argument("--png", metavar="FILE", help="plot the latency histogram and throughput over time")
    return ap


def _idle_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="im bench idle",
        description="Open K authenticated idle connections and report the server's memory per connection "
        "(RSS from /proc/<pid>/status before and after, divided by K).",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--connections", "-k", type=int, required=True, help="connections to open")
    ap.add_argument(
        "--devices-per-user",
        type=int,
        default=1,
        help="connections per account (each its own device; default 1: one account each)",
    )
    ap.add_argument(
        "--source-addrs",
        type=int,
        default=0,
        help="bind to this many 127.0.0.x source addresses (default: one per 25k connections)",
    )
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each memory reading")
    ap.add_argument("--hold", type=float, default=0.0, help="extra seconds to keep the connections open")
    _common(ap)
    return ap


def _check_pid(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    if args.server_pid is not None and args.server is None:
        ap.error("--server-pid goes with --server (a spawned server's pid is known)")
    if args.tls and args.server is not None:
        ap.error("--tls goes with --spawn (for --server, give its https:// URL and --ca-file)")
    if (args.ca_file or args.insecure_skip_verify) and args.server is None:
        ap.error("--ca-file and --insecure-skip-verify go with --server (--spawn --tls trusts its own CA)")
    if args.ca_file and args.insecure_skip_verify:
        ap.error("--ca-file and --insecure-skip-verify contradict each other: give one")
    if args.insecure_skip_verify:
        print(
            "im bench: WARNING: TLS certificate verification is OFF (--insecure-skip-verify): the connections are "
            "encrypted but anyone on the path can pose as the server",
            file=sys.stderr,
        )


def _tls(args: argparse.Namespace) -> BenchTls:
    from im.bench.accounts import BenchTls

    return BenchTls(ca_file=args.ca_file, insecure_skip_verify=args.insecure_skip_verify)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["idle"]:
        return _idle(argv[1:])
    if argv[:1] == ["load"]:
        argv = argv[1:]
    ap = _parser()
    args = ap.parse_args(argv)
    _check_pid(args, ap)
    if args.groups and args.group_size < 2:
        ap.error("--group-size must be at least 2")
    if args.groups and not 1 <= args.group_senders <= args.group_size:
        ap.error("--group-senders must be between 1 and --group-size")
    if not args.groups and args.pairs < 1:
        ap.error("--pairs must be at least 1")
    if args.rate <= 0 and args.window < 1:
        ap.error("give --window >= 1 or --rate > 0")

    from im.bench.load import LoadOptions, run_load
    from im.bench.report import load_table, write_json, write_png

    opts = LoadOptions(
        pairs=args.pairs,
        groups=args.groups,
        group_size=args.group_size,
        group_senders=args.group_senders,
        window=args.window,
        rate=args.rate,
        transport=args.transport,
        encoding=args.encoding,
        body_size=args.body_size,
        duration=args.duration,
        warmup=args.warmup,
        drain=args.drain,
        procs=args.procs or 2,
        server=args.server,
        server_pids=args.server_pid or [],
        server_settings=args.server_set,
        progress=not args.no_progress,
        tls=_tls(args),
        spawn_tls=args.tls,
    )
    result = run_load(opts)
    load_table(result)
    if args.json:
        write_json(result, args.json)
    if args.png:
        write_png(result, args.png)
    return 0 if result["ok"] else 1


def _idle(argv: list[str]) -> int:
    ap = _idle_parser()
    args = ap.parse_args(argv)
    _check_pid(args, ap)
    if args.connections < 1:
        ap.error("--connections must be at least 1")
    if args.server_pid is not None and len(args.server_pid) > 1:
        ap.error("idle measures one server process: give one --server-pid")

    from im.bench.idle import IdleOptions, run_idle
    from im.bench.report import idle_table, write_json

    opts = IdleOptions(
        connections=args.connections,
        transport=args.transport,
        encoding=args.encoding,
        procs=args.procs or 0,
        devices_per_user=args.devices_per_user,
        source_addrs=args.source_addrs,
        settle=args.settle,
        hold=args.hold,
        server=args.server,
        server_pid=args.server_pid[0] if args.server_pid else None,
        server_settings=args.server_set,
        progress=not args.no_progress,
        tls=_tls(args),
        spawn_tls=args.tls,
    )
    result = run_idle(opts)
    idle_table(result)
    if args.json:
        write_json(result, args.json)
    return 0 if result["ok"] else 1
