"""/files: upload (streamed multipart), metadata, lookup by hash, download (whole, or one byte range).

Access: the uploader, or a current member of a conversation the file was sent in. Anyone else gets
404 ``not_found``, exactly as for a file that does not exist (see :mod:`im.files`).
"""

# No "from __future__ import annotations": FastAPI must resolve the local ``Me`` alias at runtime.

import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from im.core.accounts import Principal
from im.files import FileInfo, FileService
from im.model.errors import ErrorCode, ImError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

#: The upload form field that carries the file.
FILE_FIELD = "file"
#: Multipart framing allowed on top of ``max_upload_bytes`` (boundaries, part headers, small fields).
MULTIPART_SLACK = 64 * 1024
#: Image types a browser may show inline; everything else is served as an attachment.
INLINE_TYPES = frozenset({"image/png", "image/apng", "image/jpeg", "image/gif", "image/webp"})


class FileOut(BaseModel):
    file_id: str = Field(description="The SHA-256 of the bytes (lowercase hex); the same bytes, the same id.")
    sha256: str
    size: int
    content_type: str = Field(description="Sniffed from the bytes; application/octet-stream when unknown.")
    width: int | None = Field(description="Images only.")
    height: int | None
    name: str | None = Field(description="The name the caller uploaded it under; null if they did not upload it.")

    @classmethod
    def of(cls, info: FileInfo) -> "FileOut":
        m = info.meta
        return cls(
            file_id=m.file_id,
            sha256=m.sha256,
            size=m.size,
            content_type=m.content_type,
            width=m.width,
            height=m.height,
            name=info.name,
        )


class _FilePart:
    """Reads a ``multipart/form-data`` request body as it arrives and yields the bytes of its first
    part named ``field`` that carries a file name; the body is never held in memory. Other parts are
    skipped. More than ``max_body`` bytes in all: ``too_large``."""

    def __init__(self, body: AsyncIterator[bytes], content_type: str, *, field: str, max_body: int) -> None:
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise ImError(ErrorCode.INVALID, f"expected a multipart/form-data body with a '{field}' field")
        self._body = body
        self._field = field
        self._max_body = max_body
        self._read = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._in_file = False
        self._found = False
        self._done = False
        self._pending: list[bytes] = []
        self.filename: str | None = None
        self.content_type: str | None = None
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    # --- parser callbacks ------------------------------------------------------------------------------

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._found or name != self._field or b"filename" not in options:
            return
        self._found = self._in_file = True
        self.filename = options[b"filename"].decode("utf-8", "replace")
        declared = self._headers.get(b"content-type")
        self.content_type = declared.decode("latin-1") if declared else None

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._pending.append(data[start:end])

    def _on_part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            self._done = True

    # --- driving ---------------------------------------------------------------------------------------

    async def _pump(self) -> bool:
        """Feed the next piece of the body to the parser; False at its end."""
        try:
            chunk = await anext(self._body)
        except StopAsyncIteration:
            return False
        self._read += len(chunk)
        if self._read > self._max_body:
            raise ImError(ErrorCode.TOO_LARGE, f"request bodies are limited to {self._max_body} bytes here")
        try:
            self._parser.write(chunk)
        except FormParserError:
            raise ImError(ErrorCode.INVALID, "malformed multipart body") from None
        return True

    async def start(self) -> None:
        """Read until the file part's headers are parsed (its first bytes may be pending)."""
        while not self._found:
            if not await self._pump():
                raise ImError(ErrorCode.INVALID, f"the multipart field '{self._field}' (a file) is missing")

    async def data(self) -> AsyncIterator[bytes]:
        """The file part's bytes as they arrive; then the rest of the body is read and checked."""
        while True:
            if self._pending:
                pieces, self._pending = self._pending, []
                for piece in pieces:
                    yield piece
            if self._done:
                break
            if not await self._pump():
                raise ImError(ErrorCode.INVALID, "the multipart body ended inside the file")
        while await self._pump():
            self._pending.clear()
        try:
            self._parser.finalize()
        except FormParserError:
            raise ImError(ErrorCode.INVALID, "malformed multipart body") from None


class RangeNotSatisfiable(Exception):
    """The ``Range`` header asks for bytes that are not in the file (416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range ``[start, end)`` a ``Range`` header asks of a ``size``-byte file (RFC 9110
    section 14.1.2), clipped to the file; None to send the whole file: no header, a unit other than
    ``bytes``, several ranges, or a malformed one (a server may ignore those, section 14.2). Raises
    :class:`RangeNotSatisfiable` for a valid range that holds none of the file's bytes."""
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == "") or first == last == "":
        return None
    if first == "":  # the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size
    start = int(first)
    end = size if last == "" else min(size, int(last) + 1)
    if last != "" and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable
    return start, end


def _content_disposition(info: FileInfo) -> str:
    m = info.meta
    name = info.name or f"{m.file_id[:16]}{mimetypes.guess_extension(m.content_type) or ''}"
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "_" for ch in name)
    kind = "inline" if m.content_type in INLINE_TYPES else "attachment"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


def files_router(files: FileService, principal: Callable[..., Awaitable[Principal]]) -> APIRouter:
    router = APIRouter(prefix="/files", tags=["files"])
    Me = Annotated[Principal, Depends(principal)]

    @router.post(
        "",
        status_code=status.HTTP_201_CREATED,
        openapi_extra=_UPLOAD_BODY,
        responses={200: {"model": FileOut, "description": "The caller had uploaded these bytes before."}},
    )
    async def upload(me: Me, request: Request, response: Response) -> FileOut:
        """Upload a file (multipart field ``file``), streamed and limited to ``files.max_upload_bytes``
        (413 ``too_large``). The type is sniffed from the bytes; a declared ``image/*`` type that the bytes
        contradict is refused (400 ``invalid``). 201 when the caller is a new uploader of these bytes, 200
        when they had uploaded them before; the same bytes always get the same ``file_id``."""
        max_body = files.max_upload_bytes + MULTIPART_SLACK
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise ImError(ErrorCode.TOO_LARGE, f"files are limited to {files.max_upload_bytes} bytes")
        part = _FilePart(request.stream(), request.headers.get("content-type", ""), field=FILE_FIELD, max_body=max_body)
        await part.start()
        info, new = await files.upload(me.uid, part.data(), name=part.filename, declared_type=part.content_type)
        if not new:
            response.status_code = status.HTTP_200_OK
        return FileOut.of(info)

    @router.get("/by-hash/{sha256}")
    async def by_hash(me: Me, sha256: str) -> FileOut:
        """The file with these bytes, **only if the caller may already read it** (uploader, or member of a
        conversation it was sent in); otherwise 404 as if unknown. Knowing a hash grants nothing: to use
        a file you cannot read, upload its bytes."""
        return FileOut.of(await files.by_hash(me.uid, sha256))

    @router.get("/{file_id}/info")
    async def info(me: Me, file_id: str) -> FileOut:
        """The file's metadata (same access rule as the download)."""
        return FileOut.of(await files.info(me.uid, file_id))

    @router.get(
        "/{file_id}",
        response_class=StreamingResponse,
        responses={200: {"content": {"application/octet-stream": {}}, "description": "The bytes."}},
    )
    async def download(me: Me, file_id: str, request: Request) -> Response:
        """The file's bytes with its sniffed type; ``ETag`` is the quoted SHA-256 (``If-None-Match`` -> 304).
        One ``Range: bytes=...`` is served as 206 with ``Content-Range`` (416 when it holds none of the
        file; several ranges, or an ``If-Range`` that is not the ETag: the whole file). 404 unless the
        caller uploaded it or is a member of a conversation it was sent in."""
        found = await files.info(me.uid, file_id)
        size = found.meta.size
        etag = f'"{found.meta.sha256}"'
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "private, no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Content-Disposition": _content_disposition(found),
        }
        if etag in request.headers.get("if-none-match", "") or request.headers.get("if-none-match") == "*":
            return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
        if_range = request.headers.get("if-range")
        try:
            wanted = byte_range(request.headers.get("range"), size) if if_range in (None, etag) else None
        except RangeNotSatisfiable:
            body = {"code": ErrorCode.INVALID, "message": f"the range holds none of the file's {size} bytes"}
            return JSONResponse(body, status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if wanted is None:
            chunks = await files.read(found)
            headers["Content-Length"] = str(size)
            return StreamingResponse(chunks, media_type=found.meta.content_type, headers=headers)
        start, end = wanted
        chunks = await files.read(found, offset=start, length=end - start)
        headers["Content-Length"] = str(end - start)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return StreamingResponse(
            chunks, status_code=status.HTTP_206_PARTIAL_CONTENT, media_type=found.meta.content_type, headers=headers
        )

    return router
