"""The SDK's public names are pinned: adding or removing one is a decision, not an accident."""

from __future__ import annotations

import doctest

import im.client
import im.client.session
import im.client.transport


def test_all_is_pinned() -> None:
    assert sorted(im.client.__all__) == [
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
    for name in im.client.__all__:
        assert getattr(im.client, name) is not None


def test_docstring_examples_run() -> None:
    for module in (im.client.session, im.client.transport):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
