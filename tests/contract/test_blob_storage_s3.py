"""What only the S3 blob storage does, on the shared SeaweedFS: multipart uploads above
``single_put_bytes`` and reads in windows (plain and sealed), a store that is down or refuses (one-line
:class:`BlobUnavailable` at start, on put and read; 503 ``unavailable`` from the file service), and the
staging directory left clean. The contract itself runs in test_blob_storage.py."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import obstore
import pytest

from im.backends.blobs import BlobNotFound, BlobUnavailable, Staged
from im.backends.blobs.s3 import S3BlobStorage
from im.backends.files.sqlite import SqliteFileStore
from im.backends.sql.sqlite_db import SqliteDatabase
from im.files import FileService
from im.model.errors import ErrorCode, ImError
from im.procs import free_port
from tests.support.keys import MemoryFileKeys
from tests.support.proxy import TcpProxy
from tests.support.seaweedfs import s3_settings, shared_weed


async def pieces(data: bytes, size: int = 300_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def accept(staged: Staged) -> None:
    return None


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
async def test_large_blob_goes_up_in_parts_and_reads_back_in_windows(tmp_path: Path, sealed: bool) -> None:
    settings = s3_settings(shared_weed())
    storage = S3BlobStorage(
        settings,
        tmp_path / "staging",
        keys=MemoryFileKeys() if sealed else None,
        chunk_bytes=16 * 1024,
        single_put_bytes=1024 * 1024,  # 6 MiB > 1 MiB: multipart, in parts of 5 MiB
        part_bytes=5 * 1024 * 1024,
        read_window_bytes=100_000,
    )
    data = os.urandom(6 * 1024 * 1024 + 123)
    async with storage:
        result, _ = await storage.put(pieces(data), max_bytes=10 * 1024 * 1024, inspect=accept)
        assert (result.sha256, result.size, result.created) == (hashlib.sha256(data).hexdigest(), len(data), True)
        assert list((tmp_path / "staging").iterdir()) == []
        stored = obstore.head(settings.client(), storage.key(result.sha256))
        assert stored["size"] >= len(data) and (stored["size"] == len(data)) != sealed
        got = [c async for c in await storage.open(result.sha256, chunk_size=64 * 1024)]
        assert b"".join(got) == data and max(len(c) for c in got) <= 64 * 1024
        for offset, length in [(99_999, 3), (5 * 1024 * 1024 - 10, 300_000), (len(data) - 5, None)]:
            part = b"".join([c async for c in await storage.open(result.sha256, offset=offset, length=length)])
            assert part == data[offset : None if length is None else offset + length], (offset, length)
        again, _ = await storage.put(pieces(data), max_bytes=10 * 1024 * 1024, inspect=accept)
        assert not again.created


async def test_start_fails_in_one_line_when_the_store_is_wrong(tmp_path: Path) -> None:
    good = s3_settings(shared_weed())
    wrong = {
        "no store there": dataclasses.replace(good, endpoint=f"http://127.0.0.1:{free_port()}", max_retries=0),
        "credentials refused": dataclasses.replace(good, secret_access_key="not-the-secret"),
        "no such bucket": dataclasses.replace(good, bucket="no-such-bucket"),
    }
    for what, settings in wrong.items():
        with pytest.raises(BlobUnavailable) as caught:
            await S3BlobStorage(settings, tmp_path / "staging").start()
        message = str(caught.value)
        assert "cannot list" in message and "\n" not in message, (what, message)


async def test_a_store_that_goes_away_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    """Behind a proxy that is cut: puts and reads raise BlobUnavailable (nothing left staged), the file
    service answers ``unavailable`` (503), and all works again once the store is back."""
    weed = shared_weed()
    proxy = TcpProxy(("127.0.0.1", weed.s3_port)).start()
    settings = dataclasses.replace(
        s3_settings(weed), endpoint=f"http://{proxy.address}", max_retries=0, connect_timeout=1.0
    )
    db = SqliteDatabase(tmp_path / "im.db")
    files = FileService(S3BlobStorage(settings, tmp_path / "staging"), SqliteFileStore(db), max_upload_bytes=10**6)
    try:
        await files.start()
        info, _ = await files.upload(1, pieces(b"stored before the cut"), name="a.txt", declared_type=None)
        proxy.stop()
        with pytest.raises(BlobUnavailable):
            await files.blobs.put(pieces(b"x" * 1000), max_bytes=10**6, inspect=accept)
        with pytest.raises(BlobUnavailable):
            await files.blobs.open(info.meta.sha256)
        with pytest.raises(BlobUnavailable):
            await files.blobs.exists(info.meta.sha256)
        with pytest.raises(ImError) as refused:
            await files.upload(1, pieces(b"new bytes"), name="b.txt", declared_type=None)
        assert refused.value.code == ErrorCode.UNAVAILABLE
        with pytest.raises(ImError) as unreadable:
            await files.read(info)
        assert unreadable.value.code == ErrorCode.UNAVAILABLE
        assert list((tmp_path / "staging").iterdir()) == []
        proxy.start()
        assert b"".join([c async for c in await files.read(info)]) == b"stored before the cut"
        with pytest.raises(BlobNotFound):
            await files.blobs.open("0" * 64)
    finally:
        await files.close()
        proxy.close()
