"""The :class:`KeyProvider` contract (the master key), on every shipped provider: a key file and an
environment variable. An external KMS provider joins by adding a factory to ``PROVIDERS``."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from im.backends.keys import KeyProvider, KeyUnavailable
from im.backends.keys.env import EnvKeyProvider
from im.backends.keys.file import FileKeyProvider, read_key_file, write_key_file
from tests.contract.lifecycle import check_lifecycle

KEY = base64.b64encode(bytes(range(32))).decode()

Factory = Callable[[Path], KeyProvider]
PROVIDERS = [
    pytest.param(lambda d: FileKeyProvider(d / "keys" / "master.key"), id="file"),
    pytest.param(lambda d: EnvKeyProvider(KEY), id="env"),
]


@pytest.fixture(params=PROVIDERS)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], KeyProvider]:
    factory: Factory = request.param
    return lambda: factory(tmp_path)


async def test_wrap_round_trips_bound_to_its_context(make: Callable[[], KeyProvider]) -> None:
    async with make() as p:
        key = os.urandom(32)
        wrapped = await p.wrap(key, b"im-data-key/conv:d:1:2/1")
        assert key not in wrapped and len(wrapped) < 200
        assert await p.unwrap(wrapped, b"im-data-key/conv:d:1:2/1") == key
        assert await p.wrap(key, b"c") != await p.wrap(key, b"c")  # a fresh nonce each time
        with pytest.raises(KeyUnavailable):
            await p.unwrap(wrapped, b"im-data-key/conv:d:1:3/1")  # moved to another key's row
        altered = bytearray(wrapped)
        altered[-1] ^= 1
        with pytest.raises(KeyUnavailable):
            await p.unwrap(bytes(altered), b"im-data-key/conv:d:1:2/1")
        with pytest.raises(KeyUnavailable):
            await p.unwrap(b"\x07garbage", b"c")
        many = await asyncio.gather(*(p.wrap(bytes([i]) * 32, b"c") for i in range(50)))  # concurrent calls
        assert [await p.unwrap(w, b"c") for w in many] == [bytes([i]) * 32 for i in range(50)]


async def test_key_id_is_stable_for_one_key_and_reveals_nothing(make: Callable[[], KeyProvider]) -> None:
    async with make() as a:
        wrapped = await a.wrap(b"k" * 32, b"c")
        key_id = a.key_id
    async with make() as b:  # the same key, read again (the file is not replaced)
        assert b.key_id == key_id and 0 < len(key_id) <= 64
        assert await b.unwrap(wrapped, b"c") == b"k" * 32
    async with EnvKeyProvider(base64.b64encode(b"\x01" * 32).decode()) as other:
        assert other.key_id != key_id
        with pytest.raises(KeyUnavailable):
            await other.unwrap(wrapped, b"c")


async def test_lifecycle(make: Callable[[], KeyProvider]) -> None:
    await check_lifecycle(make, lambda p: p.wrap(b"k" * 32, b"c"))


# --- the key file ------------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_missing_key_file_is_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "master.key"
    async with FileKeyProvider(path) as p:
        assert p.created
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert len(read_key_file(path)) == 32
    assert [f.name for f in path.parent.iterdir()] == ["master.key"]  # no temporary file left
    async with FileKeyProvider(path) as again:
        assert not again.created and again.key_id == p.key_id


async def test_a_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    assert write_key_file(path, b"a" * 32)
    assert not write_key_file(path, b"b" * 32)
    assert read_key_file(path) == b"a" * 32


async def test_processes_creating_the_key_at_once_agree(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    providers = [FileKeyProvider(path) for _ in range(8)]
    await asyncio.gather(*(asyncio.to_thread(asyncio.run, p.start()) for p in providers))
    assert len({p.key_id for p in providers}) == 1
    assert sum(p.created for p in providers) == 1


async def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, b"a" * 32)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        await FileKeyProvider(path).start()


@pytest.mark.parametrize(
    ("text", "problem"),
    [("not base64!", "not base64"), (base64.b64encode(b"short").decode(), "5 bytes"), ("", "one line")],
)
async def test_a_bad_key_file_is_a_clear_error(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "master.key"
    path.write_text(f"# comment\n{text}\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match=problem):
        await FileKeyProvider(path).start()
    assert text not in str(problem) or not text  # the message names the file, never echoes key material


async def test_without_create_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await FileKeyProvider(tmp_path / "absent.key", create=False).start()
    assert not (tmp_path / "absent.key").exists()


def test_a_bad_environment_value_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="IM_MASTER_KEY: not base64"):
        EnvKeyProvider("%%%")
    with pytest.raises(ValueError, match="MY_KEY: 16 bytes"):
        EnvKeyProvider(base64.b64encode(b"x" * 16).decode(), name="MY_KEY")
