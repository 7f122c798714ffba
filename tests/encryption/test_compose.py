"""How the composition root builds encryption at rest from the ``encryption`` section."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from im.backends.chat.encrypted import EncryptedChatStore
from im.backends.keys.env import EnvKeyProvider
from im.backends.keys.file import FileKeyProvider
from im.compose import build_backends
from im.compose_security import master_key_provider
from im.config import ConfigError, load_config

KEY = base64.b64encode(b"\x05" * 32).decode()


def test_on_by_default_with_a_key_file_in_the_data_directory(tmp_path: Path) -> None:
    config = load_config(None, {"data_dir": str(tmp_path / "data")})
    assert config.encryption.enabled
    b = build_backends(config)
    assert isinstance(b.chat_store, EncryptedChatStore) and b.chat_store.sealing
    assert b.keyring is not None and b.services()[:2] == [b.keyring, b.chat_store]
    provider = b.keyring.provider
    assert isinstance(provider, FileKeyProvider) and provider.path == tmp_path / "data" / "master.key"
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700


async def test_the_backends_start_create_the_key_and_close(tmp_path: Path) -> None:
    b = build_backends(load_config(None, {"data_dir": str(tmp_path)}))
    await b.start()
    try:
        assert (tmp_path / "master.key").exists() and b.keyring is not None and b.keyring.started
    finally:
        await b.close()
    assert b.keyring.closed


def test_an_existing_open_data_directory_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir(mode=0o755)
    (tmp_path / "data").chmod(0o755)
    build_backends(load_config(None, {"data_dir": str(tmp_path / "data")}))
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700


def test_the_key_from_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(None, {"data_dir": str(tmp_path), "encryption": {"key_env": "IM_TEST_MASTER_KEY"}})
    with pytest.raises(ConfigError, match="IM_TEST_MASTER_KEY, but that environment variable is not set"):
        master_key_provider(config)
    monkeypatch.setenv("IM_TEST_MASTER_KEY", "not a key")
    with pytest.raises(ConfigError, match="IM_TEST_MASTER_KEY: not base64"):
        master_key_provider(config)
    monkeypatch.setenv("IM_TEST_MASTER_KEY", KEY)
    assert isinstance(master_key_provider(config), EnvKeyProvider)


def test_off_reads_with_an_existing_key_and_creates_none(tmp_path: Path) -> None:
    off = load_config(None, {"data_dir": str(tmp_path), "encryption": {"enabled": False}})
    b = build_backends(off)
    assert isinstance(b.chat_store, EncryptedChatStore) and not b.chat_store.sealing and b.keyring is None
    assert not (tmp_path / "master.key").exists()
    (tmp_path / "master.key").write_text(KEY + "\n")
    (tmp_path / "master.key").chmod(0o600)
    b = build_backends(off)
    assert b.keyring is not None and isinstance(b.chat_store, EncryptedChatStore)
    assert not b.chat_store.sealing  # sealed bodies still open
