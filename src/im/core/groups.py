"""Group writes as the HTTP API asks for them: create a group, add and remove members, leave, change a
role, and leave every group when an account is deleted.

Creating a group is checked here (name, size, users, consent) and stored by the committer; every other
change is queued on the committer, which judges it against the group's current state
(:mod:`im.core.membership`) in its next pass and commits it in the log as a ``system`` message, in
order with the group's messages. Reads of groups (a group, its members) are
:class:`~im.core.reads.ChatReads`'.

Crypto-shredding (``shred``, docs/security.md 11.4): the data keys of a conversation nobody can read
any more are destroyed —

- a group whose last member leaves (:meth:`leave_group`, a DELETE of oneself, or :meth:`leave_all_groups`
  on account deletion): nobody is left who could add anyone back, so the group stays empty for good.
  A removal never empties a group (the remover is a member and stays one);
- on account deletion, a direct conversation whose other party was deleted before.

A direct conversation with a living partner, and a group with members left, keep their keys: the
account-deletion rules keep that history for them. The keys are destroyed after the change that emptied
the group is committed; a crash between the two leaves them (nothing retries it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from im.backends.accounts import UserDirectory
from im.backends.chat import CursorStore
from im.core.committer import Committer
from im.core.consent import Consent
from im.core.membership import MemberRequest
from im.model.chat import Group
from im.model.errors import ErrorCode, ImError
from im.model.ids import group_conv, parse_conv

log = logging.getLogger(__name__)


class Groups:
    """Group creation and membership changes, through ``committer``. Every method raises ImError to refuse."""

    def __init__(
        self,
        committer: Committer,
        store: CursorStore,
        accounts: UserDirectory,
        consent: Consent,
        *,
        max_group_members: int = 2000,
        shred: Callable[[Sequence[str]], Awaitable[int]] | None = None,
        deleted_users: Callable[[Sequence[int]], Awaitable[set[int]]] | None = None,
    ) -> None:
        self._shred = shred
        self._deleted_users = deleted_users
        self._committer = committer
        self._store = store
        self._accounts = accounts
        self._consent = consent
        self._max_group_members = max_group_members

    async def create_group(self, owner: int, name: str, members: list[int]) -> Group:
        """A new group owned by ``owner`` with ``members`` (duplicates and the owner dropped): 1..100
        characters of name, every member an existing user who accepts the owner."""
        name = name.strip()
        if not 1 <= len(name) <= 100:
            raise ImError(ErrorCode.INVALID, "a group name has 1..100 characters")
        others = [u for u in dict.fromkeys(members) if u != owner]
        if len(others) + 1 > self._max_group_members:
            raise ImError(ErrorCode.INVALID, f"a group has at most {self._max_group_members} members")
        found = await self._accounts.get_users(others)
        unknown = [u for u in others if u not in found]
        if unknown:
            raise ImError(ErrorCode.NOT_FOUND, f"no user {unknown[0]}")
        await self._consent.load(set(others))
        for u in others:
            self._consent.check_add(owner, u)
        roles = {owner: "owner", **{u: "member" for u in others}}
        return await self._committer.create_group(owner, name, roles)

    async def add_members(self, actor: int, gid: int, uids: list[int]) -> None:
        await self._committer.change_members(MemberRequest(actor, gid, "add", uids))

    async def remove_member(self, actor: int, gid: int, uid: int) -> None:
        """Remove ``uid``; removing oneself is leaving."""
        if uid == actor:
            await self.leave_group(actor, gid)
        else:
            await self._committer.change_members(MemberRequest(actor, gid, "remove", [uid]))

    async def leave_group(self, uid: int, gid: int) -> None:
        """``uid`` leaves; when it was the last member, the group's keys are destroyed."""
        await self._committer.change_members(MemberRequest(uid, gid, "leave", []))
        if self._shred is not None:
            conv = group_conv(gid)
            if await self._abandoned(conv):
                await self._shred([conv])
                log.info("group %s has no member left: destroyed its keys", conv)

    async def set_role(self, actor: int, gid: int, uid: int, role: str) -> None:
        await self._committer.change_members(MemberRequest(actor, gid, "role", [uid], role))

    async def leave_all_groups(self, uid: int) -> None:
        """Take ``uid`` out of every group it is in, as if it left each (ownership passes on)."""
        # The device name "" is never a real device: this lists the user's conversations, nothing else.
        left: list[str] = []
        partners: dict[int, str] = {}
        for point in await self._store.sync_points(uid, ""):
            parsed = parse_conv(point.conv)
            if parsed is not None and parsed[0] == "group":
                try:  # not leave_group: the keys of the groups left empty are shredded in one batch below
                    await self._committer.change_members(MemberRequest(uid, parsed[1][0], "leave", []))
                    left.append(point.conv)
                except ImError as exc:  # already gone meanwhile: nothing to leave
                    log.info("leaving %s on account deletion: %s", point.conv, exc.message)
            elif parsed is not None:
                a, b = parsed[1]
                partners[b if a == uid else a] = point.conv
        if self._shred is not None:
            await self._shred_abandoned(left, partners)

    async def _abandoned(self, conv: str) -> bool:
        """Whether group ``conv`` has no member left. Once true it stays true (adding takes a member), so
        reading it after the change that emptied it is no race."""
        return not await self._store.read_marks(conv)  # one read mark per member

    async def _shred_abandoned(self, left: list[str], partners: dict[int, str]) -> None:
        assert self._shred is not None
        abandoned = [conv for conv in left if await self._abandoned(conv)]
        if partners and self._deleted_users is not None:
            gone = await self._deleted_users(list(partners))
            abandoned += [conv for partner, conv in partners.items() if partner in gone]
        if abandoned:
            await self._shred(abandoned)
            log.info("account deletion: destroyed the keys of %d conversations nobody can read", len(abandoned))
