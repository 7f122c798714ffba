"""FileService on SQLite and local blobs: uploads, dedupe, and the read rule (uploader, or current member
of a conversation the file was sent in, through ``file_refs`` written by the chat store's commit)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from im.backends.blobs import BlobCorrupt, BlobStorage
from im.backends.blobs.encrypted import EncryptedBlobStorage
from im.backends.blobs.local import LocalBlobStorage
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.files.sqlite import SqliteFileStore
from im.backends.sql.sqlite_db import SqliteDatabase
from im.files import FileService
from im.files.service import clean_name
from im.model.chat import CommitBatch, ConversationState, MemberChange, StoredMessage
from im.model.errors import ErrorCode, ImError
from im.model.ids import direct_conv
from tests.support.keys import MemoryFileKeys

ALICE, BOB, CAROL = 1, 2, 3


async def stream(data: bytes, piece: int = 7_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


def png(size: tuple[int, int] = (16, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "green").save(buf, "PNG")
    return buf.getvalue()


@dataclass
class World:
    files: FileService
    chat: SqliteChatStore
    root: Path

    async def upload(self, uid: int, data: bytes, name: str = "f.bin", declared: str | None = None) -> str:
        info, _ = await self.files.upload(uid, stream(data), name=name, declared_type=declared)
        return info.meta.file_id

    async def send_file(self, conv: str, sender: int, file_id: str, members: dict[int, str] | None = None) -> None:
        """Commit a file message the way the chat core does: the message and its file_refs row together."""
        states = await self.chat.load_conversations([conv])
        head = states[conv].last_seq if conv in states else 0
        message = StoredMessage(
            conv=conv,
            seq=head + 1,
            mid=head + 1000 * sender,
            sender=sender,
            device="d",
            cmid=f"{conv}-{head}",
            ts=1,
            type="file",
            body=b'{"file_id":"%s"}' % file_id.encode(),
        )
        await self.chat.commit(
            CommitBatch(
                messages=[message],
                heads={conv: (head, head + 1, 1)},
                new_conversations=[ConversationState(conv, "group", 0, members)] if members else [],
                file_refs=[(file_id, conv)],
            )
        )

    def blobs(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file() and p.parent.name != "tmp"]


@pytest.fixture(params=["local", "encrypted"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    db = SqliteDatabase(tmp_path / "im.db")
    chat = SqliteChatStore(db)
    await chat.start()
    root = tmp_path / "files"
    blobs: BlobStorage = (
        LocalBlobStorage(root)
        if request.param == "local"
        else EncryptedBlobStorage(root, MemoryFileKeys(), chunk_bytes=4096)
    )
    files = FileService(blobs, SqliteFileStore(db), max_upload_bytes=100_000, clock=lambda: 1234.5)
    await files.start()
    yield World(files, chat, root)
    await files.close()
    await chat.close()


async def test_upload_returns_sniffed_metadata(world: World) -> None:
    data = png()
    info, new = await world.files.upload(ALICE, stream(data), name="dir/cat.png", declared_type="image/png")
    sha = hashlib.sha256(data).hexdigest()
    assert new
    assert info.meta.file_id == info.meta.sha256 == sha
    meta = info.meta
    assert (meta.size, meta.content_type, meta.width, meta.height) == (len(data), "image/png", 16, 9)
    assert info.meta.created_at == 1_234_500
    assert info.name == "cat.png"


async def test_same_bytes_from_two_users_one_file_one_blob(world: World) -> None:
    data = b"shared bytes " * 500
    a, a_new = await world.files.upload(ALICE, stream(data), name="a.txt", declared_type=None)
    b, b_new = await world.files.upload(BOB, stream(data, 333), name="b.txt", declared_type="text/plain")
    again, again_new = await world.files.upload(BOB, stream(data), name="renamed.txt", declared_type=None)
    assert a.meta == b.meta == again.meta
    assert (a_new, b_new, again_new) == (True, True, False)  # new per uploader; others' uploads not revealed
    assert (a.name, b.name, again.name) == ("a.txt", "b.txt", "b.txt")  # the first name an uploader gave
    assert len(world.blobs()) == 1
    assert (await world.files.info(ALICE, a.meta.file_id)).name == "a.txt"
    assert (await world.files.info(BOB, a.meta.file_id)).name == "b.txt"


async def test_refused_uploads_leave_nothing(world: World) -> None:
    for data, declared, code in [
        (b"x" * 100_001, None, ErrorCode.TOO_LARGE),
        (b"not an image", "image/png", ErrorCode.INVALID),
        (b"", None, ErrorCode.INVALID),
    ]:
        with pytest.raises(ImError) as err:
            await world.files.upload(ALICE, stream(data), name="x", declared_type=declared)
        assert err.value.code == code
    assert world.blobs() == []
    assert list((world.root / "tmp").iterdir()) == []
    assert not await world.files.can_read(ALICE, hashlib.sha256(b"not an image").hexdigest())


async def test_uploader_reads_stranger_does_not(world: World) -> None:
    fid = await world.upload(ALICE, b"alice's secret")
    assert await world.files.can_read(ALICE, fid)
    assert await world.files.can_attach(ALICE, fid)
    assert not await world.files.can_read(BOB, fid)
    assert not await world.files.can_attach(BOB, fid)
    for call in (world.files.info, world.files.by_hash):
        with pytest.raises(ImError) as err:
            await call(BOB, fid)
        assert err.value.code == ErrorCode.NOT_FOUND
    # unknown and malformed ids get the very same answer
    for bad in ("0" * 64, "../../etc/passwd", "", fid.upper()[:10]):
        with pytest.raises(ImError) as err:
            await world.files.info(ALICE, bad)
        assert err.value.code == ErrorCode.NOT_FOUND
    assert (await world.files.by_hash(ALICE, fid.upper())).meta.file_id == fid


async def test_stranger_gains_access_only_by_uploading_the_bytes(world: World) -> None:
    data = b"bob will prove he has this"
    fid = await world.upload(ALICE, data)
    assert not await world.files.can_read(BOB, fid)
    assert await world.upload(BOB, data) == fid
    assert await world.files.can_read(BOB, fid)


async def test_members_of_a_conversation_it_was_sent_in_may_read(world: World) -> None:
    fid = await world.upload(ALICE, b"holiday photo")
    conv = direct_conv(ALICE, BOB)
    assert not await world.files.can_read(BOB, fid)
    await world.send_file(conv, ALICE, fid, members={ALICE: "member", BOB: "member"})
    assert await world.files.can_read(BOB, fid)
    assert await world.files.can_attach(BOB, fid)  # may forward it
    info = await world.files.info(BOB, fid)
    assert info.name is None  # Bob did not upload it
    assert not await world.files.can_read(CAROL, fid)


async def test_leaving_the_conversation_takes_access_away(world: World) -> None:
    fid = await world.upload(ALICE, b"group file")
    conv = "g:1"
    await world.send_file(conv, ALICE, fid, members={ALICE: "owner", BOB: "member", CAROL: "member"})
    assert await world.files.can_read(CAROL, fid)
    await world.chat.commit(CommitBatch(member_changes=[MemberChange(conv, CAROL, None)]))
    assert not await world.files.can_read(CAROL, fid)
    assert await world.files.can_read(BOB, fid)
    assert await world.files.can_read(ALICE, fid)


async def test_a_ref_without_a_file_grants_nothing(world: World) -> None:
    ghost = hashlib.sha256(b"never uploaded").hexdigest()
    await world.send_file("g:2", ALICE, ghost, members={ALICE: "owner", BOB: "member"})
    assert not await world.files.can_read(BOB, ghost)
    assert not await world.files.can_attach(ALICE, ghost)


async def test_attachable_batch(world: World) -> None:
    fid = await world.upload(ALICE, b"one")
    other = await world.upload(BOB, b"two")
    pairs = [(ALICE, fid), (BOB, fid), (BOB, other), (ALICE, other), (ALICE, "junk"), (ALICE, fid)]
    assert await world.files.attachable(pairs) == {(ALICE, fid), (BOB, other)}
    assert await world.files.attachable([]) == set()


async def test_add_refs_grants_members(world: World) -> None:
    fid = await world.upload(ALICE, b"via add_refs")
    await world.chat.commit(
        CommitBatch(new_conversations=[ConversationState("g:3", "group", 0, {ALICE: "owner", CAROL: "member"})])
    )
    await world.files.store.add_refs([(fid, "g:3"), (fid, "g:3")])
    assert await world.files.can_read(CAROL, fid)


async def test_read_streams_the_bytes(world: World) -> None:
    data = bytes(range(256)) * 300
    fid = await world.upload(ALICE, data)
    info = await world.files.info(ALICE, fid)
    assert b"".join([chunk async for chunk in await world.files.read(info)]) == data


@pytest.mark.parametrize(
    ("given", "clean"),
    [
        ("photo.png", "photo.png"),
        ("C:\\Users\\me\\photo.png", "photo.png"),
        ("../../etc/passwd", "passwd"),
        ("a\x00b\r\nc.txt", "abc.txt"),
        ("", "file"),
        (None, "file"),
        ("..", "file"),
        ("é" * 300, "é" * 255),
    ],
)
def test_clean_name(given: str | None, clean: str) -> None:
    assert clean_name(given) == clean


async def test_read_a_range(world: World) -> None:
    data = bytes(range(256)) * 100
    fid = await world.upload(ALICE, data)
    info = await world.files.info(ALICE, fid)
    got = b"".join([chunk async for chunk in await world.files.read(info, offset=4000, length=5000)])
    assert got == data[4000:9000]


async def test_damaged_or_missing_bytes_are_refused_as_unavailable(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Never wrong bytes: a blob damaged where ``open`` checks is refused before the first byte; damage
    further in ends the stream with an error after only genuine bytes. Both are logged."""
    data = bytes(range(256)) * 300  # 76,800 bytes: many chunks in the encrypted world
    fid = await world.upload(ALICE, data)
    info = await world.files.info(ALICE, fid)
    [blob] = world.blobs()
    raw = bytearray(blob.read_bytes())
    if isinstance(world.files.blobs, EncryptedBlobStorage):
        raw[20] ^= 1  # inside the first sealed chunk
        blob.write_bytes(bytes(raw))
        with pytest.raises(ImError) as err:
            await world.files.read(info)
        assert err.value.code == ErrorCode.UNAVAILABLE and "integrity" in err.value.message
        raw[20] ^= 1
        raw[-200] ^= 1  # inside the last chunk: found when the stream gets there
        blob.write_bytes(bytes(raw))
        got = bytearray()
        with pytest.raises(BlobCorrupt):
            async for chunk in await world.files.read(info):
                got += chunk
        assert data.startswith(bytes(got)) and len(got) < len(data)
        assert "integrity" in caplog.text or "fails" in caplog.text
    blob.unlink()
    with pytest.raises(ImError) as err:
        await world.files.read(info)
    assert err.value.code == ErrorCode.UNAVAILABLE and "missing" in err.value.message
