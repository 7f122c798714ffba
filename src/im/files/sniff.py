"""What a file is, judged from its bytes: content type by magic numbers, image size from the header.

The rule for the client's declared type (the multipart part's ``Content-Type``):

- The stored type is always the sniffed one; the declared type never becomes the stored type.
- Bytes no signature matches are ``application/octet-stream`` (never ``text/html`` or any other type a
  browser would render).
- A declared ``image/*`` type must agree with the sniffed type (``image/jpg`` counts as ``image/jpeg``,
  ``image/png`` accepts an animated PNG, ...); otherwise the upload is refused: ``invalid``, "content
  type does not match". Other declared types (``application/octet-stream``, a wrong ``text/plain``) are
  ignored.
- An image must have a readable header and at most ``max_pixels`` pixels; only the header is read,
  pixels are never decoded.
- When ``allowed`` is not empty, the sniffed type must match one of its entries (``image/*`` wildcards).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import filetype
from PIL import Image, UnidentifiedImageError

from im.model.errors import ErrorCode, ImError

OCTET_STREAM = "application/octet-stream"
#: Bytes read for magic-number matching (what ``filetype`` looks at).
HEAD_BYTES = 8192

#: Sniffed image types whose size we read, with the Pillow plugin that reads them (and only that one).
PILLOW_FORMATS = {
    "image/png": "PNG",
    "image/apng": "PNG",
    "image/jpeg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
    "image/x-icon": "ICO",
}

#: Other names clients use for a type, mapped to the name the sniffer reports.
_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/apng": "image/png",
    "image/x-ms-bmp": "image/bmp",
    "image/vnd.microsoft.icon": "image/x-icon",
}


@dataclass(frozen=True, slots=True)
class Sniffed:
    content_type: str
    width: int | None = None
    height: int | None = None


def normalize_type(value: str | None) -> str | None:
    """``"Image/PNG; charset=x"`` -> ``"image/png"``; None for a missing or empty value."""
    if not value:
        return None
    main = value.split(";", 1)[0].strip().lower()
    return main or None


def _same_type(a: str, b: str) -> bool:
    return _ALIASES.get(a, a) == _ALIASES.get(b, b)


def sniff(
    f: BinaryIO, *, declared: str | None = None, allowed: Sequence[str] = (), max_pixels: int = 50_000_000
) -> Sniffed:
    """Judge the file open in ``f`` (read from its start). Raises ImError ``invalid`` to refuse it."""
    head = f.read(HEAD_BYTES)
    kind = filetype.guess(head) if head else None
    content_type = kind.mime if kind is not None else OCTET_STREAM
    declared = normalize_type(declared)
    if declared is not None and declared.startswith("image/") and not _same_type(declared, content_type):
        raise ImError(ErrorCode.INVALID, f"content type does not match: declared {declared}, found {content_type}")
    if allowed and not any(fnmatch.fnmatchcase(content_type, pattern.lower()) for pattern in allowed):
        raise ImError(ErrorCode.INVALID, f"files of type {content_type} are not accepted")
    plugin = PILLOW_FORMATS.get(content_type)
    if plugin is None:
        return Sniffed(content_type)
    width, height = _image_size(f, plugin, max_pixels)
    return Sniffed(content_type, width, height)


def _image_size(f: BinaryIO, plugin: str, max_pixels: int) -> tuple[int, int]:
    f.seek(0)
    try:
        # Image.open parses the header only; pixels would be decoded by load(), which is never called.
        # It raises DecompressionBombError beyond 2 x Image.MAX_IMAGE_PIXELS (and warns beyond 1 x);
        # the explicit check below is the limit we enforce.
        with Image.open(f, formats=[plugin]) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImError(ErrorCode.INVALID, f"images are limited to {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ImError(ErrorCode.INVALID, "the image could not be read") from None
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise ImError(ErrorCode.INVALID, f"images are limited to {max_pixels} pixels ({width}x{height} given)")
    return width, height
