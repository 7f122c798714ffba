"""mypyc's class options for the compiled build (im.compiled, scripts/compile.py), importable everywhere.

``mypy_extensions`` comes with mypy, in the ``compile`` dependency group; where it is absent (a runtime
without that group) the build is interpreted and the options mean nothing, so a no-op stands in.
"""

from __future__ import annotations

from typing import Any

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # the interpreted build

    def mypyc_attr(*_args: object, **_kwargs: object) -> Any:  # type: ignore[misc]
        return lambda cls: cls


__all__ = ["mypyc_attr"]
