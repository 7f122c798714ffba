"""Compile im's hot, fully typed modules with mypyc (what mypy and black ship), in place, to measure
what a compiled build would save: each module's extension goes next to its source, and Python imports
the extension before the ``.py`` beside it. A measuring aid, not a build option yet (README,
"Performance"): the pure-Python source stays the source, and ``--clean`` returns to it.

    uv run python benchmarks/mypyc_build.py           # build (needs a C compiler and Python.h)
    uv run python benchmarks/mypyc_build.py --status  # which modules run compiled
    uv run python benchmarks/mypyc_build.py --clean   # remove the extensions: the interpreted build

Measured on 2026-12-06 (benchmarks/pipeline.py under callgrind): 170,000 -> 142,000 instructions per
message with the modules below compiled (-16 %); CPU time about -18 % in alternating runs.

What stands between this and a default build (the full suite, compiled, that day: 26 of 1,878 tests
failed, none of them on a guarantee; after the ``ClassVar`` fix below, the 23 left are the first two
kinds):
- a compiled attribute typed ``Hub`` refuses any other object: the tests' pumps (tests/support/pump.py
  ``PumpHub``) hand connections a stand-in hub that is not a ``Hub``;
- a compiled class cannot be monkeypatched (test_chat_isolation replaces ``Committer._prepare_send``)
  or subclassed from interpreted code unless marked ``mypyc_attr(allow_interpreted_subclasses=True)``,
  as ``Connection`` is (every transport subclasses it);
- a class attribute that interpreted subclasses override must be a ``ClassVar`` (a plain one is read
  from the compiled class: ``Connection.transport_label`` was, and the connection metrics read 0);
- the suite would have to run on both builds within its time budget.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

#: The per-message path (docs/architecture.md, "The path of one message"): the session, the gateway's
#: hub and shared limits, the committer and its routing, the encoded-frame cache.
MODULES = [
    "im/protocol/session.py",
    "im/protocol/messages.py",
    "im/gateway/hub.py",
    "im/gateway/rates.py",
    "im/core/committer.py",
    "im/core/live_routes.py",
]


def built() -> list[Path]:
    """Extensions in the source tree: the modules' own and mypyc's shared runtime library."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    extensions = [SRC / (m.removesuffix(".py") + suffix) for m in MODULES]
    return [p for p in extensions if p.exists()] + sorted(SRC.glob(f"*__mypyc{suffix}"))


def clean() -> None:
    for path in built():
        path.unlink()
    shutil.rmtree(SRC / "build", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean", action="store_true", help="remove the extensions")
    parser.add_argument("--status", action="store_true", help="list the extensions present")
    args = parser.parse_args()
    if args.status:
        for path in built():
            print(path.relative_to(SRC))
        return 0
    clean()
    if args.clean:
        return 0
    mypyc = shutil.which("mypyc", path=str(Path(sys.executable).parent))
    if mypyc is None:
        print("benchmarks/mypyc_build.py: mypyc is missing (it comes with mypy: uv sync)", file=sys.stderr)
        return 1
    done = subprocess.run([mypyc, *MODULES], cwd=SRC, stdout=subprocess.DEVNULL)
    shutil.rmtree(SRC / "build", ignore_errors=True)
    if done.returncode:
        clean()  # never half a build
        print("benchmarks/mypyc_build.py: mypyc failed; the interpreted build stays in use", file=sys.stderr)
        return done.returncode
    print(f"benchmarks/mypyc_build.py: {len(MODULES)} modules compiled; `--clean` removes them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
