"""The keyring: one key per conversation that every process agrees on, a bounded cache, and a refusal to
start with another master key than the stored keys were wrapped with."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import pytest

from im.backends.chat.encrypted import EncryptedChatStore
from im.backends.keys import MasterKeyMismatch
from im.backends.keys.env import EnvKeyProvider
from im.backends.keys.file import FileKeyProvider
from im.backends.keys.keyring import Keyring, conv_key_name
from im.model.chat import StoredMessage
from tests.encryption.conftest import Engine, PostgresEngine
from tests.support.postgres import DSN


async def test_another_master_key_is_refused_at_start(engine: Engine) -> None:
    async with engine.keyring() as ring:
        await ring.current([conv_key_name("d:1:2")])
        first_id = ring.provider.key_id
    other = Keyring(EnvKeyProvider(base64.b64encode(b"\x02" * 32).decode()), engine.second()[1])
    with pytest.raises(MasterKeyMismatch, match=f"wrapped by master key {first_id}"):
        await other.start()
    assert not other.started
    await other.close()
    async with engine.keyring() as again:  # the right key still starts
        assert conv_key_name("d:1:2") in await again.current([conv_key_name("d:1:2")])


async def test_an_empty_database_takes_any_master_key(engine: Engine) -> None:
    async with Keyring(EnvKeyProvider(base64.b64encode(b"\x03" * 32).decode()), engine.second()[1]) as ring:
        assert await ring.named_key("blob-names") == await ring.named_key("blob-names")


async def test_named_keys_are_stored_wrapped_and_shared(engine: Engine) -> None:
    async with engine.keyring() as ring:
        key = await ring.named_key("blob-names")
        assert len(key) == 32 and key != await ring.named_key("other-purpose")
    (row,) = (await engine.keys.load_keys(["named:blob-names"]))["named:blob-names"]
    assert key not in row.wrapped
    async with Keyring(FileKeyProvider(engine.key_file), engine.second()[1]) as fresh:
        assert await fresh.named_key("blob-names") == key
        wrapped = await fresh.wrap(b"k" * 32, b"file:abc")
        assert await fresh.unwrap(wrapped, b"file:abc") == b"k" * 32


async def test_concurrent_first_uses_in_one_process_agree(engine: Engine) -> None:
    async with engine.keyring() as ring:
        names = [conv_key_name(f"d:1:{i}") for i in range(30)]
        results = await asyncio.gather(*(ring.current(names) for _ in range(5)))
        for name in names:
            assert len({id(r[name][1]) for r in results}) <= 5
        keys = await engine.keys.load_keys(names)
        assert all(len(v) == 1 for v in keys.values()) and len(keys) == 30
    async with engine.keyring() as again:  # what was used is what is stored
        stored = await again.current(names)
        probe = b"\x00" * 12
        for name in names:
            ct = results[0][name][1].encrypt(probe, b"x", b"")
            assert stored[name][1].decrypt(probe, ct, b"") == b"x"


async def test_the_cache_is_bounded(engine: Engine) -> None:
    async with engine.keyring(cache_size=10) as ring:
        for i in range(50):
            await ring.current([conv_key_name(f"d:1:{i}")])
        assert len(ring._cache) == 10
        assert ring.unwraps == 0
        await ring.current([conv_key_name("d:1:0")])  # evicted: loaded and unwrapped again
        assert ring.unwraps == 1 and len(ring._cache) == 10


async def test_a_second_committer_process_agrees_on_conversation_keys(tmp_path: Path) -> None:
    """Two processes on one PostgreSQL create the first keys of the same 100 conversations at the same
    moment: each seals with the key that was stored, so each opens what the other sealed."""
    engine = PostgresEngine(tmp_path)
    await engine.open()
    try:
        async with engine.keyring():  # creates the key file and checks the empty schema
            pass
        convs = [f"d:{i}:{i + 1}" for i in range(1, 101)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.encryption.peer", DSN, engine.schema.name, str(engine.key_file), *convs,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
        async with EncryptedChatStore(engine.inner, engine.keyring(), owns_keyring=True) as mine:
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            ours = await asyncio.gather(
                *(mine.seal([StoredMessage(c, 1, 1, 1, "d", "c", 1, "text", b'"from the parent"')]) for c in convs)
            )
            theirs = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            opened = await mine.open(
                [StoredMessage(c, 1, 1, 1, "d", "c", 1, "text", bytes.fromhex(theirs[c])) for c in convs]
            )
            assert [m.body for m in opened] == [b'"from the peer"'] * 100
            stored = await engine.keys.load_keys([conv_key_name(c) for c in convs])
            assert len(stored) == 100 and all(len(v) == 1 for v in stored.values())
            async with Keyring(FileKeyProvider(engine.key_file), engine.second()[1]) as fresh:
                check = EncryptedChatStore(engine.second()[0], fresh)
                back = await check.open([s[0] for s in ours])
                assert [m.body for m in back] == [b'"from the parent"'] * 100
    finally:
        await engine.close()
