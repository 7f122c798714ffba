"""Content types from the bytes, the declared-type rule, image headers and the pixel limit."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from im.files.sniff import OCTET_STREAM, Sniffed, normalize_type, sniff
from im.model.errors import ErrorCode, ImError


def image_bytes(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming a huge image, with no pixel data: a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def judge(data: bytes, declared: str | None = None, **kwargs: object) -> Sniffed:
    return sniff(io.BytesIO(data), declared=declared, **kwargs)  # type: ignore[arg-type]


def refused(data: bytes, declared: str | None = None, **kwargs: object) -> str:
    with pytest.raises(ImError) as info:
        judge(data, declared, **kwargs)
    assert info.value.code == ErrorCode.INVALID
    return info.value.message


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")]
)
def test_images_get_their_type_and_size(fmt: str, mime: str) -> None:
    data = image_bytes(fmt)
    assert judge(data) == Sniffed(mime, 40, 30)
    assert judge(data, declared=mime) == Sniffed(mime, 40, 30)


def test_declared_type_never_becomes_the_stored_type() -> None:
    png = image_bytes("PNG")
    assert judge(png, declared="application/octet-stream").content_type == "image/png"
    assert judge(png, declared="text/plain").content_type == "image/png"
    assert judge(b"<html><script>alert(1)</script></html>", declared="text/html").content_type == OCTET_STREAM


def test_unknown_bytes_are_octet_stream() -> None:
    assert judge(b"just some text\n") == Sniffed(OCTET_STREAM)
    assert judge(b"\x00\x01\x02" * 100, declared=None) == Sniffed(OCTET_STREAM)


def test_known_non_image_types_are_sniffed() -> None:
    assert judge(b"%PDF-1.7\n" + b"0" * 100).content_type == "application/pdf"


def test_a_declared_image_type_must_match_the_bytes() -> None:
    assert "content type does not match" in refused(b"not a png at all", declared="image/png")
    assert "content type does not match" in refused(image_bytes("JPEG"), declared="image/png")
    assert "content type does not match" in refused(image_bytes("PNG"), declared="image/gif; charset=binary")


def test_type_aliases_and_case_count_as_the_same() -> None:
    assert judge(image_bytes("JPEG"), declared="image/jpg").content_type == "image/jpeg"
    assert judge(image_bytes("JPEG"), declared="IMAGE/JPEG").content_type == "image/jpeg"
    assert judge(image_bytes("PNG"), declared="image/x-png").content_type == "image/png"


def test_allowed_types() -> None:
    allowed = ["image/*", "application/pdf"]
    assert judge(image_bytes("PNG"), allowed=allowed).content_type == "image/png"
    assert judge(b"%PDF-1.7\n" + b"0" * 100, allowed=allowed).content_type == "application/pdf"
    assert "not accepted" in refused(b"plain bytes", allowed=allowed)


def test_too_many_pixels_are_refused_from_the_header_alone() -> None:
    assert "pixels" in refused(image_bytes("PNG", (100, 100)), max_pixels=9_999)
    assert judge(image_bytes("PNG", (100, 100)), max_pixels=10_000).width == 100
    # 100000 x 100000 = 10^10 pixels declared in 33 bytes: refused without decoding anything
    assert "pixels" in refused(png_header(100_000, 100_000), max_pixels=50_000_000)
    assert "pixels" in refused(png_header(10_000, 10_000), max_pixels=50_000_000)
    assert judge(png_header(5_000, 5_000), max_pixels=50_000_000) == Sniffed("image/png", 5_000, 5_000)


def test_a_corrupt_image_header_is_refused() -> None:
    assert "could not be read" in refused(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    assert "could not be read" in refused(b"\xff\xd8\xff\xe0" + b"\x00" * 20)


def test_normalize_type() -> None:
    assert normalize_type(" Image/PNG ; charset=x") == "image/png"
    assert normalize_type("") is None
    assert normalize_type(None) is None
