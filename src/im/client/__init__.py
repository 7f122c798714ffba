"""``im.client``: the Python SDK of the im chat server.

Layers, each usable alone (docs/protocol.md is the contract they implement)::

    Client          client.py     asyncio: reconnects, resumes, resends; events(), send(), read(), typing()
      ClientSession session.py    sans-I/O protocol state: frames out, events in, cursors, outbox
      Transport     transport.py  WebSocket / TCP / in-memory byte pipes for encoded frames
    ApiClient       api.py        HTTP: accounts, users, contacts, groups, history, gateway, files
    tls             tls.py        the client TLS context (ca_file, insecure_skip_verify) and its errors

Example::

    from im.client import Client, Message

    async with await Client.login("http://127.0.0.1:8080", "alice", "correct horse", device="laptop") as c:
        await c.send({"text": "hello"}, to=2)
        async for event in c.events():
            if isinstance(event, Message):
                print(event.conv, event.seq, event.body)

Over TLS: ``Client.login("https://chat.example.com", ..., ca_file="ca.crt")`` (``ca_file`` trusts that CA
instead of the system store; leave it out for a publicly signed certificate); the gateway addresses are
then ``wss://`` or ``tls://``.

Event types are the protocol's own frame structs (no copy): ``Message`` is
:class:`im.protocol.frames.Msg` (the sender uid is ``.sender``), ``Ack``, ``AuthOk``, ``Synced``,
``Receipt``, ``TypingEvent``, ``Error``, ``Bye``; plus :class:`SendFailed` and :class:`Disconnected`.
"""

from __future__ import annotations

from im.client.api import (
    ApiClient,
    ApiError,
    Conversation,
    FileInfo,
    Gateway,
    Group,
    HistoryPage,
    Member,
    Tokens,
    User,
)
from im.client.client import Client, ClientClosed, ClientEvent, Disconnected, SendError
from im.client.session import ClientSession, Event, SendFailed
from im.client.tls import PlaintextRefused, TlsError, TlsVerificationError
from im.client.transport import (
    GatewayRefused,
    MemoryTransport,
    TcpTransport,
    Transport,
    TransportClosed,
    WebSocketTransport,
)
from im.protocol.codec import Encoding
from im.protocol.frames import Ack, AuthOk, Bye, Error, Receipt, Send, Synced, TypingEvent
from im.protocol.frames import Msg as Message

__all__ = [
    "Ack",
    "ApiClient",
    "ApiError",
    "AuthOk",
    "Bye",
    "Client",
    "ClientClosed",
    "ClientEvent",
    "ClientSession",
    "Conversation",
    "Disconnected",
    "Encoding",
    "Error",
    "Event",
    "FileInfo",
    "Gateway",
    "GatewayRefused",
    "Group",
    "HistoryPage",
    "Member",
    "MemoryTransport",
    "Message",
    "PlaintextRefused",
    "Receipt",
    "Send",
    "SendError",
    "SendFailed",
    "Synced",
    "TcpTransport",
    "TlsError",
    "TlsVerificationError",
    "Tokens",
    "Transport",
    "TransportClosed",
    "TypingEvent",
    "User",
    "WebSocketTransport",
]
