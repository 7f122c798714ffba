"""``im chat`` is wired into the ``im`` command (the app itself is tested through Pilot in test_app.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from im import cli


def test_chat_subcommand_is_listed_with_its_options() -> None:
    done = subprocess.run([sys.executable, "-m", "im", "chat", "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for flag in ("--server", "--user", "--device", "--transport"):
        assert flag in done.stdout


def test_chat_subcommand_passes_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_run(**kwargs: object) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr("im.chat_tui.run", fake_run)
    argv = ["chat", "--server", "http://h:1", "--user", "bob", "--device", "d1", "--transport", "tcp"]
    assert cli.main(argv) == 0
    assert seen == {"server": "http://h:1", "username": "bob", "device": "d1", "transport": "tcp"}


def test_chat_subcommand_refuses_an_unknown_transport() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["chat", "--transport", "carrier-pigeon"])
    assert exc.value.code == 2
