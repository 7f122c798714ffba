"""Which build of im's hot modules runs: compiled (mypyc extensions, made by ``scripts/compile.py``) or
interpreted (the source, always present and always the source of truth).

An extension sits beside its module's source, where Python would import it first. It is used only when
the record the build left, ``compiled.json``, matches the source of every module it was compiled from and
of every im module those import: a stale extension would run old code. Otherwise, or with
``IM_COMPILED=0``, a finder put first on ``sys.meta_path`` imports every im module from its source.
``im/__init__.py`` calls :func:`select` before any of them can be imported.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: The per-message path (docs/architecture.md, "The path of one message"): the session, its frame codec
#: and encoded frames, the WebSocket protocol, the gateway's hub and shared limits, the committer and its
#: routing, message ids, conversation ids, and the log's records and the metrics' counters (whose fields
#: compiled code then reads directly, not by name); in distributed mode, a gateway's pool of transfer
#: links, the link's two ends and its conversions. Not compiled: the TCP framing (its error subclasses a
#: built-in exception, which mypyc does not compile).
MODULES = (
    "im.protocol.session",
    "im.protocol.codec",
    "im.protocol.messages",
    "im.gateway.ws_protocol",
    "im.gateway.hub",
    "im.gateway.rates",
    "im.core.committer",
    "im.core.live_routes",
    "im.core.ids",
    "im.model.ids",
    "im.model.chat",
    "im.observability.metrics",
    "im.transfer.wire",
    "im.transfer.pool",
    "im.transfer.client",
    "im.transfer.server",
)

#: The directory that holds the ``im`` package (``src`` in a checkout).
ROOT = Path(__file__).resolve().parent.parent
RECORD = Path(__file__).with_name("compiled.json")
#: Set to ``0`` to run the source even where a matching compiled build exists (profilers see into it).
ENV = "IM_COMPILED"


@dataclass(frozen=True, slots=True)
class Build:
    """``kind`` is ``compiled`` or ``interpreted``; ``why`` says why a compiled build is not in use."""

    kind: str
    why: str = ""

    def __str__(self) -> str:
        return self.kind + (f" ({self.why})" if self.why else "")


def source_of(module: str, root: Path = ROOT) -> Path:
    return root / (module.replace(".", "/") + ".py")


def extension_of(module: str, root: Path = ROOT) -> Path:
    return root / (module.replace(".", "/") + str(sysconfig.get_config_var("EXT_SUFFIX")))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(modules: Sequence[str], sources: dict[str, str]) -> dict[str, object]:
    """What a build writes to ``compiled.json``: the extensions' modules, the interpreter they are for,
    and the digest of every source they depend on (paths relative to :data:`ROOT`)."""
    return {"abi": sysconfig.get_config_var("EXT_SUFFIX"), "modules": list(modules), "sources": sources}


def check(
    record_path: Path = RECORD, root: Path = ROOT, modules: Sequence[str] = MODULES, *, env: bool = True
) -> Build:
    """Whether the compiled build at ``root`` may run: its record present, of ``modules`` and for this
    interpreter, every extension there, every recorded source unchanged (and, with ``env``, not turned
    off by ``IM_COMPILED=0``)."""
    if env and os.environ.get(ENV, "1") == "0":
        return Build("interpreted", f"{ENV}=0")
    try:
        rec = json.loads(record_path.read_text())
    except FileNotFoundError:
        return Build("interpreted", "not compiled: scripts/compile.py builds it")
    except (OSError, ValueError) as exc:
        return Build("interpreted", f"{record_path.name} unreadable: {exc}")
    if rec.get("modules") != list(modules):
        return Build("interpreted", "the modules to compile changed: scripts/compile.py rebuilds it")
    if rec.get("abi") != sysconfig.get_config_var("EXT_SUFFIX"):
        return Build("interpreted", f"compiled for another Python ({rec.get('abi')})")
    for module in modules:
        if not extension_of(module, root).exists():
            return Build("interpreted", f"the extension of {module} is missing: scripts/compile.py rebuilds it")
    for name, want in rec.get("sources", {}).items():
        path = root / name
        if not path.exists() or digest(path) != want:
            return Build("interpreted", f"{name} changed since it was compiled: scripts/compile.py rebuilds it")
    return Build("compiled")


class SourceFinder(importlib.abc.MetaPathFinder):
    """Imports every module of ``package`` from its ``.py`` file, past any extension beside it (also one
    left from a module compiled earlier and since dropped from :data:`MODULES`)."""

    def __init__(self, package: str = "im", root: Path = ROOT) -> None:
        self.package = package
        self.root = root

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(self.package + "."):
            return None
        source = source_of(fullname, self.root)
        if not source.is_file():
            return None  # a package, or not ours: the usual finders
        return importlib.util.spec_from_file_location(fullname, source)


#: The build this process runs (set by :func:`select`); None until then.
BUILD: Build | None = None


def select() -> Build:
    """Decide once per process, before any compiled module is imported; never imports an extension that
    does not match its source."""
    global BUILD
    if BUILD is None:
        BUILD = check()
        if BUILD.kind != "compiled":
            sys.meta_path.insert(0, SourceFinder())
    return BUILD
