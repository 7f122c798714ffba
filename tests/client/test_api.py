"""ApiClient: against the real server for the API that exists, with httpx.MockTransport for the refresh
rules and the file calls (their exact request sequence is the point)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest

from im.client import ApiClient, ApiError, Client, FileInfo, Message, Tokens
from tests.client.conftest import PASSWORD
from tests.support.server import ServerProcess


async def _user(server: ServerProcess, name: str) -> ApiClient:
    api = ApiClient(server.http)
    await api.register(name, PASSWORD, display_name=name.title())
    await api.login(name, PASSWORD)
    return api


async def test_accounts_users_contacts(server: ServerProcess) -> None:
    alice, bob = await _user(server, "alice"), await _user(server, "bob")
    async with alice, bob:
        me = await alice.me()
        assert (me.username, me.display_name, me.uid) == ("alice", "Alice", alice.uid)
        assert (await alice.user(bob.uid)).username == "bob"
        assert (await alice.user_by_name("BOB")).uid == bob.uid
        assert [u.username for u in await alice.search_users("b")] == ["bob"]
        with pytest.raises(ApiError) as exc:
            await alice.register("bob", PASSWORD)
        assert (exc.value.status, exc.value.code) == (409, "conflict")
        with pytest.raises(ApiError) as exc:
            await alice.user(9999)
        assert (exc.value.status, exc.value.code) == (404, "not_found")
        await alice.add_contact(bob.uid)
        assert [u.uid for u in await alice.contacts()] == [bob.uid]
        await alice.remove_contact(bob.uid)
        assert await alice.contacts() == []
        old = alice.tokens
        assert old is not None
        new = await alice.refresh()
        assert new.refresh_token != old.refresh_token and (await alice.me()).uid == alice.uid
        gw = await alice.gateway()
        assert gw.ws == server.ws and gw.tcp == f"tcp://127.0.0.1:{server.tcp_port}"
        await alice.logout()
        with pytest.raises(RuntimeError):
            await alice.me()  # no tokens any more
        async with ApiClient(server.http) as stranger:
            with pytest.raises(ApiError) as exc:
                await stranger.login("alice", "wrong password")
        assert exc.value.code == "bad_credentials"


async def test_account_controls_blocks_and_settings(server: ServerProcess) -> None:
    alice, bob = await _user(server, "alice"), await _user(server, "bob")
    other = ApiClient(server.http)
    await other.login("alice", PASSWORD)
    async with alice, bob, other:
        sessions = await alice.sessions()
        assert len(sessions) == 2 and sum(s.current for s in sessions) == 1
        mine = next(s for s in sessions if s.current)
        await alice.change_password(PASSWORD, "another password")
        assert [s.sid for s in await alice.sessions()] == [mine.sid]  # the other session ended
        with pytest.raises(ApiError) as exc:
            await other.me()  # its refresh token died too, so the automatic refresh fails
        assert exc.value.status == 401
        with pytest.raises(ApiError) as exc:
            await alice.revoke_session(sessions[0].sid if sessions[0].sid != mine.sid else sessions[1].sid)
        assert exc.value.status == 404  # already ended
        assert await alice.devices() == []

        assert not await alice.contacts_only()
        await alice.set_contacts_only(True)
        assert await alice.contacts_only()
        await alice.block(bob.uid)
        assert [u.uid for u in await alice.blocks()] == [bob.uid]
        await alice.unblock(bob.uid)
        assert await alice.blocks() == []
        with pytest.raises(ApiError) as exc:
            await alice.unblock(bob.uid)
        assert exc.value.status == 404

        await bob.logout_everywhere()
        assert bob.tokens is None
        await alice.delete_account("another password")
        assert alice.tokens is None
        async with ApiClient(server.http) as again:
            with pytest.raises(ApiError) as exc:
                await again.login("alice", "another password")
        assert exc.value.code == "bad_credentials"


async def test_groups_conversations_and_history_both_directions(server: ServerProcess) -> None:
    alice, bob, carol = [await _user(server, n) for n in ("alice", "bob", "carol")]
    async with alice, bob, carol:
        group = await alice.create_group("friends", members=[bob.uid])
        assert (group.conv, group.owner) == (f"g:{group.gid}", alice.uid)
        await alice.add_members(group.gid, [carol.uid])
        await alice.set_role(group.gid, bob.uid, "admin")
        members = {m.uid: m.role for m in await bob.members(group.gid)}
        assert members == {alice.uid: "owner", bob.uid: "admin", carol.uid: "member"}
        await bob.remove_member(group.gid, carol.uid)
        with pytest.raises(ApiError) as exc:
            await carol.group(group.gid)
        assert exc.value.code == "not_member"
        # Messages through the SDK client, then paged back through the history API.
        async with Client(alice, device="hist") as chat:
            await chat.wait_connected(10)
            for i in range(7):
                await chat.send({"n": i}, conv=group.conv)
        newest = await bob.history(group.conv, limit=3)
        older = await bob.history(group.conv, before=newest.messages[0].seq, limit=3)
        forward = await bob.history(group.conv, after=0, limit=100)
        seqs = [m.seq for m in forward.messages]
        assert seqs == list(range(1, len(seqs) + 1)) and not forward.has_more
        assert [m.seq for m in newest.messages] == seqs[-3:] and newest.has_more
        assert [m.seq for m in older.messages] == seqs[-6:-3]
        assert [m.body for m in forward.messages if m.type == "text"] == [{"n": i} for i in range(7)]
        assert all(isinstance(m, Message) for m in forward.messages)
        assert forward.messages[0].body["event"] == "group_created"
        convs = await bob.conversations()
        assert [(c.conv, c.kind, c.title, c.last_seq) for c in convs] == [(group.conv, "group", "friends", seqs[-1])]
        await bob.leave_group(group.gid)
        assert [m.uid for m in await alice.members(group.gid)] == [alice.uid]


def _tokens(n: int) -> dict[str, object]:
    return {"access_token": f"A{n}", "refresh_token": f"R{n}", "token_type": "bearer", "expires_in": 900, "uid": 1}


async def test_refresh_once_on_401_and_once_for_concurrent_requests() -> None:
    refreshes: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/auth/refresh":
            refreshes.append(json.loads(request.content)["refresh_token"])
            await asyncio.sleep(0.01)  # let the other request reach its 401 meanwhile
            return httpx.Response(200, json=_tokens(len(refreshes) + 1))
        if request.headers["authorization"] == "Bearer A1":
            return httpx.Response(401, json={"code": "auth_failed", "message": "token expired"})
        if request.url.path == "/api/v1/users/2":
            return httpx.Response(401, json={"code": "auth_failed", "message": "revoked"})
        return httpx.Response(200, json={"uid": 1, "username": "a", "display_name": "A", "created_at": 1})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    api = ApiClient("http://x", http=http, tokens=Tokens(**_tokens(1)))  # type: ignore[arg-type]
    users = await asyncio.gather(api.me(), api.user(1))
    assert [u.uid for u in users] == [1, 1]
    assert refreshes == ["R1"]  # one refresh for both: a refresh token is single use
    assert api.access_token == "A2"
    with pytest.raises(ApiError) as exc:  # still 401 after the one refresh: give up
        await api.user(2)
    assert (exc.value.status, exc.value.code) == (401, "auth_failed")
    assert refreshes == ["R1", "R2"]
    await http.aclose()


async def test_upload_skips_content_the_server_has_and_posts_the_rest() -> None:
    stored: dict[str, bytes] = {}
    calls: list[str] = []

    def info(file_id: str, data: bytes, ctype: str, name: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        return {
            "file_id": file_id,
            "sha256": digest,
            "size": len(data),
            "content_type": ctype,
            "width": None,
            "height": None,
            "name": name,
        }

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        path = request.url.path.removeprefix("/api/v1")
        if path.startswith("/files/by-hash/"):
            digest = path.rsplit("/", 1)[1]
            for fid, data in stored.items():
                if hashlib.sha256(data).hexdigest() == digest:
                    return httpx.Response(200, json=info(fid, data, "text/plain", "x"))
            return httpx.Response(404, json={"code": "not_found", "message": "no such file"})
        if request.method == "POST" and path == "/files":
            body = request.content
            assert b'name="file"; filename="note.txt"' in body and b"Content-Type: text/plain" in body
            data = body.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
            fid = f"f{len(stored) + 1}"
            stored[fid] = data
            return httpx.Response(201, json=info(fid, data, "text/plain", "note.txt"))
        if request.method == "GET" and path.startswith("/files/"):
            return httpx.Response(200, content=stored[path.rsplit("/", 1)[1]])
        return httpx.Response(404, json={"code": "not_found", "message": path})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    api = ApiClient("http://x/api/v1", http=http, tokens=Tokens(**_tokens(1)))  # type: ignore[arg-type]
    first = await api.upload(b"hello file", "note.txt")
    assert isinstance(first, FileInfo) and first.sha256 == hashlib.sha256(b"hello file").hexdigest()
    again = await api.upload(b"hello file", "note.txt")
    assert again.file_id == first.file_id
    assert [c.split()[0] for c in calls] == ["GET", "POST", "GET"]  # the second upload sent no content
    assert await api.download(first.file_id) == b"hello file"
    await http.aclose()


async def test_upload_and_download_against_the_server(server: ServerProcess, tmp_path: Path) -> None:
    """The real file endpoints, through the SDK."""
    api = await _user(server, "alice")
    async with api:
        paths = (await api.http.get(f"{api.base_url}/openapi.json")).json()["paths"]
        assert "/api/v1/files" in paths
        content = b"plain bytes, nothing an image sniffer would claim\n" * 100
        path = tmp_path / "notes.bin"
        path.write_bytes(content)
        info = await api.upload(path)
        assert info.size == len(content) and info.sha256 == hashlib.sha256(content).hexdigest()
        assert (await api.upload(content, "pic.bin")).file_id == info.file_id
        assert await api.download(info.file_id) == content
