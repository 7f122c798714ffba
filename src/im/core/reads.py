"""The read side of the chat core: history, conversations, receipts, replay and sync points, members,
groups as their members see them, devices, and who sees whose presence and typing.

Nothing here writes to a conversation log (the committer does, :mod:`im.core.committer`). Membership
is checked on the conversation states shared with the committer of the same process
(:class:`~im.core.states.ConversationStates`): in ``im serve`` that cache is the truth, elsewhere it is
at most its ``ttl`` old. Consent (blocks, contacts-only) is the same :class:`~im.core.consent.Consent`
the committer checks sends with.
"""

from __future__ import annotations

from collections.abc import Sequence

from im.backends.accounts import PrivacyStore
from im.backends.chat import ChatStore
from im.backends.presence import Presence
from im.core.consent import Consent
from im.core.states import ConversationStates, unknown_conv
from im.model.chat import ConversationState, ConversationSummary, Group, StoredMessage, SyncPoint
from im.model.errors import ErrorCode, ImError
from im.model.ids import group_conv, parse_conv


class ChatReads:
    """Reads of conversations for the HTTP API and the gateway. Every method asked on behalf of a user
    refuses (ImError) what that user may not read. Lives on one event loop."""

    def __init__(
        self,
        store: ChatStore,
        accounts: PrivacyStore,
        presence: Presence,
        states: ConversationStates,
        consent: Consent,
        *,
        history_page_max: int = 200,
    ) -> None:
        self._store = store
        self._accounts = accounts
        self._presence = presence
        self._states = states
        self._consent = consent
        #: Changed live by im.live_config (``limits.history_page_max``).
        self.history_page_max = history_page_max

    # --- for the gateway -------------------------------------------------------------------------------

    async def sync_points(self, uid: int, device: str) -> list[SyncPoint]:
        """Where ``device`` of ``uid`` stands in each of its conversations (what a connection resumes from)."""
        return await self._store.sync_points(uid, device)

    async def heads(self, uids: Sequence[int]) -> dict[int, dict[str, int]]:
        """uid -> {conv: last seq} of every conversation of each user (one read for many users)."""
        return await self._store.heads(uids)

    async def replay(
        self, uid: int, device: str, conv: str, after: int | None, upto: int, limit: int
    ) -> tuple[int, list[StoredMessage]]:
        """Stored messages a device is missing: (start point, messages with start < seq <= upto).

        ``after`` None (a conversation first seen live on a connection): the device's start point. A user
        who is no longer a member when this is read (added and removed again meanwhile, or removed while
        its connection was being set up) has no join point left to start from: it starts at ``upto``, so
        it gets the live messages that brought the conversation (its ``members_added``, its removal) and
        never the history before its join (docs/protocol.md section 9)."""
        if after is None:
            after = await self._store.start_cursor(uid, device, conv)
            if after < upto:
                state = (await self._store.load_conversations([conv])).get(conv)
                if state is None or uid not in state.members:
                    after = upto
        if upto <= after:
            return after, []
        return after, await self._store.read_range(conv, after, upto + 1, limit)

    async def replay_ranges(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> dict[str, list[StoredMessage]]:
        """Stored messages of many conversations a device is missing, in one read: for each (conv,
        after, upto), those with after < seq <= upto (at most ``limit`` each; none: absent). Only for
        ranges whose start is known (its login's sync points, or messages it was delivered); where it is
        not, :meth:`replay` with ``after`` None finds it first."""
        return await self._store.read_ranges(ranges, limit)

    async def members_of(self, conv: str) -> dict[int, str]:
        """Members of ``conv`` and their roles (empty for an unknown conversation)."""
        return (await self.members_by_conv([conv]))[conv]

    async def members_by_conv(self, convs: Sequence[str]) -> dict[str, dict[int, str]]:
        """Members of each conversation (empty for an unknown one); what is not cached is read in one batch."""
        return await self._states.members_by_conv(convs)

    async def hidden_from(self, uid: int, viewers: Sequence[int]) -> set[int]:
        """Those of ``viewers`` that must not see ``uid``'s typing: see :meth:`Consent.hidden_from`."""
        return await self._consent.hidden_from(uid, viewers)

    # --- for the HTTP API ------------------------------------------------------------------------------

    async def group(self, actor: int, gid: int) -> Group:
        await self._require_member(actor, group_conv(gid))
        group = await self._store.get_group(gid)
        if group is None:
            raise ImError(ErrorCode.NOT_FOUND, f"no group {gid}")
        return group

    async def group_members(self, actor: int, gid: int) -> dict[int, str]:
        state = await self._require_member(actor, group_conv(gid))
        return dict(state.members)

    async def history(
        self, uid: int, conv: str, *, after: int | None, before: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        """A page of the log, oldest first, and whether more lies beyond it in the paging direction."""
        await self._require_member(uid, conv)
        limit = max(1, min(limit, self.history_page_max))
        if after is not None:
            page = await self._store.read_range(conv, after, before, limit + 1)
            return page[:limit], len(page) > limit
        page = await self._store.read_range(conv, 0, before, limit + 1, newest_first=True)
        return list(reversed(page[:limit])), len(page) > limit

    async def conversations(self, uid: int) -> list[ConversationSummary]:
        return await self._store.list_conversations(uid)

    async def receipts(self, uid: int, conv: str) -> dict[int, tuple[int, int]]:
        """Per member of ``conv``: (read seq, delivered seq), the stored marks (docs/protocol.md section
        10). Delivered is the best delivery cursor of any of the member's devices, and at least their read
        mark (what was read was held). Members only."""
        await self._require_member(uid, conv)
        reads = await self._store.read_marks(conv)
        delivered = await self._store.delivered_marks(conv)
        return {m: (reads.get(m, 0), max(reads.get(m, 0), delivered.get(m, 0))) for m in sorted(reads)}

    async def online(self, viewer: int, uids: Sequence[int]) -> dict[int, bool]:
        """For each of ``uids``: whether it has a device online, under the presence rule (docs/protocol.md
        section 18): user X reads as online to V only when V is X, or when neither blocks the other and
        X has V as a contact, X and V are members of one group, or X has written in their direct
        conversation. Anyone else reads as offline, so one unsolicited message tells its sender nothing."""
        wanted = set(uids)
        visible = {viewer} & wanted
        others = wanted - visible
        if others:
            candidates = await self._presence_candidates(viewer, others)
            if candidates:
                visible |= candidates - await self.hidden_from(viewer, sorted(candidates))
        located = await self._presence.locate(sorted(visible)) if visible else {}
        return {u: u in located for u in uids}

    async def _presence_candidates(self, viewer: int, others: set[int]) -> set[int]:
        """Those of ``others`` that consented to ``viewer`` seeing them (blocks not yet applied)."""
        # The device name "" is never a real device: this lists the viewer's conversations, nothing else.
        groups: list[str] = []
        directs: dict[int, str] = {}
        for point in await self._store.sync_points(viewer, ""):
            parsed = parse_conv(point.conv)
            if parsed is None:
                continue
            kind, ids = parsed
            if kind == "group":
                groups.append(point.conv)
            else:
                directs.update((u, point.conv) for u in ids if u in others)
        found: set[int] = set()
        if groups:
            await self._states.load(groups)
            for conv in groups:
                state = self._states.get(conv)
                if state is not None and viewer in state.members:
                    found.update(u for u in state.members if u in others)
        rest = others - found
        if rest:
            found.update(x for x, _ in await self._accounts.contact_pairs([(x, viewer) for x in sorted(rest)]))
        pairs = [(x, directs[x]) for x in sorted(others - found) if x in directs]
        found.update(x for x, _ in await self._consent.wrote_in(pairs))
        return found

    async def devices(self, uid: int) -> list[tuple[str, int, bool]]:
        """The user's devices (those that ever synced, and those online now): (name, last activity in
        seconds since the epoch, online now), by name."""
        known = dict(await self._store.devices(uid))
        located = await self._presence.locate([uid])
        online = {loc.device for loc in located.get(uid, ())}
        return sorted((d, known.get(d, 0), d in online) for d in {*known, *online})

    # --- membership ------------------------------------------------------------------------------------

    async def _require_member(self, uid: int, conv: str) -> ConversationState:
        if parse_conv(conv) is None:
            raise unknown_conv(conv)
        await self._states.load([conv])
        state = self._states.get(conv)
        if state is None:
            raise ImError(ErrorCode.NOT_FOUND, f"no conversation {conv}")
        if uid not in state.members:
            raise ImError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
        return state
