"""``im keys`` without a server: its refusals and the environment-variable form of a rotation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from im.backends.chat.sqlite import SqliteConversationKeys
from im.backends.keys.aes import decode_master_key, encode_master_key, master_key_id, new_master_key
from im.backends.keys.env import EnvKeyProvider
from im.backends.keys.file import FileKeyProvider, read_key_file_all
from im.backends.keys.keyring import Keyring, conv_key_name
from im.backends.sql.sqlite_db import SqliteDatabase
from im.cli import main


def _make_keys(data: Path, convs: list[str], provider: FileKeyProvider | EnvKeyProvider) -> None:
    """Conversation keys as a server writing the first messages of ``convs`` makes them."""

    async def run() -> None:
        async with Keyring(provider, SqliteConversationKeys(SqliteDatabase(data / "im.sqlite3"))) as ring:
            await ring.current([conv_key_name(c) for c in convs])

    asyncio.run(run())


def test_new_key_prints_a_master_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new-key"]) == 0
    assert len(decode_master_key(capsys.readouterr().out, source="out")) == 32


def test_commands_need_a_master_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "rotate", "--data-dir", str(tmp_path / "nothing")]) == 2
    assert "no master key file" in capsys.readouterr().err
    assert not (tmp_path / "nothing" / "master.key").exists()


def test_rotate_status_retire_on_an_empty_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert main(["keys", "status", *data]) == 2  # no key file yet: nothing was ever encrypted here
    capsys.readouterr()
    assert (
        main(["keys", "rotate-conversation", "d:1:2", *data, "--set", "encryption.key_file=" + str(tmp_path / "k")])
        == 2
    )
    capsys.readouterr()
    (tmp_path / "master.key").write_text(encode_master_key(new_master_key()) + "\n")
    (tmp_path / "master.key").chmod(0o600)
    old = master_key_id(read_key_file_all(tmp_path / "master.key")[0])
    assert main(["keys", "rotate", *data]) == 0
    out = capsys.readouterr().out
    new = master_key_id(read_key_file_all(tmp_path / "master.key")[0])
    assert f"new master key {new} is current" in out and f"kept older: {old}" in out
    assert main(["keys", "retire", *data]) == 1  # just changed: running servers may not have re-read it
    assert "changed" in capsys.readouterr().err
    assert main(["keys", "rotate-conversation", "d:1:2", *data]) == 1
    assert "has no key" in capsys.readouterr().err
    _make_keys(tmp_path, ["d:1:2"], FileKeyProvider(tmp_path / "master.key"))
    assert main(["keys", "rotate-conversation", "d:1:2", *data]) == 0
    assert "version 2" in capsys.readouterr().out
    assert main(["keys", "status", *data]) == 0
    out = capsys.readouterr().out
    assert f"current: {new}; also held: {old}" in out and f"{new}: 4 data keys" in out, (
        out
    )  # d:1:2 versions 1 and 2, blob-names, file-ids
    assert "file ids: 0 table rows in clear" in out
    assert main(["keys", "retire", "--force", *data]) == 0
    assert [master_key_id(k) for k in read_key_file_all(tmp_path / "master.key")] == [new]
    assert main(["keys", "retire", "--force", *data]) == 0
    assert "nothing to retire" in capsys.readouterr().out


def test_a_rotation_through_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path), "--set", "encryption.key_env=IM_TEST_KEYS"]
    old, new = encode_master_key(new_master_key()), encode_master_key(new_master_key())
    monkeypatch.setenv("IM_TEST_KEYS", old)
    (tmp_path).mkdir(exist_ok=True)
    _make_keys(tmp_path, ["g:1"], EnvKeyProvider(old))
    assert main(["keys", "rotate-conversation", "g:1", *data]) == 0
    assert main(["keys", "rotate", *data]) == 2
    assert "IM_TEST_KEYS=NEW,OLD" in capsys.readouterr().err
    monkeypatch.setenv("IM_TEST_KEYS", f"{new},{old}")
    assert main(["keys", "retire", *data]) == 1  # the data keys are still wrapped by OLD
    assert "still wrapped by an older master key" in capsys.readouterr().err
    assert main(["keys", "rewrap", *data]) == 0
    out = capsys.readouterr().out
    assert "data keys: 2 rewrapped, 2 already current" in out  # g:1 v1, v2; blob-names and file-ids new
    assert main(["keys", "retire", *data]) == 0
    assert "set IM_TEST_KEYS to the current key alone" in capsys.readouterr().out
    monkeypatch.setenv("IM_TEST_KEYS", new)
    assert main(["keys", "status", *data]) == 0
