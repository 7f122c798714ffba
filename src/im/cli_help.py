"""The help formatter of every ``im`` command: each option's default is shown.

argparse's own ``ArgumentDefaultsHelpFormatter`` prints "(default: None)" for options whose default lives
in the configuration, and for on/off flags; this one adds "(default: X)" only where there is a value to
show and the help text does not already name its default.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

__all__ = ["HelpFormatter", "RawHelpFormatter", "parsers", "use_everywhere"]


def _with_default(action: argparse.Action, text: str) -> str:
    default = action.default
    if "default" in text or default is None or default is argparse.SUPPRESS or action.nargs == 0:
        return text
    if default == [] or default == "":
        return text
    if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
        return text
    return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class HelpFormatter(argparse.HelpFormatter):
    """Wrapped descriptions; every option with a default says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return _with_default(action, action.help or "")


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (line breaks and all); every option with a default says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return _with_default(action, action.help or "")


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``parser`` and every subcommand's parser under it, each with its words (``("keys", "rotate")``)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def use_everywhere(parser: argparse.ArgumentParser, formatter: type[argparse.HelpFormatter] = HelpFormatter) -> None:
    """Give ``parser`` and all its subcommands ``formatter`` (subparsers do not inherit it)."""
    for _, p in parsers(parser):
        if p.formatter_class is argparse.HelpFormatter:
            p.formatter_class = formatter
