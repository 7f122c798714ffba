"""The streaming multipart reader of the upload route, the download headers, and the Range header."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest

from im.api.routes_files import RangeNotSatisfiable, _content_disposition, _FilePart, byte_range
from im.files import FileInfo
from im.model.errors import ErrorCode, ImError
from im.model.files import FileMeta

BOUNDARY = "----im-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, data: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + data + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read_file(data: bytes, *, size: int = 1000, max_body: int = 10**6) -> tuple[bytes, str | None, str | None]:
    reader = _FilePart(pieces(data, size), CONTENT_TYPE, field="file", max_body=max_body)
    await reader.start()
    got = b"".join([chunk async for chunk in reader.data()])
    return got, reader.filename, reader.content_type


async def refused(data: bytes, code: ErrorCode = ErrorCode.INVALID, **kwargs: int) -> str:
    with pytest.raises(ImError) as err:
        await read_file(data, **kwargs)
    assert err.value.code == code
    return err.value.message


@pytest.mark.parametrize("size", [1, 7, 1000, 10**6])
async def test_reads_the_file_part_in_any_chunking(size: int) -> None:
    payload = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    data = body(part("note", b"skipped"), part("file", payload, "a b.png", "image/png"), part("after", b"x"))
    assert await read_file(data, size=size) == (payload, "a b.png", "image/png")


async def test_file_part_without_content_type() -> None:
    assert await read_file(body(part("file", b"abc", "x.bin"))) == (b"abc", "x.bin", None)


async def test_a_field_named_file_without_a_filename_is_not_the_file() -> None:
    message = await refused(body(part("file", b"just a text field")))
    assert "'file'" in message and "missing" in message


async def test_only_the_first_file_part_counts() -> None:
    data = body(part("file", b"first", "1.txt"), part("file", b"second", "2.txt"))
    assert await read_file(data) == (b"first", "1.txt", None)


async def test_truncated_and_malformed_bodies() -> None:
    whole = body(part("file", b"x" * 5000, "x.bin"))
    assert "ended" in await refused(whole[:3000])
    assert "missing" in await refused(b"")
    assert "malformed" in await refused(b"garbage without any boundary" * 10)


async def test_body_limit_counts_every_byte() -> None:
    data = body(part("skip", b"y" * 50_000), part("file", b"small", "s.txt"))
    await refused(data, ErrorCode.TOO_LARGE, max_body=20_000)


def test_not_multipart_is_refused() -> None:
    for content_type in ("application/json", "multipart/form-data", ""):
        with pytest.raises(ImError) as err:
            _FilePart(pieces(b"", 1), content_type, field="file", max_body=10)
        assert err.value.code == ErrorCode.INVALID


def _info(content_type: str, name: str | None) -> FileInfo:
    sha = hashlib.sha256(b"x").hexdigest()
    return FileInfo(FileMeta(sha, sha, 1, content_type, None, None, 0), name)


def test_content_disposition() -> None:
    assert _content_disposition(_info("image/png", "cat.png")) == (
        "inline; filename=\"cat.png\"; filename*=UTF-8''cat.png"
    )
    header = _content_disposition(_info("application/octet-stream", 'Ré"sumé\\.pdf'))
    assert header.startswith('attachment; filename="R__sum__.pdf"; ')
    assert header.endswith("filename*=UTF-8''R%C3%A9%22sum%C3%A9%5C.pdf")
    unnamed = _content_disposition(_info("application/pdf", None))
    assert unnamed.startswith('attachment; filename="2d711642b726b044.pdf"')


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-0", 100, (0, 1)),
        ("bytes=0-99", 100, (0, 100)),
        ("bytes=10-", 100, (10, 100)),
        ("bytes=10-1000", 100, (10, 100)),  # clipped to the file
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-1000", 100, (0, 100)),
        ("Bytes = 5-6", 100, (5, 7)),
        ("bytes=99-", 100, (99, 100)),
        # ignored (the whole file is sent): other units, several ranges, malformed, last before first
        ("items=0-1", 100, None),
        ("bytes=0-1,5-6", 100, None),
        ("bytes=a-b", 100, None),
        ("bytes=-", 100, None),
        ("bytes=5", 100, None),
        ("bytes=6-5", 100, None),
        ("bytes=+1-2", 100, None),
        ("bytes=1--2", 100, None),
        ("bytes", 100, None),
    ],
)
def test_byte_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=-5", 0)]
)
def test_byte_range_not_satisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        byte_range(header, size)
