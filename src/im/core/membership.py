"""Who may change a group's membership, and what each change does (docs/protocol.md, groups).

No I/O: :func:`plan_member_change` judges one request against a group's state as the committer holds it
in its pass, and says which members change and which ``system`` event records it in the log. The
committer assigns the seq and writes it; :class:`~im.core.groups.Groups` is the API in front.

The rules:

- ``add``: by the owner or an admin; users already in are skipped, each user added must accept the
  actor (:meth:`Consent.check_add`), and the group stays within its size limit;
- ``remove``: the owner removes anyone but itself, an admin removes members; nobody removes the owner;
- ``leave``: anyone; an owner who leaves hands ownership to the first admin, else the first member (by
  uid);
- ``role``: the owner makes a member an admin or an admin a member; the owner's role does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from im.core.consent import Consent
from im.model.chat import ConversationState
from im.model.errors import ErrorCode, ImError


@dataclass(frozen=True, slots=True)
class MemberRequest:
    """One membership change as asked: ``actor`` does ``op`` on group ``gid``."""

    actor: int
    gid: int
    op: str  # "add" | "remove" | "leave" | "role"
    uids: list[int]  # add: the users to add; remove, role: the one target; leave: empty
    role: str | None = None  # role: the new role


@dataclass(frozen=True, slots=True)
class MemberPlan:
    """What a request changes: (uid, new role or None for gone) in order, and the event for the log."""

    changes: list[tuple[int, str | None]]
    event: dict[str, object]


def plan_member_change(
    state: ConversationState | None, req: MemberRequest, *, consent: Consent, max_members: int
) -> MemberPlan:
    """Judge ``req`` against the group's ``state`` (None: no such group); raise the refusal as ImError.
    An empty ``changes`` means nothing to do (adding only users already in). Reads ``state``, never
    changes it; consent must have loaded the users being added."""
    if state is None or state.kind != "group":
        raise ImError(ErrorCode.NOT_FOUND, f"no group {req.gid}")
    actor_role = state.members.get(req.actor)
    if actor_role is None:
        raise ImError(ErrorCode.NOT_MEMBER, f"not a member of group {req.gid}")
    changes: list[tuple[int, str | None]]
    event: dict[str, object]
    if req.op == "add":
        if actor_role not in ("owner", "admin"):
            raise ImError(ErrorCode.FORBIDDEN, "only the owner and admins add members")
        fresh = [u for u in dict.fromkeys(req.uids) if u not in state.members]
        for u in fresh:
            consent.check_add(req.actor, u)
        if len(state.members) + len(fresh) > max_members:
            raise ImError(ErrorCode.INVALID, f"a group has at most {max_members} members")
        changes = [(u, "member") for u in fresh]
        event = {"event": "members_added", "uids": fresh, "by": req.actor}
    elif req.op == "remove":
        target = req.uids[0]
        role = state.members.get(target)
        if role is None:
            raise ImError(ErrorCode.NOT_FOUND, f"user {target} is not a member")
        if actor_role == "member" or role == "owner" or (actor_role == "admin" and role == "admin"):
            raise ImError(
                ErrorCode.FORBIDDEN,
                f"a{'n' if actor_role != 'member' else ''} {actor_role} "
                f"cannot remove a{'n' if role != 'member' else ''} {role}",
            )
        changes = [(target, None)]
        event = {"event": "member_removed", "uid": target, "by": req.actor}
    elif req.op == "leave":
        changes = [(req.actor, None)]
        event = {"event": "member_left", "uid": req.actor}
        if actor_role == "owner":
            heirs = sorted(
                (u for u in state.members if u != req.actor),
                key=lambda u: (state.members[u] != "admin", u),
            )
            if heirs:
                changes.append((heirs[0], "owner"))
                event["new_owner"] = heirs[0]
    else:  # role
        target = req.uids[0]
        if actor_role != "owner":
            raise ImError(ErrorCode.FORBIDDEN, "only the owner changes roles")
        if req.role not in ("admin", "member"):
            raise ImError(ErrorCode.INVALID, "role must be 'admin' or 'member'")
        if state.members.get(target) in (None, "owner"):
            raise ImError(
                ErrorCode.INVALID if target in state.members else ErrorCode.NOT_FOUND,
                f"cannot change the role of user {target}",
            )
        changes = [(target, req.role)]
        event = {"event": "role_changed", "uid": target, "role": req.role, "by": req.actor}
    return MemberPlan(changes, event)
