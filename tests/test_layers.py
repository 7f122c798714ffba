"""The package dependency graph points one way (docs/architecture.md, "Layering").

Every ``from im.… import …`` in ``src/im`` is checked against the table below: a module may import its own
unit and the units its unit is allowed to; anything else is an arrow pointing back up (or sideways) and
fails here with the file and line. Backends are split in two: a backend package (``im.backends.chat``) is
the interface, its submodules (``im.backends.chat.sqlite``) are implementations, and only the
composition root may name an implementation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "im"

MODEL = {"model"}
INTERFACES = {"backends"}  # any backend package itself (its interface), never its implementations
LEAF_UTILS = {"throttled_log", "net", "config", "cli_help", "cancel", "mypyc_options"}
#: Metrics, tracing, logs and health: used by every layer, importing only leaves.
OBS = {"observability"}

#: unit -> the units it may import (besides itself). "backends" means backend interfaces only;
#: "backends.impl" means implementations too.
ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "throttled_log": set(),
    "cancel": set(),  # honouring a cancellation a library lost
    "mypyc_options": set(),  # mypyc's class options, a no-op in the interpreted build
    "net": set(),
    "config": set(),
    "cli_help": set(),
    "dynamic": {"config"},  # the table of settings that change live
    "certs": set(),
    "tls": set(),
    "grpc_runtime": set(),  # gRPC's process-wide settings, set before grpc is imported
    "procs": set(),  # child processes of im's tools: a free port, a stop that leaves nothing behind
    "seaweedfs": {"procs"},  # the private object store of `im cluster --s3` and the tests
    "observability": MODEL | {"config", "throttled_log"},
    "protocol": MODEL | OBS,  # the server session counts deliveries and refusals (plain ints)
    "backends": MODEL | OBS | {"backends", "backends.impl", "cancel"},  # adapters share the SQL helpers
    "core": MODEL | INTERFACES | OBS | {"throttled_log", "mypyc_options"},
    "files": MODEL | INTERFACES | OBS | {"throttled_log"},
    "events": MODEL | INTERFACES | OBS | {"throttled_log", "cancel"},
    "gateway": MODEL | INTERFACES | OBS | {"protocol", "core", "net", "throttled_log", "cancel", "mypyc_options"},
    "api": MODEL | INTERFACES | OBS | {"protocol", "core", "files", "net", "throttled_log", "config"},
    # The gRPC-linked routers are Router implementations: LinkRouter extends the in-process MemoryRouter.
    "transfer": MODEL | INTERFACES | OBS | {"protocol", "core", "backends.impl", "throttled_log", "mypyc_options"},
    "client": MODEL | {"protocol"},
    "chat_tui": MODEL | {"protocol", "client"},
    "bench": MODEL | {"protocol", "client", "certs", "cli_help"},  # --spawn --tls makes its CA with im.certs
}
#: The composition root and entry points: they may import anything.
ROOTS = {
    "server",
    "roles",
    "cluster",
    "cli",
    "__main__",
    "compose",
    "compose_security",
    "startup",
    "lifecycle",
    "im",
    "live_config",
    "config_cli",
}


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "im"
    if parts[1] == "backends" and len(parts) >= 4:
        return "backends.impl"  # im.backends.<concern>.<engine>
    return parts[1]


def _imports() -> list[tuple[str, int, str, str]]:
    """(file, line, importing module, imported module) for every im import under src/im."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        module = ".".join(("im", *rel.parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("im."):
                names = [f"{node.module}.{a.name}" for a in node.names]
                # `from im.backends.chat import sqlite` names an implementation module
                targets = [n for n in names if (SRC / Path(*n.split(".")[1:])).with_suffix(".py").exists()]
                for target in targets or [node.module]:
                    out.append((str(path.relative_to(SRC)), node.lineno, module, target))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("im."):
                        out.append((str(path.relative_to(SRC)), node.lineno, module, alias.name))
    return out


def test_every_unit_has_a_place_in_the_table() -> None:
    units = {_unit(m) for _, _, m, _ in _imports()} | {_unit(t) for _, _, _, t in _imports()}
    unknown = units - set(ALLOWED) - ROOTS - {"backends.impl"}
    assert not unknown, f"units missing from the layering table: {sorted(unknown)}"


def test_no_import_points_against_the_layers() -> None:
    wrong = []
    for file, line, module, target in _imports():
        src, dst = _unit(module), _unit(target)
        if src in ROOTS:
            continue
        src_key = "backends" if src == "backends.impl" else src
        if dst == src_key or (src == "backends.impl" and dst == "backends.impl"):
            continue
        if dst in ROOTS or dst not in ALLOWED[src_key]:
            wrong.append(f"{file}:{line}: {module} imports {target} ({src} -> {dst})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


@pytest.mark.parametrize("unit", ["model", "throttled_log", "net", "config", "cli_help", "certs", "tls", "procs"])
def test_leaves_import_nothing_of_im(unit: str) -> None:
    assert not [t for _, _, m, t in _imports() if _unit(m) == unit and _unit(t) != unit]
