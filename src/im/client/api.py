"""The HTTP API (docs/protocol.md sections 2, 3 and 18) as typed async calls over ``httpx``.

:class:`ApiClient` keeps the session's tokens. An access token that the server refuses (401
``auth_failed``) is refreshed once and the request repeated; concurrent refreshes are serialised, since a
refresh token is single use and presenting one twice revokes the whole session (section 2).

Example::

    async with ApiClient("http://127.0.0.1:8080") as api:
        await api.register("alice", "correct horse")
        await api.login("alice", "correct horse")
        bob = await api.user_by_name("bob")
        group = await api.create_group("friends", members=[bob.uid])
        page = await api.history(group.conv, after=0, limit=50)
        info = await api.upload(b"...png bytes...", "cat.png")
        assert await api.download(info.file_id) == b"...png bytes..."

Every error answer raises :class:`ApiError` with the status and the body's ``code`` and ``message``;
network failures raise ``httpx.TransportError`` unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import ssl
import time
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx
import msgspec

from im.client.tls import TlsVerificationError, client_context, is_secure, trust_of, verification_error, warn_insecure
from im.protocol.frames import Msg

__all__ = [
    "ApiClient",
    "ApiError",
    "Conversation",
    "Device",
    "FileInfo",
    "Gateway",
    "Group",
    "HistoryPage",
    "Member",
    "SessionInfo",
    "Tokens",
    "User",
]

T = TypeVar("T")
API_PREFIX = "/api/v1"


class User(msgspec.Struct, frozen=True):
    uid: int
    username: str
    display_name: str
    created_at: int  # seconds


class Tokens(msgspec.Struct, frozen=True):
    access_token: str
    refresh_token: str
    expires_in: int
    uid: int
    token_type: str = "bearer"


class Group(msgspec.Struct, frozen=True):
    gid: int
    conv: str
    name: str
    owner: int
    created_at: int  # milliseconds


class Member(msgspec.Struct, frozen=True):
    uid: int
    role: str  # "owner" | "admin" | "member"


class Conversation(msgspec.Struct, frozen=True):
    conv: str
    kind: str  # "direct" | "group"
    title: str
    unread: int
    last_seq: int
    read_seq: int
    last_message: Msg | None = None
    peer: int | None = None


class HistoryPage(msgspec.Struct, frozen=True):
    messages: list[Msg]  # ascending seq
    has_more: bool


class Gateway(msgspec.Struct, frozen=True):
    """Where to connect: ``ws`` URL (``ws://`` or, with TLS, ``wss://``), ``tcp`` address (``tcp://host:port``
    or, with TLS, ``tls://host:port``; None when off), node name."""

    ws: str
    node: str
    tcp: str | None = None


class FileInfo(msgspec.Struct, frozen=True):
    file_id: str
    sha256: str
    size: int
    content_type: str
    width: int | None = None
    height: int | None = None
    name: str | None = None


class SessionInfo(msgspec.Struct, frozen=True):
    """One live login session of the account (times in seconds since the epoch)."""

    sid: str
    created_at: int
    last_used: int
    expires_at: int
    current: bool


class Device(msgspec.Struct, frozen=True):
    device: str
    last_active: int  # seconds since the epoch; 0: never synced
    online: bool


class _Settings(msgspec.Struct):
    contacts_only: bool


class ApiError(Exception):
    """An HTTP error answer: ``status``, and ``code``/``message`` from the body (section 13);
    ``retry_after``: seconds to wait before trying again (429 and 503 answers that say), else None."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class _ErrorBody(msgspec.Struct):
    code: str = "internal"
    message: str = ""
    retry_after: float | None = None


def _error(r: httpx.Response) -> ApiError:
    try:
        body = msgspec.json.decode(r.content, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        body = _ErrorBody(code=f"http_{r.status_code}", message=r.text[:200])
    retry_after = body.retry_after
    header = r.headers.get("retry-after", "")
    if retry_after is None and header.isdigit():
        retry_after = float(header)
    return ApiError(r.status_code, body.code, body.message, retry_after)


class ApiClient:
    """A client of one server's HTTP API. ``base_url`` is the server root (``http://host:port``,
    ``https://host``) or the API root (``.../api/v1``). Pass ``http`` to use your own ``httpx.AsyncClient``
    (e.g. one built on ``httpx.MockTransport`` in tests); otherwise one is created and closed with this
    client.

    TLS (``https://``): the certificate and host name are verified against the system CA store, or only
    against ``ca_file`` (a PEM file of CAs) when given; ``ssl_context`` is your own context instead;
    ``insecure_skip_verify=True`` verifies nothing and logs a warning. A refused certificate raises
    :class:`~im.client.tls.TlsVerificationError`. A :class:`~im.client.Client` built on this client uses
    the same options for the gateway. No redirect is followed (none can lead from https to http).
    """

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        tokens: Tokens | None = None,
        timeout: float = 10.0,
        refresh_margin: float = 0.2,
        ca_file: str | PathLike[str] | None = None,
        insecure_skip_verify: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith(API_PREFIX) else root + API_PREFIX
        if ssl_context is not None and (ca_file is not None or insecure_skip_verify):
            raise ValueError("give ssl_context or ca_file/insecure_skip_verify, not both")
        if http is not None and (ssl_context is not None or ca_file is not None or insecure_skip_verify):
            raise ValueError("TLS options go to your own httpx.AsyncClient (verify=...) when you pass http=")
        #: TLS options, also used by a Client built on this ApiClient for the gateway connection.
        self.ca_file = ca_file
        self.insecure_skip_verify = insecure_skip_verify
        self.ssl_context = ssl_context
        if is_secure(self.base_url) and http is None:
            if self.ssl_context is None:
                self.ssl_context = client_context(ca_file=ca_file, insecure_skip_verify=insecure_skip_verify)
            warn_insecure(self.ssl_context, self.base_url)
        self._own_http = http is None
        if http is None:
            verify: ssl.SSLContext | bool = self.ssl_context if self.ssl_context is not None else True
            http = httpx.AsyncClient(timeout=timeout, verify=verify, follow_redirects=False)
        self.http = http
        self.tokens = tokens
        self.refresh_margin = refresh_margin
        self._expires_at = time.monotonic() + tokens.expires_in if tokens is not None else 0.0
        self._refresh_lock = asyncio.Lock()

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    @property
    def uid(self) -> int:
        if self.tokens is None:
            raise RuntimeError("not logged in")
        return self.tokens.uid

    @property
    def access_token(self) -> str:
        if self.tokens is None:
            raise RuntimeError("not logged in")
        return self.tokens.access_token

    # --- plumbing -------------------------------------------------------------------------------------

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.http.request(method, url, **kwargs)
        except httpx.ConnectError as exc:
            cause = verification_error(exc)
            if cause is None:
                raise
            trust = trust_of(self.ssl_context, self.ca_file) if self.ssl_context is not None else "your http client"
            raise TlsVerificationError(self.base_url, cause.verify_message or str(cause), trust) from exc

    async def _request(
        self, method: str, path: str, *, auth: bool = True, expect: tuple[int, ...] = (200,), **kwargs: Any
    ) -> httpx.Response:
        url = self.base_url + path
        if not auth:
            r = await self._send(method, url, **kwargs)
        else:
            token = self.access_token
            r = await self._send(method, url, headers={"Authorization": f"Bearer {token}"}, **kwargs)
            if r.status_code == 401 and _error(r).code == "auth_failed":
                await self._refresh_after(token)  # once: a second 401 is the caller's to handle
                headers = {"Authorization": f"Bearer {self.access_token}"}
                r = await self._send(method, url, headers=headers, **kwargs)
        if r.status_code not in expect:
            raise _error(r)
        return r

    async def _get(self, path: str, typ: type[T], **params: Any) -> T:
        r = await self._request("GET", path, params={k: v for k, v in params.items() if v is not None})
        return msgspec.json.decode(r.content, type=typ)

    def _set_tokens(self, r: httpx.Response) -> Tokens:
        tokens = msgspec.json.decode(r.content, type=Tokens)
        self.tokens = tokens
        self._expires_at = time.monotonic() + tokens.expires_in
        return tokens

    async def _refresh_after(self, used: str) -> None:
        async with self._refresh_lock:
            if self.tokens is not None and self.tokens.access_token != used:
                return  # another request refreshed meanwhile
            await self._refresh_now()

    async def _refresh_now(self) -> Tokens:
        if self.tokens is None:
            raise RuntimeError("not logged in")
        r = await self._request("POST", "/auth/refresh", auth=False, json={"refresh_token": self.tokens.refresh_token})
        return self._set_tokens(r)

    # --- accounts -------------------------------------------------------------------------------------

    async def register(self, username: str, password: str, display_name: str | None = None) -> User:
        body: dict[str, Any] = {"username": username, "password": password}
        if display_name is not None:
            body["display_name"] = display_name
        r = await self._request("POST", "/auth/register", auth=False, json=body, expect=(201,))
        return msgspec.json.decode(r.content, type=User)

    async def login(self, username: str, password: str) -> Tokens:
        """Log in (a new session); the tokens are kept for the following calls."""
        body = {"username": username, "password": password}
        return self._set_tokens(await self._request("POST", "/auth/login", auth=False, json=body))

    async def refresh(self) -> Tokens:
        """Trade the refresh token for new tokens (the old refresh token stops working)."""
        async with self._refresh_lock:
            return await self._refresh_now()

    async def ensure_fresh(self) -> str:
        """Refresh when the access token is within ``refresh_margin`` of its lifetime of expiring; return
        the access token to use (e.g. in the gateway ``auth`` frame)."""
        tokens = self.tokens
        if tokens is None:
            raise RuntimeError("not logged in")
        if time.monotonic() >= self._expires_at - self.refresh_margin * tokens.expires_in:
            await self._refresh_after(tokens.access_token)
        return self.access_token

    async def logout(self) -> None:
        await self._request("POST", "/auth/logout", expect=(204,))
        self.tokens = None

    # --- users and contacts ---------------------------------------------------------------------------

    async def me(self) -> User:
        return await self._get("/users/me", User)

    async def user(self, uid: int) -> User:
        return await self._get(f"/users/{uid}", User)

    async def user_by_name(self, username: str) -> User:
        return await self._get(f"/users/by-name/{username}", User)

    async def search_users(self, q: str, limit: int | None = None) -> list[User]:
        return await self._get("/users", list[User], q=q, limit=limit)

    async def contacts(self) -> list[User]:
        return await self._get("/contacts", list[User])

    async def add_contact(self, uid: int) -> None:
        await self._request("PUT", f"/contacts/{uid}", expect=(204,))

    async def remove_contact(self, uid: int) -> None:
        await self._request("DELETE", f"/contacts/{uid}", expect=(204,))

    # --- account controls and consent (section 18) --------------------------------------------------------

    async def change_password(self, current: str, new: str) -> None:
        """Set a new password; every other session of the account ends (this one goes on)."""
        body = {"current_password": current, "new_password": new}
        await self._request("POST", "/account/password", json=body, expect=(204,))

    async def sessions(self) -> list[SessionInfo]:
        return await self._get("/account/sessions", list[SessionInfo])

    async def revoke_session(self, sid: str) -> None:
        await self._request("DELETE", f"/account/sessions/{sid}", expect=(204,))

    async def logout_everywhere(self) -> None:
        """End every session of the account, this one included (the tokens are dropped)."""
        await self._request("POST", "/account/logout-all", expect=(204,))
        self.tokens = None

    async def devices(self) -> list[Device]:
        return await self._get("/account/devices", list[Device])

    async def delete_account(self, password: str) -> None:
        """Delete the account for good (section 18); the tokens are dropped."""
        await self._request("POST", "/account/delete", json={"password": password}, expect=(204,))
        self.tokens = None

    async def blocks(self) -> list[User]:
        return await self._get("/blocks", list[User])

    async def block(self, uid: int) -> None:
        await self._request("PUT", f"/blocks/{uid}", expect=(204,))

    async def unblock(self, uid: int) -> None:
        await self._request("DELETE", f"/blocks/{uid}", expect=(204,))

    async def contacts_only(self) -> bool:
        """Whether only your contacts may start a direct conversation with you."""
        return (await self._get("/users/me/settings", _Settings)).contacts_only

    async def set_contacts_only(self, value: bool) -> None:
        await self._request("PUT", "/users/me/settings", json={"contacts_only": value})

    # --- groups ---------------------------------------------------------------------------------------

    async def create_group(self, name: str, members: list[int] | tuple[int, ...] = ()) -> Group:
        r = await self._request("POST", "/groups", json={"name": name, "members": list(members)}, expect=(201,))
        return msgspec.json.decode(r.content, type=Group)

    async def group(self, gid: int) -> Group:
        return await self._get(f"/groups/{gid}", Group)

    async def members(self, gid: int) -> list[Member]:
        return await self._get(f"/groups/{gid}/members", list[Member])

    async def add_members(self, gid: int, uids: list[int] | tuple[int, ...]) -> None:
        await self._request("POST", f"/groups/{gid}/members", json={"uids": list(uids)}, expect=(204,))

    async def remove_member(self, gid: int, uid: int) -> None:
        await self._request("DELETE", f"/groups/{gid}/members/{uid}", expect=(204,))

    async def leave_group(self, gid: int) -> None:
        await self._request("POST", f"/groups/{gid}/leave", expect=(204,))

    async def set_role(self, gid: int, uid: int, role: Literal["admin", "member"]) -> None:
        await self._request("PUT", f"/groups/{gid}/members/{uid}/role", json={"role": role}, expect=(204,))

    # --- conversations --------------------------------------------------------------------------------

    async def conversations(self) -> list[Conversation]:
        """Most recently active first."""
        return await self._get("/conversations", list[Conversation])

    async def history(
        self, conv: str, *, after: int | None = None, before: int | None = None, limit: int | None = None
    ) -> HistoryPage:
        """A page of stored messages, ascending by seq (section 18, "History paging"): the newest page by
        default; ``before=B`` pages backwards, ``after=A`` forwards."""
        return await self._get(f"/conversations/{conv}/messages", HistoryPage, after=after, before=before, limit=limit)

    async def gateway(self) -> Gateway:
        """The gateway to connect to (raises ``ApiError`` 503 ``unavailable`` when none is up)."""
        return await self._get("/gateway", Gateway)

    # --- files ----------------------------------------------------------------------------------------

    async def upload(
        self, data: bytes | str | PathLike[str], filename: str | None = None, content_type: str | None = None
    ) -> FileInfo:
        """Store a file and return its info; content the server already holds is not uploaded again.

        ``data`` is the content or a path to read it from. The server is first asked for the content's
        SHA-256 (``GET /files/by-hash/{sha256}``); only a 404 leads to the multipart upload.
        """
        if isinstance(data, bytes):
            content = data
        else:
            path = Path(data)
            content = await asyncio.to_thread(path.read_bytes)
            filename = filename or path.name
        filename = filename or "file"
        if content_type is None:
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        digest = hashlib.sha256(content).hexdigest()
        try:
            return await self._get(f"/files/by-hash/{digest}", FileInfo)
        except ApiError as exc:
            if exc.status != 404:
                raise
        r = await self._request("POST", "/files", files={"file": (filename, content, content_type)}, expect=(200, 201))
        return msgspec.json.decode(r.content, type=FileInfo)

    async def file_info(self, file_id: str) -> FileInfo:
        return await self._get(f"/files/{file_id}/info", FileInfo)

    async def download(self, file_id: str) -> bytes:
        r = await self._request("GET", f"/files/{file_id}")
        return r.content
