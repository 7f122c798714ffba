"""RFC 6455 hard cases and fragment floods against a real ``im serve``, over a raw socket.

The unit tests (tests/test_ws_protocol.py) cover the same cases on the sans-I/O protocol; these
check that the running server keeps them end to end: each attack gets its close code, the server stays
small, and a logged-in bystander's sends are acked throughout.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.client import Account, ChatClient, register
from tests.support.server import ServerProcess, running_server
from tests.test_ws_protocol import frame

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(Path(tmp_path_factory.mktemp("wsconf")) / "data") as proc:
        yield proc


@pytest.fixture
async def bystander(server: ServerProcess) -> AsyncIterator[tuple[ChatClient, Account]]:
    """A logged-in user with a peer to write to; its sends must be acked whatever attackers do."""
    tag = os.urandom(3).hex()
    me, peer = await register(server.api, f"by{tag}"), await register(server.api, f"pe{tag}")
    client = ChatClient(server.ws, me, "phone")
    assert (await client.connect())["t"] == "auth_ok"
    yield client, peer
    await client.close()


async def assert_unaffected(bystander: tuple[ChatClient, Account], n: int = 3) -> None:
    client, peer = bystander
    for i in range(n):
        ack = await client.send(f"still here {i}", to=peer.uid)
        assert ack is not None and ack["seq"] >= 1, client.errors[-1:]


# --- a raw WebSocket client --------------------------------------------------------------------------


def rss(server: ServerProcess) -> int:
    """The server process's resident memory in bytes."""
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Raw:
    """A blocking socket that has done the opening handshake; reads unmasked server frames."""

    def __init__(self, server: ServerProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.ws_port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101 "), head

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        return data

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            self.buf += self._recv()

    def read_frame(self) -> tuple[int, bytes]:
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80 and b0 & 0x80, "server frames are final and unmasked"
        n, head = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, head = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            self._need(10)
            n, head = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(head + n)
        payload, self.buf = self.buf[head : head + n], self.buf[head + n :]
        return b0 & 0x0F, payload

    def read_until_close(self) -> tuple[int, list[tuple[int, bytes]]]:
        """Frames until the close frame; its code and what came before it. The server then ends the TCP
        connection (section 7.1.1)."""
        before: list[tuple[int, bytes]] = []
        while True:
            op, payload = self.read_frame()
            if op == 0x8:
                code = int.from_bytes(payload[:2], "big")
                self.sock.settimeout(10)
                assert self.buf == b"" and self.sock.recv(1) == b"", "nothing after the close frame"
                self.sock.close()
                return code, before
            before.append((op, payload))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


# --- RFC 6455 cases (the Autobahn suite's sections in brackets) -----------------------------------------

PING = b'{"t":"ping","id":7}'
CASES = {
    "reserved bit RSV1 [3.x]": frame(0x1, PING, rsv=4),
    "reserved bits on a ping [3.x]": frame(0x9, b"x", rsv=7),
    "reserved data opcode 0x3 [4.1.1]": frame(0x3, b"x"),
    "reserved control opcode 0xb [4.2.1]": frame(0xB, b"x"),
    "unmasked client frame": frame(0x1, PING, mask=None),
    "ping payload of 126 bytes [2.5]": frame(0x9, b"p" * 126),
    "fragmented ping [5.1]": frame(0x9, b"p", fin=False) + frame(0x0, b"q"),
    "continuation without a start [5.9]": frame(0x0, b"x"),
    "new message inside a fragmented one [5.18]": frame(0x1, b"a", fin=False) + frame(0x1, b"b"),
    "close with a 1-byte payload [7.3.2]": frame(0x8, b"\x03"),
    "64-bit length with the top bit set": bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + b"mask",
    "16-bit length for a 5-byte payload": frame(0x2, b"12345", length_form=16),
    "64-bit length for a 300-byte payload": frame(0x2, b"x" * 300, length_form=64),
}
CASES.update(
    {
        f"close code {c} [7.9]": frame(0x8, c.to_bytes(2, "big"))
        for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000)
    }
)


@pytest.mark.parametrize("case", list(CASES))
def test_protocol_errors_close_1002(server: ServerProcess, case: str) -> None:
    ws = Raw(server)
    ws.send(frame(0x1, PING) + CASES[case] + frame(0x1, PING))
    code, before = ws.read_until_close()
    assert code == 1002, case
    assert before == [(0x1, b'{"t":"pong","id":7}')]  # the frame before the fault, not the one after


@pytest.mark.parametrize(
    "data",
    [
        frame(0x1, b'{"t":"ping","x":"caf\xe9"}'),
        frame(0x1, b'{"t":"ping","x":"\xed\xa0\x80"}'),  # an encoded surrogate
        frame(0x8, b"\x03\xe8bad \xff"),  # close reason [7.5.1]
    ],
)
def test_invalid_utf8_closes_1007(server: ServerProcess, data: bytes) -> None:
    ws = Raw(server)
    ws.send(data)
    assert ws.read_until_close() == (1007, [])


def test_invalid_utf8_in_an_unfinished_fragment_fails_fast(server: ServerProcess) -> None:  # [6.4.1]
    ws = Raw(server)
    ws.send(frame(0x1, b'{"t":"ping","x":"\xce\xba\xed\xa0\x80', fin=False))  # the message never ends
    assert ws.read_until_close() == (1007, [])


def test_fragments_interleaved_with_control_frames(server: ServerProcess) -> None:  # [5.6-5.20, 6.2]
    ws = Raw(server)
    text = '{"t":"ping","id":9,"x":"é𝄞"}'.encode()
    cut = text.index("𝄞".encode()) + 2  # inside the four bytes of U+1D11E
    ws.send(
        frame(0x1, text[:5], fin=False)
        + frame(0x9, b"one")
        + frame(0x0, text[5:cut], fin=False)
        + frame(0xA, b"unsolicited")
        + frame(0x9, b"")
        + frame(0x0, text[cut:])
    )
    # Pongs come in ping order; the reply to the message may come before them (one read, one write).
    got = [ws.read_frame() for _ in range(3)]
    assert [f for f in got if f[0] == 0xA] == [(0xA, b"one"), (0xA, b"")]
    assert (0x1, b'{"t":"pong","id":9}') in got
    ping = bytes(range(125))
    ws.send(frame(0x9, ping))
    assert ws.read_frame() == (0xA, ping)  # the payload echoed whole [2.4]
    ws.send(frame(0x8, (4999).to_bytes(2, "big") + "fin ✓".encode()))  # a valid application code [7.7]
    assert ws.read_until_close() == (4999, [])


def test_too_many_fragments_closes_1009(server: ServerProcess) -> None:
    ws = Raw(server)
    ws.send(frame(0x1, b'{"t":', fin=False) + frame(0x0, b"", fin=False) * 254 + frame(0x0, b'"ping"}'))
    assert ws.read_frame() == (0x1, b'{"t":"pong","id":null}')  # 256 frames: allowed (max_fragments)
    ws.send(frame(0x1, b'{"t":', fin=False) + frame(0x0, b"", fin=False) * 256)
    code, _ = ws.read_until_close()
    assert code == 1009


def _flood(server: ServerProcess, piece: bytes, *, read: bool, seconds: float = 60.0) -> tuple[int, str]:
    """Send ``piece`` over and over for at most ``seconds``; the bytes sent and how it ended: "close"
    (the server's close frame arrived; only looked for when ``read``), "reset" or "timeout"."""
    ws = Raw(server)
    block = piece * max(1, 65536 // len(piece))
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ws.send(block)
            sent += len(block)
            if read and select.select([ws.sock], [], [], 0)[0]:
                while True:
                    op, _ = ws.read_frame()
                    if op == 0x8:
                        return sent, "close"
        return sent, "timeout"
    except (OSError, EOFError):  # reset or broken pipe: the server gave up on us
        return sent, "reset"
    finally:
        ws.sock.close()


async def test_empty_fragment_flood_before_auth(server: ServerProcess, bystander: tuple[ChatClient, Account]) -> None:
    """The issue's attack: 40 MiB of empty continuation frames before authenticating grew the server by
    167 MiB. Now the message is refused at its 257th frame; the server neither buffers nor grows."""
    before = rss(server)
    opener = frame(0x2, b"\x81", fin=False)

    def attack() -> list[tuple[int, str]]:
        return [_flood(server, opener + frame(0x0, b"", fin=False) * 10_000, read=True) for _ in range(4)]

    attacked = asyncio.create_task(asyncio.to_thread(attack))
    while not attacked.done():
        await assert_unaffected(bystander, 1)
    ends = await attacked
    # Cut off long before 40 MiB each: what was sent is what the socket buffers took meanwhile.
    assert all(how == "close" and sent < 20 << 20 for sent, how in ends), ends
    assert rss(server) - before < 16 << 20, (before, rss(server))
    await assert_unaffected(bystander)


async def test_unfinished_messages_on_many_connections(
    server: ServerProcess, bystander: tuple[ChatClient, Account]
) -> None:
    """Before authenticating, each connection holds at most one message of max_frame_bytes being
    reassembled; 100 of them, each with 255 fragments of a 64 KiB message left open, cost only that."""
    before = rss(server)
    part = frame(0x0, b"x" * 256, fin=False)

    def attack() -> list[Raw]:
        conns = []
        for _ in range(100):
            ws = Raw(server)
            ws.send(frame(0x2, b"x" * 256, fin=False) + part * 254)
            conns.append(ws)
        return conns

    conns = await asyncio.to_thread(attack)
    await assert_unaffected(bystander)
    grown = rss(server) - before
    for ws in conns:
        ws.sock.close()
    assert grown < 40 << 20, grown  # 100 x 64 KiB of payload plus the connections themselves


async def test_pings_never_read_close_the_connection(
    server: ServerProcess, bystander: tuple[ChatClient, Account]
) -> None:
    """Every ping is answered; a client that sends pings and reads no pong would make the server queue
    them without end (it grew the server by over 1 GiB). Before authenticating, past
    limits.preauth_send_buffer (64 KiB) queued, it is closed as a slow consumer."""
    before = rss(server)
    started = time.monotonic()
    for ping in (frame(0x9, b"p" * 125), frame(0x1, b'{"t":"ping","id":1}')):  # WebSocket's, then ours
        sent, how = await asyncio.to_thread(_flood, server, ping, read=False)
        assert how == "reset", (sent, how, time.monotonic() - started)
    assert rss(server) - before < 16 << 20, (before, rss(server))
    await assert_unaffected(bystander)
    assert "slow consumer" in server.log()


def test_tcp_pings_never_read_close_the_connection(server: ServerProcess) -> None:
    """The same over the TCP framing: protocol pings before auth, their pongs never read."""
    sock = socket.create_connection(server.tcp, timeout=10)
    ping = b'{"t":"ping","id":1}'
    block = ((len(ping) + 1).to_bytes(4, "big") + b"\x01" + ping) * 3000
    deadline = time.monotonic() + 60
    with pytest.raises(OSError):  # reset or broken pipe once the server gives up
        while time.monotonic() < deadline:
            sock.sendall(block)
    sock.close()


def test_max_fragments_is_configurable(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", ["--set", "limits.max_fragments=4"]) as tuned:
        ws = Raw(tuned)
        ws.send(frame(0x1, b'{"t":', fin=False) + frame(0x0, b"", fin=False) * 2 + frame(0x0, b'"ping"}'))
        assert ws.read_frame() == (0x1, b'{"t":"pong","id":null}')  # 4 frames
        ws.send(frame(0x1, b'{"t":', fin=False) + frame(0x0, b"", fin=False) * 4)
        assert ws.read_until_close()[0] == 1009
