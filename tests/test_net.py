"""im.net: the admission counts (no I/O), the connection budget, and the accept loop under EMFILE."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from im.net import Admission, Verdict, address_key, connection_budget


def test_address_key_counts_ipv4_by_address_and_ipv6_by_prefix() -> None:
    assert address_key(("127.0.0.2", 5000)) == "127.0.0.2"
    assert address_key("10.1.2.3") == "10.1.2.3"
    assert address_key(("::ffff:10.1.2.3", 1, 0, 0)) == "10.1.2.3"  # IPv4-mapped counts as IPv4
    a = address_key(("2001:db8:1:2:aaaa::1", 1, 0, 0))
    b = address_key(("2001:db8:1:2:bbbb::9", 1, 0, 0))
    c = address_key(("2001:db8:1:3::1", 1, 0, 0))
    assert a == b == "2001:db8:1:2::/64"
    assert c != a
    assert address_key(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert address_key(None) == ""  # a Unix socket has no IP peer
    assert address_key(("2001:db8::1", 1, 0, 0), ipv6_prefix=128) == "2001:db8::1/128"


def test_per_address_cap_refuses_that_address_only() -> None:
    adm = Admission(max_connections=100, max_per_address=2, max_refusing=4)
    t1, t2 = adm.admit(("10.0.0.1", 1)), adm.admit(("10.0.0.1", 2))
    assert t1.admitted and t2.admitted
    t3 = adm.admit(("10.0.0.1", 3))
    assert t3.verdict is Verdict.REFUSE and "this address" in t3.reason
    assert adm.admit(("10.0.0.2", 1)).admitted  # another address is unaffected
    assert adm.open == 3 and adm.refusing == 1 and adm.open_from("10.0.0.1") == 2
    adm.release(t3)
    adm.release(t1)
    adm.release(t1)  # twice: ignored
    assert adm.open == 2 and adm.refusing == 0 and adm.open_from("10.0.0.1") == 1
    assert adm.admit(("10.0.0.1", 4)).admitted  # room again


def test_process_cap_and_bounded_refusals() -> None:
    adm = Admission(max_connections=3, max_per_address=0, max_refusing=2)  # 0: no per-address cap
    tickets = [adm.admit(("10.0.0.1", i)) for i in range(3)]
    assert all(t.admitted for t in tickets)
    refused = [adm.admit((f"10.0.1.{i}", 1)) for i in range(2)]
    assert [t.verdict for t in refused] == [Verdict.REFUSE, Verdict.REFUSE]
    assert "connection limit" in refused[0].reason
    shed = adm.admit(("10.0.2.1", 1))
    assert shed.verdict is Verdict.SHED  # two refusals waiting already: this one is closed at once
    adm.release(shed)  # holds nothing
    assert adm.refusing == 2 and adm.shed_total == 1 and adm.refused_total == 2
    adm.release(refused[0])
    assert adm.admit(("10.0.2.1", 1)).verdict is Verdict.REFUSE  # a refusal slot is free again
    adm.release(tickets[0])
    assert adm.admit(("10.0.2.1", 2)).admitted
    assert adm.open == 3


def test_admission_rejects_nonsense_caps() -> None:
    with pytest.raises(ValueError):
        Admission(max_connections=0, max_per_address=1, max_refusing=1)


def test_connection_budget_keeps_the_reserve() -> None:
    assert connection_budget(fd_limit=512, fd_reserve=128, configured=None) == 384
    assert connection_budget(fd_limit=512, fd_reserve=128, configured=100) == 100
    assert connection_budget(fd_limit=512, fd_reserve=128, configured=10_000) == 384  # never past the fds
    with pytest.raises(ValueError, match="fd_reserve"):
        connection_budget(fd_limit=100, fd_reserve=128, configured=None)


_EMFILE_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, resource, socket, uvloop
    from im.net import Listener, bind

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    held = []

    class Hold(asyncio.Protocol):
        def connection_made(self, transport):
            held.append(transport)

    async def main():
        listener = Listener(bind("127.0.0.1", 0), Hold, name="test", retry_delay=0.2).start()
        print(listener.sockets[0].getsockname()[1], flush=True)
        while len(held) < 40:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the test's 80 clients are waiting: the listener hits EMFILE meanwhile
        before = len(held)
        for t in held[:10]:
            t.close()
        await asyncio.sleep(1.0)
        print("exhausted", listener.exhausted_total, "before", before, "after", len(held), flush=True)

    uvloop.run(main())
    """
)


def test_listener_survives_emfile_and_logs_once() -> None:
    """uvloop's own server stops accepting for good on EMFILE; the Listener pauses and carries on."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _EMFILE_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]  # more than it may hold
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    for c in clients:
        c.close()
    words = out.split()
    exhausted, before, after = int(words[1]), int(words[3]), int(words[5])
    assert exhausted >= 2, (out, err)  # it did hit the limit, more than once
    assert after > before, (out, err)  # and accepted again once descriptors were free
    assert err.count("cannot accept") == 1, err  # one throttled line, not one per accept
