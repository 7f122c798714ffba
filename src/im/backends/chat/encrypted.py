"""Message bodies encrypted at rest: a :class:`ChatStore` around another one.

    core (plaintext) ── EncryptedChatStore ── SqliteChatStore / PostgresChatStore (ciphertext only)
                               │
                            Keyring (one data key per conversation, wrapped by the master key)

Every body written (:meth:`commit`, a group's first message in :meth:`create_group`) is sealed with
AES-256-GCM under its conversation's current data key; every body read (:meth:`read_range`,
:meth:`find_sent`, the last message of :meth:`list_conversations`) is opened again. The core never sees
ciphertext and the adapters never see plaintext. The associated data is (conversation, seq, mid), so a
ciphertext copied or moved to another row does not open.

Stored format (``body`` column): ``0x01`` (a byte no JSON text starts with), the key version (4 bytes,
big endian), a 12-byte random nonce, the ciphertext and its 16-byte tag: 33 bytes more than the
plaintext. A body that does not start with ``0x01`` is plaintext written before encryption was turned
on, and is returned as it is.

A body that does not open (moved, altered, or its key gone: deleted or not unwrappable) is never
returned as text: the reader gets the message with ``type`` :data:`UNDECRYPTABLE` and body ``null``
(seq, mid, sender and time stay, so the log has no gap), and the failure is logged as one counted line
per interval (``failures`` counts them all).

Key work is batched: one :class:`Keyring` call per commit or read for every conversation in it, never
one awaited call per message. Random 96-bit nonces under one key: rotate a conversation's key before
2^32 messages (NIST SP 800-38D, 8.3), far beyond any conversation's log.

What is not encrypted: everything but the body — conversation ids, seqs, senders, devices, cmids,
times, message types, membership, group names, cursors and read marks.

File refs (``file_refs``, written by the commit of a message with an attachment): with keyed file ids
(``file_ids``, :mod:`im.backends.files.ids`) the SHA-256 in each is replaced by the file's keyed id before
the batch reaches the store; a batch with no attachment pays one emptiness check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager

from cryptography.exceptions import InvalidTag

from im.backends.chat import ChatStore, StoredBodies, by_conversation
from im.backends.files.ids import FileIds
from im.backends.keys import KeyUnavailable
from im.backends.keys.keyring import Keyring, conv_key_name
from im.model.chat import (
    CommitBatch,
    ConversationState,
    ConversationSummary,
    Group,
    OutboxEvent,
    StoredMessage,
    SyncPoint,
)

log = logging.getLogger("im.encryption")

FORMAT = 0x01
#: The type a reader gets for a message whose body does not open (the body is ``null``).
UNDECRYPTABLE = "undecryptable"
_NULL = b"null"
_HEADER = struct.Struct(">BI")  # format, key version
_NONCE = 12
_PREFIX = _HEADER.size + _NONCE
_TAG = 16
_ROW = struct.Struct(">QQ")  # seq, mid
#: What seals one conversation's bodies: the stored header, the current key's encrypt, the associated
#: data prefix.
_Sealer = tuple[bytes, Callable[[bytes, bytes, bytes | None], bytes], bytes]


def associated_data(conv: str, seq: int, mid: int) -> bytes:
    """What binds a ciphertext to its row: conversation, seq and message id."""
    return b"im-msg/" + conv.encode() + _ROW.pack(seq, mid)


def is_sealed(body: bytes) -> bool:
    return len(body) >= _PREFIX + _TAG and body[0] == FORMAT


class EncryptedChatStore(ChatStore):
    """``inner`` with every message body sealed on the way in and opened on the way out.

    Owns ``inner`` (starts and closes it). ``keyring`` is shared (the composition root starts it before
    and closes it after this store); with ``owns_keyring`` this store starts it first and closes it last.
    ``report_interval``: seconds between two log lines about bodies that did not open.

    ``seal`` False (encryption turned off): new bodies are written in clear; bodies sealed earlier are
    still opened with ``keyring``, or, without one, read as :data:`UNDECRYPTABLE` (never as raw bytes,
    which are not JSON).

    ``file_ids``: how the file tables name files (the file store's own :class:`FileIds`); when keyed,
    the file refs of a commit are written under the keyed ids.
    """

    def __init__(
        self,
        inner: ChatStore,
        keyring: Keyring | None,
        *,
        seal: bool = True,
        owns_keyring: bool = False,
        report_interval: float = 10.0,
        file_ids: FileIds | None = None,
    ) -> None:
        if seal and keyring is None:
            raise ValueError("sealing needs a keyring")
        self.inner = inner
        self.keyring = keyring
        self.sealing = seal
        self.owns_keyring = owns_keyring and keyring is not None
        self.report_interval = report_interval
        self.file_ids = file_ids if file_ids is not None and file_ids.keyed else None
        self.failures = 0  # bodies that did not open, since start
        self._sealer_cache: dict[str, tuple[float, _Sealer]] = {}  # conv -> (key versions read at, sealer)
        self._sealer_epoch = -1
        self._unreported = 0
        self._reported_at = 0.0

    async def _acquire(self) -> None:
        if self.owns_keyring and self.keyring is not None:
            await self.keyring.start()
        try:
            await self.inner.start()
        except BaseException:
            if self.owns_keyring and self.keyring is not None:
                await self.keyring.close()
            raise

    async def _release(self) -> None:
        try:
            await self.inner.close()
        finally:
            if self.owns_keyring and self.keyring is not None:
                await self.keyring.close()

    # --- sealing -------------------------------------------------------------------------------------

    async def seal(self, messages: Sequence[StoredMessage]) -> list[StoredMessage]:
        """Copies of ``messages`` with their bodies sealed (the originals are not touched)."""
        bodies = await self.seal_bodies(messages)
        return [
            StoredMessage(m.conv, m.seq, m.mid, m.sender, m.device, m.cmid, m.ts, m.type, body)
            for m, body in zip(messages, bodies, strict=True)
        ]

    async def seal_bodies(
        self, messages: Sequence[StoredMessage], bodies: Sequence[bytes] | None = None
    ) -> list[bytes]:
        """Each of ``messages`` body sealed, in order (``bodies[i]`` sealed in place of ``messages[i]``'s
        own when given)."""
        if not messages:
            return []
        sealers = await self._sealers({m.conv for m in messages})
        nonces = os.urandom(_NONCE * len(messages))
        out: list[bytes] = []
        append = out.append
        pack = _ROW.pack
        at = 0
        plain = [m.body for m in messages] if bodies is None else bodies
        for m, body in zip(messages, plain, strict=True):
            header, encrypt, prefix = sealers[m.conv]
            nonce = nonces[at : at + _NONCE]
            at += _NONCE
            append(header + nonce + encrypt(nonce, body, prefix + pack(m.seq, m.mid)))
        return out

    async def _sealers(self, convs: Iterable[str]) -> dict[str, _Sealer]:
        """What seals for each of ``convs``: (header, the current key's encrypt, associated data prefix).

        Kept per conversation until the keyring would read the key's versions again or its keys change
        (its ``epoch``), so a commit costs a dict lookup per conversation, not a keyring call; a miss
        goes to the keyring, one call for all of them."""
        keyring = self.keyring
        if keyring is None:
            raise KeyUnavailable("no keyring: encryption is off and no master key is configured")
        cache = self._sealer_cache
        if keyring.epoch != self._sealer_epoch or len(cache) > keyring.cache_size:
            cache.clear()
            self._sealer_epoch = keyring.epoch
        stale = time.monotonic() - keyring.refresh_interval
        missing = [c for c in convs if (c not in cache) or cache[c][0] <= stale]
        if missing:
            names = {conv: conv_key_name(conv) for conv in missing}
            keys = await keyring.current(names.values())
            if keyring.epoch != self._sealer_epoch:  # the keyring changed while we waited: start over
                cache.clear()
                self._sealer_epoch = keyring.epoch
                return await self._sealers(convs)
            for conv, name in names.items():
                found = keys.get(name)
                if found is None:
                    raise KeyUnavailable(f"no usable data key for conversation {conv}")
                header = _HEADER.pack(FORMAT, found[0])
                cache[conv] = (keyring.loaded_at(name), (header, found[1].encrypt, b"im-msg/" + conv.encode()))
        return {conv: cache[conv][1] for conv in convs}

    async def open(self, messages: Sequence[StoredMessage]) -> list[StoredMessage]:
        """``messages`` with sealed bodies opened (plaintext ones as they are, ones that do not open
        as :data:`UNDECRYPTABLE`)."""
        wanted: dict[tuple[str, int], tuple[str, int]] = {}  # (conv, version) -> (key name, version)
        for m in messages:
            if is_sealed(m.body):
                at = (m.conv, _HEADER.unpack_from(m.body)[1])
                if at not in wanted:
                    wanted[at] = (conv_key_name(m.conv), at[1])
        if not wanted:
            return list(messages)
        ciphers = {} if self.keyring is None else await self.keyring.versions(wanted.values())
        by_conv = {at: ciphers.get(named) for at, named in wanted.items()}
        prefixes = {conv: b"im-msg/" + conv.encode() for conv, _ in wanted}
        pack = _ROW.pack
        out = []
        failed: list[StoredMessage] = []
        for m in messages:
            body = m.body
            if not is_sealed(body):
                out.append(m)
                continue
            aead = by_conv[(m.conv, _HEADER.unpack_from(body)[1])]
            plain = None
            if aead is not None:
                try:
                    plain = aead.decrypt(
                        body[_HEADER.size : _PREFIX], body[_PREFIX:], prefixes[m.conv] + pack(m.seq, m.mid)
                    )
                except InvalidTag:
                    plain = None
            if plain is None:
                failed.append(m)
                out.append(StoredMessage(m.conv, m.seq, m.mid, m.sender, m.device, m.cmid, m.ts, UNDECRYPTABLE, _NULL))
            else:
                out.append(StoredMessage(m.conv, m.seq, m.mid, m.sender, m.device, m.cmid, m.ts, m.type, plain))
        if failed:
            self._report(failed)
        return out

    def _report(self, failed: list[StoredMessage]) -> None:
        self.failures += len(failed)
        self._unreported += len(failed)
        now = time.monotonic()
        if now - self._reported_at >= self.report_interval:
            first = failed[0]
            log.error(
                "%d stored message bodies did not authenticate (moved to another row, altered, or their key is "
                "gone) and were returned as %r; %d since start; latest: conv %s seq %d",
                self._unreported,
                UNDECRYPTABLE,
                self.failures,
                first.conv,
                first.seq,
            )
            self._unreported = 0
            self._reported_at = now

    # --- MessageLog ----------------------------------------------------------------------------------

    async def load_conversations(self, convs: Sequence[str]) -> dict[str, ConversationState]:
        return await self.inner.load_conversations(convs)

    async def find_sent(self, keys: Sequence[tuple[int, str, str]]) -> dict[tuple[int, str, str], StoredMessage]:
        found = await self.inner.find_sent(keys)
        if not found:
            return found
        opened = await self.open(list(found.values()))
        return dict(zip(found.keys(), opened, strict=True))

    async def commit(self, batch: CommitBatch) -> None:
        if batch.messages and self.sealing:
            batch = dataclasses.replace(batch, bodies=await self.seal_bodies(batch.messages, batch.bodies))
        if batch.file_refs and self.file_ids is not None:
            await self.file_ids.load()  # once: a no-op after
            batch = dataclasses.replace(batch, file_refs=self.file_ids.stored_refs(batch.file_refs))
        await self.inner.commit(batch)

    async def raise_fence(self, node_id: int, token: int) -> int:
        return await self.inner.raise_fence(node_id, token)

    async def read_range(
        self, conv: str, after: int, before: int | None, limit: int, newest_first: bool = False
    ) -> list[StoredMessage]:
        return await self.open(await self.inner.read_range(conv, after, before, limit, newest_first))

    async def read_ranges(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> dict[str, list[StoredMessage]]:
        found = await self.inner.read_ranges(ranges, limit)
        # All the bodies opened with one keyring call, then grouped again.
        return by_conversation(await self.open([m for messages in found.values() for m in messages]))

    async def wrote_in(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        return await self.inner.wrote_in(pairs)

    # --- GroupDirectory ------------------------------------------------------------------------------

    async def create_group(
        self, group: Group, first: StoredMessage, members: dict[int, str], *, fence: tuple[int, int] | None = None
    ) -> int:
        # The ciphertext is bound to the conversation, so the gid is taken before the first message is
        # sealed; the conversation's key is stored before the group that uses it.
        if not self.sealing:
            return await self.inner.create_group(group, first, members, fence=fence)
        gid = group.gid or await self.inner.reserve_gid()
        (sealed,) = await self.seal([_in_conv(first, f"g:{gid}")])
        return await self.inner.create_group(dataclasses.replace(group, gid=gid), sealed, members, fence=fence)

    async def reserve_gid(self) -> int:
        return await self.inner.reserve_gid()

    async def get_group(self, gid: int) -> Group | None:
        return await self.inner.get_group(gid)

    async def list_conversations(self, uid: int) -> list[ConversationSummary]:
        summaries = await self.inner.list_conversations(uid)
        lasts = [s.last_message for s in summaries if s.last_message is not None]
        if not lasts:
            return summaries
        opened = iter(await self.open(lasts))
        return [s if s.last_message is None else dataclasses.replace(s, last_message=next(opened)) for s in summaries]

    # --- CursorStore ---------------------------------------------------------------------------------

    async def sync_points(self, uid: int, device: str) -> list[SyncPoint]:
        return await self.inner.sync_points(uid, device)

    async def heads(self, uids: Sequence[int]) -> dict[int, dict[str, int]]:
        return await self.inner.heads(uids)

    async def start_cursor(self, uid: int, device: str, conv: str) -> int:
        return await self.inner.start_cursor(uid, device, conv)

    async def save_cursors(self, cursors: Iterable[tuple[int, str, str, int]]) -> None:
        await self.inner.save_cursors(cursors)

    async def save_read_marks(self, marks: Iterable[tuple[int, str, int]]) -> None:
        await self.inner.save_read_marks(marks)

    async def read_marks(self, conv: str) -> dict[int, int]:
        return await self.inner.read_marks(conv)

    async def delivered_marks(self, conv: str) -> dict[int, int]:
        return await self.inner.delivered_marks(conv)

    async def devices(self, uid: int) -> list[tuple[str, int]]:
        return await self.inner.devices(uid)

    # --- Outbox (its rows hold no body) --------------------------------------------------------------

    async def outbox_fetch(self, limit: int) -> list[OutboxEvent]:
        return await self.inner.outbox_fetch(limit)

    async def outbox_delete(self, ids: Sequence[int]) -> None:
        await self.inner.outbox_delete(ids)

    def outbox_exclusive(self) -> AbstractAsyncContextManager[None]:
        return self.inner.outbox_exclusive()

    async def ping(self) -> None:
        await self.inner.ping()


def _in_conv(m: StoredMessage, conv: str) -> StoredMessage:
    return StoredMessage(conv, m.seq, m.mid, m.sender, m.device, m.cmid, m.ts, m.type, m.body)


@dataclasses.dataclass
class MigrationProgress:
    """Where a :class:`PlaintextMigration` is: plaintext rows found at its start, rows sealed, rows
    skipped because a concurrent writer changed them first, and the last (conv, seq) done."""

    total: int = 0
    messages: int = 0
    sealed: int = 0
    skipped: int = 0
    position: tuple[str, int] | None = None
    finished: bool = False
    #: False when the engine could not drop the old versions at the end (:meth:`StoredBodies.scrub`).
    scrubbed: bool = True

    def line(self) -> str:
        pct = 100.0 if not self.total else 100.0 * (self.sealed + self.skipped) / self.total
        where = "" if self.position is None else f", at {self.position[0]} seq {self.position[1]}"
        return f"{self.sealed + self.skipped}/{self.total} plaintext message bodies done ({pct:.1f}%{where})"


class PlaintextMigration:
    """Seals, in place and while the server runs, every message body stored in clear (written before
    encryption at rest was on, or while it was off).

    Pages of ``batch`` plaintext rows in (conv, seq) order; each page is sealed with the conversation's
    current key exactly as a new message would be (same format, same associated data) and written back
    with a compare-and-set on the old body, all of a page in one transaction. So:

    - a concurrent writer never loses anything: messages are append-only, and a row whose body changed
      since it was read is left alone (counted as skipped; the next run finds it again if it is still
      plaintext);
    - it is resumable: a row is plaintext or sealed, never half of each, and a run (after a crash, a
      stop, or the next start) scans for what is still plaintext; nothing is rewritten twice;
    - readers are never disturbed: the encrypted store opens sealed rows and passes plaintext ones through.

    ``pause`` seconds between pages leave the writer to the live traffic. ``progress`` is called with a
    :class:`MigrationProgress` at most every ``report_interval`` seconds and when it finishes. At the end
    the store's :meth:`StoredBodies.scrub` drops what the engine keeps of the old bytes (SQLite: VACUUM and the WAL).
    """

    def __init__(
        self,
        store: EncryptedChatStore,
        bodies: StoredBodies,
        *,
        batch: int = 500,
        pause: float = 0.0,
        report_interval: float = 5.0,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if store.keyring is None:
            raise ValueError("the plaintext migration needs the keyring (encryption on)")
        self.store = store
        self.bodies = bodies
        self.batch = batch
        self.pause = pause
        self.report_interval = report_interval

    async def run(self, progress: Callable[[MigrationProgress], None] | None = None) -> MigrationProgress:
        state = MigrationProgress()
        state.total, state.messages = await self.bodies.count_plaintext()
        reported = time.monotonic()
        if progress is not None:
            progress(state)
        while state.total:
            page = await self.bodies.plaintext_page(state.position, self.batch)
            if not page:
                break
            sealed = await self.store.seal(page)
            done = await self.bodies.replace_bodies([(m, s.body) for m, s in zip(page, sealed, strict=True)])
            state.sealed += done
            state.skipped += len(page) - done
            state.position = (page[-1].conv, page[-1].seq)
            if progress is not None and time.monotonic() - reported >= self.report_interval:
                reported = time.monotonic()
                progress(state)
            if self.pause:
                await asyncio.sleep(self.pause)
        if state.total:
            state.scrubbed = await self.bodies.scrub()
        state.finished = True
        if progress is not None:
            progress(state)
        return state
