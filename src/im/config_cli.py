"""``im config``: the effective configuration, and the configuration centre of a cluster.

``im config`` (or ``im config show``) prints the configuration this process would start with, secret
masked. ``im config get [KEY]`` shows where a value comes from (default < file < environment < flags,
then the centre for dynamic settings); ``im config set KEY VALUE``, ``im config unset KEY`` and ``im
config history [KEY]`` work on the centre in etcd (registry.etcd_endpoints, registry.prefix, TLS: the
same configuration flags as the roles). Exit status: 0 done, 2 refused (bad key or value, no centre, etcd
unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from im.backends.config import Change, ConfigStore
from im.cli import _add_config_flags, _flags_to_overrides
from im.cli_help import use_everywhere
from im.config import Config, ConfigError, load_config
from im.dynamic import (
    DYNAMIC,
    SECRET,
    SECRET_URLS,
    SettingError,
    check,
    check_key,
    defaults,
    known,
    masked,
    shown,
    value_of,
)

T = TypeVar("T")
LAYERS = ("default", "file", "environment", "flags")
OPS = ("show", "get", "set", "unset", "history")


class _Refused(Exception):
    """A refusal with its exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="im config",
        description="The effective configuration, and the configuration centre (etcd) of a cluster: settings "
        "that change live on every node within a second (docs/operations.md, Configuration centre). Each "
        "command takes the configuration flags of the roles, to find etcd.",
    )
    ops = p.add_subparsers(dest="op")
    show = ops.add_parser("show", help="the configuration a process would start with (secret masked); the default")
    get = ops.add_parser(
        "get",
        help="where a value comes from: default < file < environment < flags, then etcd for dynamic settings",
        description="Without KEY: every dynamic setting. With KEY: every layer of that setting.",
    )
    get.add_argument("key", nargs="?", help="a setting, e.g. limits.send_rate")
    get.add_argument("--json", action="store_true", help="JSON instead of text")
    set_ = ops.add_parser("set", help="store a dynamic setting in the centre: every node applies it live")
    set_.add_argument("key", help="a dynamic setting (im config get lists them)")
    set_.add_argument("value", help="its value, as --set KEY=VALUE takes it (a rate: LIMIT/PERIOD, e.g. 20/60)")
    unset = ops.add_parser("unset", help="remove a setting from the centre: nodes go back to their own value")
    unset.add_argument("key", help="a setting stored in the centre")
    for q in (set_, unset):
        q.add_argument("--by", help="who makes the change, for the history (default: user@host)")
    history = ops.add_parser("history", help="who changed what and when (newest last)")
    history.add_argument("key", nargs="?", help="only this setting")
    history.add_argument("--json", action="store_true", help="JSON instead of text")
    for q in (show, get, set_, unset, history):
        _add_config_flags(q)
        q.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for etcd (default 10)")
    use_everywhere(p)
    return p


def main(argv: list[str]) -> int:
    if not argv or (argv[0] not in OPS and argv[0] not in ("-h", "--help")):
        argv = ["show", *argv]  # `im config [flags]`: the configuration, as before
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config, _flags_to_overrides(args))
    except ConfigError as exc:
        print(f"im config: {exc}", file=sys.stderr)
        return 2
    try:
        if args.op == "show":
            shown_config = config.model_dump(mode="json")
            for key in SECRET | SECRET_URLS:
                section, field = key.rsplit(".", 1)
                node = shown_config
                for part in section.split("."):
                    node = node[part]
                node[field] = masked(key, node[field])
            print(json.dumps(shown_config, indent=2))
            return 0
        if args.op == "get":
            return _get(args, config)
        if args.op in ("set", "unset"):
            return _change(args, config)
        return _history(args, config)
    except _Refused as exc:
        print(f"im config {args.op}: {exc}", file=sys.stderr)
        return exc.code


# --- the centre -------------------------------------------------------------------------------------------


def _centre_call(config: Config, timeout: float, call: Callable[[ConfigStore], Awaitable[T]]) -> T:
    """Run ``call`` on the centre of ``config``'s etcd; a clear refusal when there is none or it is away."""
    if config.registry.kind != "etcd":
        raise _Refused(
            "the configuration centre lives in etcd: set registry.kind=etcd and registry.etcd_endpoints (im serve "
            "on its in-memory registry reads its file instead, and re-reads it on SIGHUP)"
        )

    from im.compose import build_centre, build_registry  # the engines' modules: only when etcd is needed

    async def run() -> T:
        async with build_registry(config, keepalive=False) as registry:
            store = build_centre(config, registry)
            assert store is not None
            async with store, asyncio.timeout(timeout):
                return await call(store)

    try:
        return asyncio.run(run())
    except (TimeoutError, Exception) as exc:
        if isinstance(exc, _Refused):
            raise
        where = ",".join(config.registry.endpoints())
        raise _Refused(f"etcd at {where} did not answer ({type(exc).__name__}: {exc})") from None


def _by(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _change(args: argparse.Namespace, config: Config) -> int:
    key: str = args.key
    try:
        if args.op == "set":
            value = check(config, key, args.value)
        else:
            check_key(key)
    except SettingError as exc:
        raise _Refused(f"refused: {exc}") from None
    by = _by(args)
    if args.op == "set":
        change: Change | None = _centre_call(config, args.timeout, lambda s: s.set(key, args.value, by=by))
        assert change is not None
        print(f"{key} = {shown(value)} in the centre (was {change.old if change.old is not None else 'not set'})")
        print(f"every node applies it within a second: {DYNAMIC[key].applies}")
        return 0
    change = _centre_call(config, args.timeout, lambda s: s.unset(key, by=by))
    if change is None:
        print(f"{key} was not set in the centre: nothing changed")
    else:
        print(f"{key} removed from the centre (was {change.old}): nodes go back to their own configuration")
    return 0


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _history(args: argparse.Namespace, config: Config) -> int:
    key: str | None = args.key
    if key is not None and not known(key):
        raise _Refused(f"{key}: no such setting")
    changes = _centre_call(config, args.timeout, lambda s: s.history(key))
    if args.json:
        rows = [{"key": c.key, "old": c.old, "new": c.new, "by": c.by, "at": c.at} for c in changes]
        print(json.dumps(rows, indent=2))
        return 0
    if not changes:
        print("no change recorded" + (f" for {key}" if key else ""))
    for c in changes:
        old = "(not set)" if c.old is None else c.old
        new = "(unset)" if c.new is None else c.new
        print(f"{_when(c.at)}  {c.by}  {c.key}: {old} -> {new}")
    return 0


# --- get: every layer of a value ---------------------------------------------------------------------------


def _layers(args: argparse.Namespace, config: Config, key: str) -> dict[str, Any]:
    """The value ``key`` has in each layer that sets it (``default`` always)."""
    out: dict[str, Any] = {"default": value_of(defaults(), key)}
    parts = key.split(".")
    file_values: Any = {}
    if args.config is not None:
        try:
            file_values = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError):
            file_values = {}
    node = file_values
    for part in parts:
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    env_name = "IM_" + "__".join(parts).upper()
    env = {k.upper(): v for k, v in os.environ.items()}
    node_flags: Any = _flags_to_overrides(args)
    for part in parts:
        node_flags = node_flags.get(part, _MISSING) if isinstance(node_flags, dict) else _MISSING
    # The value each layer gives is the effective one when it is the top layer: read from ``config``.
    effective = value_of(config, key)
    if node is not _MISSING:
        out["file"] = node
    if env_name in env:
        out["environment"] = env[env_name]
    if node_flags is not _MISSING:
        out["flags"] = node_flags
    top = [layer for layer in LAYERS if layer in out][-1]
    out[top] = effective
    return out


_MISSING: Any = object()


def _get(args: argparse.Namespace, config: Config) -> int:
    key: str | None = args.key
    if key is not None and not known(key):
        raise _Refused(f"{key}: no such setting")
    keys = [key] if key is not None else list(DYNAMIC)
    centre: dict[str, str] = {}
    note = ""
    if config.registry.kind == "etcd":
        centre = _centre_call(config, args.timeout, lambda s: s.values())
    else:
        note = "no configuration centre (registry.kind is not etcd): the configured values apply"
    rows: dict[str, dict[str, Any]] = {}
    for k in keys:
        layers = _layers(args, config, k)
        if k in SECRET or k in SECRET_URLS:
            layers = {n: masked(k, v) for n, v in layers.items()}
        source = [layer for layer in LAYERS if layer in layers][-1]
        value = layers[source]
        row: dict[str, Any] = {"dynamic": k in DYNAMIC, "layers": {n: shown(v) for n, v in layers.items()}}
        if k in DYNAMIC and k in centre:
            row["layers"]["etcd"] = centre[k]
            try:
                value, source = check(config, k, centre[k]), "etcd"
            except SettingError as exc:
                row["etcd_refused"] = str(exc)
        row["value"], row["source"] = shown(value), source
        rows[k] = row
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("precedence: default < file < environment < flags, then etcd (dynamic settings only)")
    if note:
        print(note)
    if key is None:
        width = max(len(k) for k in rows)
        for k, row in rows.items():
            print(f"{k.ljust(width)}  {row['value']:<14} from {row['source']}")
        return 0
    row = rows[key]
    print(f"{key} = {row['value']}   (from {row['source']})")
    for layer in (*LAYERS, "etcd"):
        if layer in row["layers"]:
            print(f"  {layer:<12} {row['layers'][layer]}")
    if "etcd_refused" in row:
        print(f"  the centre's value is invalid and ignored by every node: {row['etcd_refused']}")
    if key in DYNAMIC:
        print(f"dynamic: {DYNAMIC[key].applies}")
    else:
        print("read at start: a change needs a restart (im config set refuses it)")
    return 0
