"""Compile im's hot, fully typed modules (``im.compiled.MODULES``) with mypyc, what mypy and black ship:
the default build, about 30 % fewer instructions per message (README, "Compiled build"). The source stays
the source: each extension goes beside its module, and ``im.compiled`` uses them only while they match it.

    uv run python scripts/compile.py          # build, when the source changed since the last build (~1.5 min)
    uv run python scripts/compile.py --check  # exit 0 when the compiled build matches the source, else 1
    uv run python scripts/compile.py --clean  # remove it: the interpreted build

It builds in a copy of the source, so what it records is what it compiled, and installs the extensions
and their record (``src/im/compiled.json``) last: a process that starts meanwhile runs one build or the
other, never half of each. It needs mypyc (the ``compile`` dependency group: ``uv sync`` installs it), a
C compiler and the Python headers (on Debian: ``apt-get install gcc python3.11-dev``). Without them it
says so and exits 3, and im runs interpreted. Exit 2: mypyc failed (its output is printed).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from im import compiled
from im.compiled import MODULES, ROOT

NAME = "scripts/compile.py"
CANNOT = 3  # exit status: nothing to build with here (the interpreted build runs)


def _module_file(name: str, root: Path) -> Path | None:
    """The source of module or package ``name`` under ``root``; None for a name that is not a module (an
    imported class or function)."""
    for path in (compiled.source_of(name, root), root / name.replace(".", "/") / "__init__.py"):
        if path.exists():
            return path
    return None


def dependencies(root: Path) -> list[str]:
    """The compiled modules and every im module they import, transitively, as paths under ``root``: a
    change in any of them makes the build stale."""
    seen: dict[str, Path] = {}
    todo = list(MODULES)
    while todo:
        name = todo.pop()
        path = None if name in seen else _module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "im":
                todo.append(node.module or "")
                todo.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names if alias.name.startswith("im."))
    return sorted(str(p.relative_to(root)) for p in seen.values())


def missing_tools() -> list[str]:
    """What this machine lacks to compile, each with how to get it."""
    lacks = []
    if importlib.util.find_spec("mypyc") is None:
        lacks.append("mypyc (uv sync --group compile)")
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        lacks.append(f"a C compiler, {cc} (apt-get install gcc)")
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        v = sys.version_info
        lacks.append(f"the Python headers, {include}/Python.h (apt-get install python{v.major}.{v.minor}-dev)")
    return lacks


def installed() -> list[Path]:
    """The compiled build's files in the source tree: every extension beside a module's source (also of a
    module since dropped from the compiled set), mypyc's shared library, the record."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    beside = [p for p in (ROOT / "im").rglob(f"*{suffix}") if p.with_name(p.name.removesuffix(suffix) + ".py").exists()]
    files = sorted(beside) + sorted(ROOT.glob(f"*__mypyc{suffix}"))
    return [p for p in [*files, compiled.RECORD] if p.exists()]


def clean() -> None:
    compiled.RECORD.unlink(missing_ok=True)  # first: without it, nothing compiled is used
    for path in installed():
        path.unlink()


def build() -> int:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with tempfile.TemporaryDirectory(prefix="im-compile-") as tmp:
        work = Path(tmp)
        shutil.copytree(
            ROOT / "im", work / "im", ignore=shutil.ignore_patterns("*.so", "__pycache__", "compiled.json", "web")
        )
        sources = {name: compiled.digest(work / name) for name in dependencies(work)}
        paths = [str(compiled.source_of(m, Path())) for m in MODULES]
        # The copy has no pyproject.toml: the project's one mypy setting that compiling needs, given here.
        mypyc = [sys.executable, "-c", "import sys; from mypyc.__main__ import main; sys.exit(main())"]
        mypyc.append("--ignore-missing-imports")  # grpc ships no types
        done = subprocess.run([*mypyc, *paths], cwd=work, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            print(f"{NAME}: mypyc failed (above); im runs interpreted", file=sys.stderr)
            return 2
        clean()
        for module in MODULES:
            shutil.copy2(compiled.extension_of(module, work), compiled.extension_of(module))
        for lib in work.glob(f"*__mypyc{suffix}"):
            shutil.copy2(lib, ROOT / lib.name)
    partial = compiled.RECORD.with_suffix(".json.tmp")
    partial.write_text(json.dumps(compiled.record(MODULES, sources), indent=1) + "\n")
    os.replace(partial, compiled.RECORD)  # last, and at once: from here on the extensions are used
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 0 when the compiled build matches the source")
    parser.add_argument("--clean", action="store_true", help="remove the compiled build")
    args = parser.parse_args()
    if args.clean:
        clean()
        print(f"{NAME}: removed; im runs interpreted")
        return 0
    state = compiled.check(env=False)  # whether the files match, not what this shell runs
    if args.check or state.kind == "compiled":
        print(f"{NAME}: {state}")
        return 0 if state.kind == "compiled" else 1
    lacks = missing_tools()
    if lacks:
        print(f"{NAME}: cannot compile here, it lacks {'; '.join(lacks)}: im runs interpreted", file=sys.stderr)
        return CANNOT
    print(f"{NAME}: compiling {len(MODULES)} modules with mypyc ({state.why}); about 1.5 min", file=sys.stderr)
    started = time.monotonic()
    status = build()
    if status == 0:
        print(f"{NAME}: compiled in {time.monotonic() - started:.0f} s: {compiled.check(env=False)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
