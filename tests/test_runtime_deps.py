"""The server runs without the dev tools: ``uv sync --no-dev`` (scripts/serve.sh) installs only
``[project].dependencies``, so no module under src/im may import a package that only the ``dev`` group
brings (pytest, playwright, mypy, ...). An optional extra (``bench``: matplotlib) may be imported only
inside the function that needs it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "im"


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _group(project: dict[str, Any], name: str) -> list[str]:
    """A dependency group's requirements, with the groups it includes (``{include-group = ...}``)."""
    out: list[str] = []
    for entry in project["dependency-groups"][name]:
        out += _group(project, entry["include-group"]) if isinstance(entry, dict) else [entry]
    return out


def _imports_by_distribution() -> dict[str, set[str]]:
    """distribution name -> the top-level import names it installs."""
    out: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            out.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    return out


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, top-level module, at module level) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body} | {
        id(inner)
        for node in tree.body
        if isinstance(node, ast.If | ast.Try)
        for inner in ast.walk(node)
        if isinstance(inner, ast.Import | ast.ImportFrom)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0], id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0], id(node) in top_level))
    return found


def test_the_server_imports_no_dev_only_package() -> None:
    project = _project()
    runtime = {_name(r) for r in project["project"]["dependencies"]}
    extras = {_name(r) for reqs in project["project"]["optional-dependencies"].values() for r in reqs}
    dev = {_name(r) for r in _group(project, "dev")} - runtime
    modules = _imports_by_distribution()
    dev_modules = {m: d for d in dev for m in modules.get(d, ())}
    extra_modules = {m for d in extras - runtime for m in modules.get(d, ())}
    assert {"pytest", "playwright", "mypy"} <= set(dev_modules), "the dev group is not installed here"
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        for line, module, at_module_level in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}: {module}"
            if module in extra_modules:
                if at_module_level:
                    wrong.append(f"{where} (an optional extra: import it where it is used)")
            elif module in dev_modules:
                wrong.append(f"{where} (only in the dev group: {dev_modules[module]})")
    assert not wrong, "\n".join(wrong)
