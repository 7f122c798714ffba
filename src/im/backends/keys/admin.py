"""Key administration over a running deployment (``im keys``): what is wrapped by which master key, and
the rewrap of everything under the current one. The composition root builds the pieces; this module
only uses them.

    rewrap_all(keyring, blobs, hashes)   data keys (the data_keys table) and file keys (blob trailers)
    wrapped_by(keyring, blobs, hashes)   master key id -> how many data keys and blobs it wraps

A master key may be retired (removed from the key file) only when :func:`wrapped_by` finds nothing under
it: :func:`retirable` says which of the older keys that is true of.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from im.backends.blobs import BlobCorrupt
from im.backends.blobs.encrypted import RewrapBlobsReport, SealedBlobs, rewrap_blob_keys
from im.backends.files import FileStore
from im.backends.keys.keyring import Keyring, RewrapReport


async def file_hashes(files: FileStore, *, page: int = 500) -> AsyncIterator[str]:
    """The sha256 of every stored file, page by page."""
    after: str | None = None
    while True:
        batch, after = await files.hashes(after, page)
        for sha in batch:
            yield sha
        if after is None:
            return


@dataclass
class Rewrapped:
    keys: RewrapReport
    blobs: RewrapBlobsReport | None


async def rewrap_all(
    keyring: Keyring,
    blobs: SealedBlobs | None,
    files: FileStore | None,
    *,
    page: int = 500,
    progress: Callable[[str], None] | None = None,
) -> Rewrapped:
    """Rewrap every data key, then every sealed blob's key, under the current master key (online:
    compare-and-set per key row, rename per blob). Safe to run again: what is current is skipped."""

    def keys_progress(r: RewrapReport) -> None:
        if progress is not None:
            progress(f"data keys: {r.checked}/{r.total} checked, {r.rewrapped} rewrapped, {r.failed} failed")

    keys = await keyring.rewrap_all(page=page, progress=keys_progress)
    blob_report = None
    if blobs is not None and files is not None:

        def blobs_progress(r: RewrapBlobsReport) -> None:
            if progress is not None and (r.listed % page == 0):
                progress(f"file keys: {r.listed} files, {r.rewritten} rewritten, {r.failed} failed")

        blob_report = await rewrap_blob_keys(blobs, file_hashes(files, page=page), keyring, progress=blobs_progress)
    return Rewrapped(keys, blob_report)


async def wrapped_by(
    keyring: Keyring, blobs: SealedBlobs | None, files: FileStore | None, *, page: int = 500
) -> tuple[dict[str, int], dict[str, int]]:
    """(master key id -> stored data keys it wraps, master key id -> sealed blobs whose key it wraps);
    a blob whose trailer does not parse counts under ``"damaged"``."""
    keys = await keyring.store.masters()
    found: Counter[str] = Counter()
    if blobs is not None and files is not None:
        async for sha in file_hashes(files, page=page):
            try:
                wrapped = await blobs.wrapped_key(sha)
            except BlobCorrupt:
                found["damaged"] += 1
                continue
            if wrapped is not None:
                found[keyring.master_of(wrapped) or "unknown"] += 1
    return keys, dict(found)


def blocking(older: Sequence[str], keys: dict[str, int], blobs: dict[str, int]) -> dict[str, str]:
    """Of the ``older`` master key ids, those something is still wrapped by, with what (for a refusal)."""
    out = {}
    for key_id in older:
        k, b = keys.get(key_id, 0), blobs.get(key_id, 0)
        if k or b:
            out[key_id] = f"{k} data keys, {b} files"
    return out
