"""The membership rules (im.core.membership) as a pure function: no event loop, no store call."""

from __future__ import annotations

from pathlib import Path

import pytest

from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.consent import Consent
from im.core.membership import MemberPlan, MemberRequest, plan_member_change
from im.model.chat import ConversationState
from im.model.errors import ErrorCode, ImError

OWNER, ADMIN, MEMBER, OTHER, NEW = 1, 2, 3, 4, 9


@pytest.fixture
def consent(tmp_path: Path) -> Consent:
    """Consent with nothing cached (every check passes); its stores are never opened."""
    db = SqliteDatabase(tmp_path / "unused.db")
    return Consent(SqliteAccountStore(db), SqliteChatStore(db))


def group() -> ConversationState:
    return ConversationState("g:5", "group", 10, {OWNER: "owner", ADMIN: "admin", MEMBER: "member", OTHER: "member"})


def plan(consent: Consent, req: MemberRequest, *, max_members: int = 100) -> MemberPlan:
    return plan_member_change(group(), req, consent=consent, max_members=max_members)


def refusal(consent: Consent, req: MemberRequest, **kw: int) -> ErrorCode:
    with pytest.raises(ImError) as refused:
        plan(consent, req, **kw)
    return refused.value.code


def test_adding(consent: Consent) -> None:
    got = plan(consent, MemberRequest(ADMIN, 5, "add", [NEW, MEMBER, NEW]))
    assert got.changes == [(NEW, "member")]  # once, and not those already in
    assert got.event == {"event": "members_added", "uids": [NEW], "by": ADMIN}
    assert plan(consent, MemberRequest(OWNER, 5, "add", [MEMBER])).changes == []  # nothing to do
    assert refusal(consent, MemberRequest(MEMBER, 5, "add", [NEW])) is ErrorCode.FORBIDDEN
    assert refusal(consent, MemberRequest(OWNER, 5, "add", [NEW]), max_members=4) is ErrorCode.INVALID
    assert refusal(consent, MemberRequest(NEW, 5, "add", [OTHER])) is ErrorCode.NOT_MEMBER


def test_removing(consent: Consent) -> None:
    assert plan(consent, MemberRequest(ADMIN, 5, "remove", [MEMBER])).changes == [(MEMBER, None)]
    assert plan(consent, MemberRequest(OWNER, 5, "remove", [ADMIN])).event == {
        "event": "member_removed",
        "uid": ADMIN,
        "by": OWNER,
    }
    assert refusal(consent, MemberRequest(ADMIN, 5, "remove", [OWNER])) is ErrorCode.FORBIDDEN
    assert refusal(consent, MemberRequest(MEMBER, 5, "remove", [OTHER])) is ErrorCode.FORBIDDEN
    assert refusal(consent, MemberRequest(OWNER, 5, "remove", [NEW])) is ErrorCode.NOT_FOUND


def test_an_owner_who_leaves_hands_the_group_to_the_first_admin(consent: Consent) -> None:
    got = plan(consent, MemberRequest(OWNER, 5, "leave", []))
    assert got.changes == [(OWNER, None), (ADMIN, "owner")]
    assert got.event == {"event": "member_left", "uid": OWNER, "new_owner": ADMIN}
    assert plan(consent, MemberRequest(MEMBER, 5, "leave", [])).changes == [(MEMBER, None)]


def test_roles_are_the_owners_to_change(consent: Consent) -> None:
    assert plan(consent, MemberRequest(OWNER, 5, "role", [MEMBER], "admin")).changes == [(MEMBER, "admin")]
    assert refusal(consent, MemberRequest(ADMIN, 5, "role", [MEMBER], "admin")) is ErrorCode.FORBIDDEN
    assert refusal(consent, MemberRequest(OWNER, 5, "role", [MEMBER], "owner")) is ErrorCode.INVALID
    assert refusal(consent, MemberRequest(OWNER, 5, "role", [OWNER], "member")) is ErrorCode.INVALID
    assert refusal(consent, MemberRequest(OWNER, 5, "role", [NEW], "admin")) is ErrorCode.NOT_FOUND


def test_no_group_and_a_direct_conversation_are_not_found(consent: Consent) -> None:
    with pytest.raises(ImError) as refused:
        plan_member_change(None, MemberRequest(OWNER, 5, "leave", []), consent=consent, max_members=10)
    assert refused.value.code is ErrorCode.NOT_FOUND
    direct = ConversationState("d:1:2", "direct", 3, {1: "member", 2: "member"})
    with pytest.raises(ImError) as refused:
        plan_member_change(direct, MemberRequest(1, 5, "leave", []), consent=consent, max_members=10)
    assert refused.value.code is ErrorCode.NOT_FOUND


def test_the_state_is_not_changed(consent: Consent) -> None:
    state = group()
    before = dict(state.members)
    plan_member_change(state, MemberRequest(OWNER, 5, "leave", []), consent=consent, max_members=10)
    assert state.members == before and state.last_seq == 10
