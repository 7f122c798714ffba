"""The sealed blob format, with no I/O of its own: layout arithmetic, chunk sealing, a seekable reader.

A sealed blob (format version 1, all integers big-endian)::

    MAGIC (8) | chunk size (u32) | chunk 0 | chunk 1 | ... | chunk n-1 | wrapped key | len(wrapped key) (u16)

- Chunk ``i`` is AES-256-GCM under the blob's own key, nonce = ``i`` as 12 bytes, associated data =
  ``MAGIC | chunk size | i (u64) | last (u8)``; it holds ``chunk size`` plaintext bytes, except the last
  chunk, which holds fewer (0 to chunk size - 1: a blob whose size is a multiple of the chunk size ends
  with an empty chunk). So the plaintext size and the place of every chunk follow from the file's length,
  and a range read decrypts only the chunks it touches.
- The key is random and made for one blob (one put), so the counter nonce never repeats under a key.
  That also binds every chunk to its blob: a chunk copied from another blob fails (another key); two
  chunks swapped fail (the index); a blob cut after a chunk boundary fails (no chunk carries the last
  flag where the length says the end is); a changed chunk size fails (it is in the associated data).
- The wrapped key comes last: it is wrapped with the blob's id as context, and the id (the SHA-256 of the
  plaintext) is known only once the whole stream has been read; a put never holds the stream.

:class:`ChunkCipher` seals and opens chunks; :class:`Layout` finds them; :class:`SealedReader` reads the
plaintext of an open sealed file, seekable, one chunk in memory at a time.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from im.backends.blobs import BlobCorrupt

#: The first bytes of every sealed blob (format version 1).
MAGIC = b"\x89IMBLOB\x01"
HEAD = struct.Struct(">8sI")
TAIL = struct.Struct(">H")
TAG = 16
KEY_BYTES = 32
#: Chunk sizes a sealed blob may declare.
MIN_CHUNK, MAX_CHUNK = 16, 1 << 24
_AAD = struct.Struct(">8sIQB")


def nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the parts of one sealed blob lie, from its chunk size and plaintext size."""

    chunk_size: int
    size: int
    wrapped_len: int

    @property
    def chunks(self) -> int:
        return self.size // self.chunk_size + 1

    @property
    def file_size(self) -> int:
        return HEAD.size + self.size + TAG * self.chunks + self.wrapped_len + TAIL.size

    def span(self, index: int) -> tuple[int, int]:
        """The file offset and length of chunk ``index`` (sealed: plaintext + tag)."""
        plain = self.chunk_size if index < self.chunks - 1 else self.size % self.chunk_size
        return HEAD.size + index * (self.chunk_size + TAG), plain + TAG

    @classmethod
    def parse(cls, head: bytes, tail: bytes, file_size: int) -> Layout:
        """The layout of a file of ``file_size`` bytes that starts with ``head`` and ends with ``tail``;
        :class:`BlobCorrupt` when no valid blob looks like that."""
        if len(head) != HEAD.size or len(tail) != TAIL.size:
            raise BlobCorrupt("too short to be a sealed blob")
        magic, chunk_size = HEAD.unpack(head)
        if magic != MAGIC:
            raise BlobCorrupt("not a sealed blob (unknown format)")
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise BlobCorrupt(f"invalid chunk size {chunk_size}")
        (wrapped_len,) = TAIL.unpack(tail)
        body = file_size - HEAD.size - TAIL.size - wrapped_len
        if wrapped_len == 0 or body < TAG:
            raise BlobCorrupt("truncated sealed blob")
        full, last = divmod(body, chunk_size + TAG)
        if last < TAG:
            raise BlobCorrupt("truncated sealed blob (no last chunk)")
        return cls(chunk_size, full * chunk_size + last - TAG, wrapped_len)


class ChunkCipher:
    """Seals and opens the chunks of one blob under its key."""

    __slots__ = ("_aead", "_chunk_size")

    def __init__(self, key: bytes, chunk_size: int) -> None:
        self._aead = AESGCM(key)
        self._chunk_size = chunk_size

    def _aad(self, index: int, last: bool) -> bytes:
        return _AAD.pack(MAGIC, self._chunk_size, index, last)

    def seal(self, index: int, plain: bytes | memoryview, *, last: bool) -> bytes:
        return self._aead.encrypt(nonce(index), plain, self._aad(index, last))

    def open(self, index: int, sealed: bytes, *, last: bool) -> bytes:
        try:
            return self._aead.decrypt(nonce(index), sealed, self._aad(index, last))
        except InvalidTag:
            raise BlobCorrupt(f"chunk {index} fails authentication (tampered, moved or reordered)") from None


def read_layout(f: BinaryIO) -> tuple[Layout, bytes]:
    """The layout and the wrapped key of the sealed file ``f`` (blocking)."""
    head = f.read(HEAD.size)
    size = f.seek(0, io.SEEK_END)
    if size < HEAD.size + TAIL.size:
        raise BlobCorrupt("too short to be a sealed blob")
    f.seek(size - TAIL.size)
    layout = Layout.parse(head, f.read(TAIL.size), size)
    f.seek(size - TAIL.size - layout.wrapped_len)
    return layout, f.read(layout.wrapped_len)


class SealedReader(io.RawIOBase):
    """The plaintext of an open sealed file: readable, seekable, decrypting one chunk at a time (the last
    one decrypted is kept). Every byte returned has been authenticated; a damaged chunk raises
    :class:`BlobCorrupt` when it is reached. Closing it closes the file. Blocking."""

    def __init__(self, f: BinaryIO, layout: Layout, cipher: ChunkCipher) -> None:
        super().__init__()
        self._f = f
        self.layout = layout
        self._cipher = cipher
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    @property
    def size(self) -> int:
        return self.layout.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.layout.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def chunk(self, index: int) -> bytes:
        """The plaintext of chunk ``index``, authenticated."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        offset, length = self.layout.span(index)
        self._f.seek(offset)
        sealed = self._f.read(length)
        if len(sealed) != length:
            raise BlobCorrupt(f"chunk {index} is cut short")
        plain = self._cipher.open(index, sealed, last=index == self.layout.chunks - 1)
        self._cached = (index, plain)
        return plain

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        piece = self.take(len(buffer), within_chunk=True)
        buffer[: len(piece)] = piece
        return len(piece)

    def take(self, n: int, *, within_chunk: bool = False) -> bytes:
        """Up to ``n`` bytes from the current position (fewer only at the end, or at the end of a chunk
        with ``within_chunk``)."""
        pieces: list[bytes] = []
        want = max(0, min(n, self.layout.size - self._pos))
        while want:
            index, within = divmod(self._pos, self.layout.chunk_size)
            plain = self.chunk(index)
            piece = plain[within : within + want]
            pieces.append(piece)
            self._pos += len(piece)
            want -= len(piece)
            if within_chunk:
                break
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self._cached = None
        super().close()
