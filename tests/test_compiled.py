"""Which build runs (im.compiled): a compiled extension only while it matches its source, the source
otherwise; and the build scripts/test.sh made is the one the tests run."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from scripts import compile as compile_script
from scripts.compile import dependencies

from im import compiled

SUFFIX = str(sysconfig.get_config_var("EXT_SUFFIX"))


def test_the_build_the_test_run_asked_for_is_the_one_that_runs() -> None:
    """scripts/test.sh runs the suite compiled (IM_TEST_BUILD=compiled) and part of it again interpreted
    (IM_COMPILED=0, IM_TEST_BUILD=interpreted); a bare pytest run has a build that agrees with the files."""
    wanted = os.environ.get("IM_TEST_BUILD") or compiled.check().kind
    assert compiled.select().kind == wanted, compiled.select()
    for module in compiled.MODULES:
        origin = importlib.import_module(module).__file__ or ""
        assert origin.endswith(SUFFIX if wanted == "compiled" else ".py"), (module, origin)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import im.compiled, im.core.committer as c; print(im.compiled.select().kind, c.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    kind, origin = child.stdout.split()
    assert kind == wanted and origin.endswith(SUFFIX if wanted == "compiled" else ".py"), child.stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A package ``pkg`` with one module, ``pkg.fast``, its (pretend) extension and a matching record."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "fast.py").write_text("VALUE = 'source'\n")
    (tmp_path / "pkg" / "used.py").write_text("LIMIT = 1\n")
    (tmp_path / "pkg" / f"fast{SUFFIX}").write_bytes(b"not a shared object")
    sources = {name: compiled.digest(tmp_path / name) for name in ("pkg/fast.py", "pkg/used.py")}
    (tmp_path / "compiled.json").write_text(json.dumps(compiled.record(["pkg.fast"], sources)))
    return tmp_path


def test_a_build_that_matches_its_sources_is_used(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compiled.ENV, raising=False)
    assert compiled.check(tree / "compiled.json", tree, ["pkg.fast"]) == compiled.Build("compiled")


@pytest.mark.parametrize("change", ["module", "dependency", "extension", "record", "python", "set", "env"])
def test_a_build_that_does_not_match_is_not(tree: Path, change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compiled.ENV, raising=False)
    record = tree / "compiled.json"
    if change == "module":
        (tree / "pkg" / "fast.py").write_text("VALUE = 'edited'\n")
    elif change == "dependency":  # a module the compiled one imports: its constants may be compiled in
        (tree / "pkg" / "used.py").write_text("LIMIT = 2\n")
    elif change == "extension":
        (tree / "pkg" / f"fast{SUFFIX}").unlink()
    elif change == "record":
        record.unlink()
    elif change == "python":
        record.write_text(json.dumps({**json.loads(record.read_text()), "abi": ".cpython-399-x.so"}))
    elif change == "set":  # a module added to the compiled set since
        record.write_text(json.dumps({**json.loads(record.read_text()), "modules": []}))
    else:
        monkeypatch.setenv(compiled.ENV, "0")
    build = compiled.check(record, tree, ["pkg.fast"])
    assert build.kind == "interpreted"
    expected = {
        "module": "pkg/fast.py changed",
        "dependency": "pkg/used.py changed",
        "extension": "extension of pkg.fast is missing",
        "record": "not compiled",
        "python": "another Python",
        "set": "modules to compile changed",
        "env": "IM_COMPILED=0",
    }[change]
    assert expected in build.why


@pytest.fixture
def on_path(tree: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tree))
    yield tree
    sys.path.remove(str(tree))
    for name in [n for n in sys.modules if n == "pkg" or n.startswith("pkg.")]:
        del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, compiled.SourceFinder) and f.package == "pkg")]


def test_the_source_finder_imports_past_the_extension_beside_it(on_path: Path) -> None:
    """Python would import the extension (here a broken one) first; the finder imports the source."""
    with pytest.raises(ImportError):
        importlib.import_module("pkg.fast")
    sys.modules.pop("pkg.fast", None)
    sys.meta_path.insert(0, compiled.SourceFinder("pkg", on_path))
    assert importlib.import_module("pkg.fast").VALUE == "source"


def test_a_build_records_every_im_module_its_modules_import() -> None:
    root = compiled.ROOT
    recorded = dependencies(root)
    assert {str(compiled.source_of(m, root).relative_to(root)) for m in compiled.MODULES} <= set(recorded)
    assert "im/model/chat.py" in recorded  # StoredMessage: the committer and the session import it
    assert "im/protocol/codec.py" in recorded  # imported by the session, not compiled itself
    assert "im/cli.py" not in recorded  # nothing compiled imports the command line


def test_no_compiled_coroutine_awaits_inside_an_except_or_finally_block() -> None:
    """A mypyc-compiled coroutine suspended inside an ``except`` block leaves its exception as the one
    being handled for every other task until it resumes (mypy 2.4.1, checked on 2026-12-06): other tasks'
    exceptions chain to it in their tracebacks, and it stays alive with its frames. The interpreted build
    keeps it to the coroutine. So the compiled modules note a failure in the handler and await after it.
    A ``finally`` is no better: the transfer link's ``_run``, once compiled, ended cancelled after the
    awaits of its ``finally`` had all returned (2026-12-07), so the link never relinked."""
    found = []
    for module in compiled.MODULES:
        path = compiled.source_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            blocks = [h.body for h in node.handlers] + [node.finalbody] if isinstance(node, ast.Try) else []
            found += [
                f"{path.name}:{inner.lineno}"
                for block in blocks
                for statement in block
                for inner in ast.walk(statement)
                if isinstance(inner, ast.Await | ast.AsyncFor | ast.AsyncWith)
            ]
    assert not found, found


def test_without_a_compiler_the_build_says_what_is_missing_and_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What scripts/serve.sh meets on a fresh Debian (no gcc): one line, status 3, nothing removed; it
    then serves the interpreted build."""
    monkeypatch.setattr(compiled, "check", lambda *_a, **_k: compiled.Build("interpreted", "not compiled"))
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    monkeypatch.setattr(sys, "argv", ["scripts/compile.py"])
    before = compile_script.installed()
    assert compile_script.main() == compile_script.CANNOT
    err = capsys.readouterr().err
    assert "cannot compile here" in err and "a C compiler" in err and "im runs interpreted" in err, err
    assert compile_script.installed() == before
