"""``files.encrypt`` in the composition root: sealed with the keyring, as before when off; on by default
when message encryption is."""

from __future__ import annotations

from pathlib import Path

import pytest

from im.backends.blobs.encrypted import EncryptedBlobStorage
from im.backends.blobs.local import LocalBlobStorage
from im.compose import build_blobs
from im.config import Config, ConfigError
from tests.support.keys import MemoryFileKeys


def config(tmp_path: Path, **files: object) -> Config:
    return Config.model_validate({"data_dir": str(tmp_path), "files": files})


def test_sealed_by_default_when_a_keyring_is_given(tmp_path: Path) -> None:
    blobs = build_blobs(config(tmp_path, encrypt_chunk_bytes=8192), MemoryFileKeys())
    assert isinstance(blobs, EncryptedBlobStorage) and blobs.root == tmp_path / "files"


def test_off_means_plain_files(tmp_path: Path) -> None:
    assert type(build_blobs(config(tmp_path, encrypt=False), MemoryFileKeys())) is LocalBlobStorage


def test_on_without_a_keyring_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="master key"):
        build_blobs(config(tmp_path, encrypt=True), None)


def test_the_default_follows_message_encryption(tmp_path: Path) -> None:
    off = Config.model_validate({"data_dir": str(tmp_path), "encryption": {"enabled": False}})
    assert type(build_blobs(off, None)) is LocalBlobStorage
    assert isinstance(build_blobs(config(tmp_path), MemoryFileKeys()), EncryptedBlobStorage)


def test_chunk_size_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="encrypt_chunk_bytes"):
        config(tmp_path, encrypt_chunk_bytes=100)


def test_s3_storage_is_sealed_with_the_keyring_too(tmp_path: Path) -> None:
    from im.backends.blobs.s3 import S3BlobStorage

    s3 = {"storage": "s3", "s3": {"bucket": "im-files", "staging_dir": str(tmp_path / "stage")}}
    sealed = build_blobs(config(tmp_path, **s3), MemoryFileKeys())
    assert isinstance(sealed, S3BlobStorage) and sealed.sealed
    plain = build_blobs(config(tmp_path, encrypt=False, **s3), MemoryFileKeys())
    assert isinstance(plain, S3BlobStorage) and not plain.sealed
    with pytest.raises(ConfigError, match="master key"):
        build_blobs(config(tmp_path, encrypt=True, **s3), None)
