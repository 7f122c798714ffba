"""The SDK side of the chat client: logging in, the connection, and the HTTP calls the screens need.

It uses only the public API of :mod:`im.client` (``ApiClient`` for HTTP, ``Client`` for the gateway)
and knows nothing of Textual, so the app can be driven against a real server or a fake of this class.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from im.client import ApiClient, ApiError, Client, ClientEvent, Conversation, Group, HistoryPage, TlsError, User

__all__ = ["ChatService", "LoginError"]

PAGE = 50  # history page size


class LoginError(Exception):
    """Logging in or registering failed; the message is fit to show."""


class ChatService:
    """One logged-in user: an :class:`ApiClient` and a started :class:`Client` (reconnecting on its own).

    Build with :meth:`connect`; close with :meth:`close`.
    """

    def __init__(self, api: ApiClient, client: Client, username: str) -> None:
        self.api = api
        self.client = client
        self.username = username
        self._users: dict[int, User] = {}
        self._closed = False

    @classmethod
    async def connect(
        cls,
        server: str,
        username: str,
        password: str,
        *,
        register: bool = False,
        device: str = "im-chat",
        transport: Literal["ws", "tcp"] = "ws",
        ca_file: str | os.PathLike[str] | None = None,
        insecure_skip_verify: bool = False,
        **client_options: Any,
    ) -> ChatService:
        """Log in (registering first when asked) and start the gateway connection in the background;
        returns without waiting for it (the events say when it is up). ``ca_file`` and
        ``insecure_skip_verify`` are the SDK's TLS options (:class:`~im.client.ApiClient`)."""
        try:
            api = ApiClient(server, ca_file=ca_file, insecure_skip_verify=insecure_skip_verify)
        except (OSError, ValueError) as exc:  # a missing or unreadable CA file
            raise LoginError(str(exc)) from exc
        try:
            if register:
                await api.register(username, password)
            await api.login(username, password)
            client = Client(api, device=device, transport=transport, **client_options)
            client.start()
        except ApiError as exc:
            await api.aclose()
            raise LoginError(_login_message(exc, register)) from exc
        except TlsError as exc:  # a refused certificate: OpenSSL's reason and what was trusted
            await api.aclose()
            raise LoginError(str(exc)) from exc
        except Exception as exc:  # network trouble: say so instead of a traceback
            await api.aclose()
            raise LoginError(f"cannot reach {server}: {exc}") from exc
        return cls(api, client, username)

    @property
    def uid(self) -> int:
        return self.api.uid

    @property
    def device(self) -> str:
        return self.client.device

    def events(self) -> AsyncIterator[ClientEvent]:
        return self.client.events()

    # --- HTTP -----------------------------------------------------------------------------------------

    async def conversations(self) -> list[Conversation]:
        return await self.api.conversations()

    async def history(self, conv: str, *, before: int | None = None, after: int | None = None) -> HistoryPage:
        """A page of stored messages; an empty one for a direct conversation not created yet."""
        try:
            return await self.api.history(conv, before=before, after=after, limit=PAGE)
        except ApiError as exc:
            if exc.status == 404 and conv.startswith("d:"):
                return HistoryPage(messages=[], has_more=False)
            raise

    async def user(self, uid: int) -> User:
        user = self._users.get(uid)
        if user is None:
            user = self._users[uid] = await self.api.user(uid)
        return user

    async def user_by_name(self, username: str) -> User:
        try:
            user = await self.api.user_by_name(username)
        except ApiError as exc:
            if exc.status == 404:
                raise LookupError(f"no user named {username!r}") from exc
            raise
        self._users[user.uid] = user
        return user

    async def create_group(self, name: str, member_names: list[str]) -> Group:
        uids = [(await self.user_by_name(n)).uid for n in member_names]
        return await self.api.create_group(name, members=[u for u in uids if u != self.uid])

    # --- gateway --------------------------------------------------------------------------------------

    def new_cmid(self) -> str:
        return uuid.uuid4().hex

    def post(self, conv: str, body: Any, cmid: str, *, peer: int | None = None) -> None:
        """Queue a send; its ``Ack`` or ``SendFailed`` arrives among the events. Raises ``ClientClosed``.

        A direct message goes by the peer's uid: the server refuses ``conv: "d:.."`` for a direct
        conversation that has no message yet (``not_found: no user N``, though docs/protocol.md section 6
        says it creates it), while ``to`` creates it; both name the same conversation.
        """
        if peer is not None:
            self.client.post(body, to=peer, cmid=cmid)
        else:
            self.client.post(body, conv=conv, cmid=cmid)

    def read(self, conv: str, seq: int) -> None:
        self.client.read(conv, seq)

    def typing(self, conv: str) -> None:
        self.client.typing(conv)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.client.close()
        finally:
            await self.api.aclose()


def _login_message(exc: ApiError, register: bool) -> str:
    if exc.code == "bad_credentials":
        return "wrong user name or password"
    if register and exc.code == "conflict":
        return "that user name is taken"
    return f"{'registering' if register else 'logging in'} failed: {exc.message or exc.code}"
