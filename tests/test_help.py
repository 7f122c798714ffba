"""Every ``im`` command's ``--help``: it exits 0, reads as plain text (no reStructuredText or Markdown
markup), every option has a help text, and every option with a default shows it."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from im import cli, cluster, config_cli
from im.bench import cli as bench_cli
from im.cli_help import parsers

#: Markup that belongs in docstrings, not in a terminal.
MARKUP = ("``", "`", ":class:", ":mod:", ":func:", "**")


def every_parser() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    dispatched = {"cluster", "bench", "config"}  # stubs in im's parser: their own parsers answer
    found = [(w, p) for w, p in parsers(cli.build_parser()) if not w or w[0] not in dispatched]
    found += [(("cluster",), cluster.build_parser())]
    found += [(("config", *words), p) for words, p in parsers(config_cli.parser())]
    found += [(("bench",), bench_cli._parser()), (("bench", "idle"), bench_cli._idle_parser())]
    return found


ALL = every_parser()


def test_every_command_is_covered() -> None:
    words = {w for w, _ in ALL}
    assert {(), ("serve",), ("api",), ("gateway",), ("transfer",), ("cluster",), ("keys", "rotate")} <= words
    assert ("certs", "node") in words and ("bench", "idle") in words and ("status",) in words
    assert ("config", "set") in words
    assert len(words) >= 20


@pytest.mark.parametrize("words", [w for w, _ in ALL], ids=lambda w: " ".join(("im", *w)))
def test_help_exits_0_plain_with_defaults(words: tuple[str, ...]) -> None:
    parser = dict(ALL)[words]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stopped:
        if words[:1] in (("cluster",), ("bench",), ("config",)):  # dispatched before im's own parser
            cli.main([*words, "--help"])
        else:
            parser.parse_args(["--help"])
    assert stopped.value.code == 0
    text = out.getvalue()
    assert text.startswith("usage: im"), text
    assert not [m for m in MARKUP if m in text], text
    assert "(default: None)" not in text and "(default: False)" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"im {' '.join(words)} {name}: no help text"
        has_default = action.default not in (None, False, "", [], argparse.SUPPRESS) and action.nargs != 0
        if has_default:
            assert "default" in (formatter._get_help_string(action) or ""), (
                f"im {' '.join(words)} {name}: default not shown"
            )


def test_the_configuration_flags_show_the_configurations_defaults() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(out.getvalue().split())
    for shown in ("(default: 8080;", "(default: 8081;", "(default: 8082;", "(default: 127.0.0.1;", "(default: info)"):
        assert shown in text
    assert "Exit status: 0 after a clean stop" in text
