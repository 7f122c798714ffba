"""Child processes of im's own tools (``im cluster``, its private etcd and object store, the tests'
engines): a free port to give one, and a stop that never leaves one behind. Imports nothing of im."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

#: Where :func:`free_port` looks by default: from here up to the start of the kernel's ephemeral range.
#: Below it, 10000-19999 is left to callers that need a block of fixed offsets (the tests' local clusters).
FREE_PORT_LOWEST = 20_000
#: The window :func:`free_port` picks in now, ``[_LOWEST, _HIGHEST)``; ``_HIGHEST`` None: up to the start
#: of the ephemeral range (never beyond it in any case). :func:`confine_ports` narrows it.
_LOWEST = FREE_PORT_LOWEST
_HIGHEST: int | None = None
#: Ports :func:`free_port` handed out lately, oldest first: not handed out again while they are here, since
#: a caller may not have bound one yet (a server given three ports binds them in turn).
_HANDED: dict[int, None] = {}
_HANDED_MAX = 2048


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections and port-0 binds take theirs
    from it); 32768 when the kernel does not say."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def confine_ports(low: int = FREE_PORT_LOWEST, high: int | None = None) -> tuple[int, int | None]:
    """Have :func:`free_port` pick its ports in ``[low, high)`` only (and still below the ephemeral range),
    e.g. one window per test process when several run at once, so no two pick the same free port; ``high``
    None: up to the ephemeral range. Returns the window it replaces: ``confine_ports(*previous)`` restores
    it, and ``confine_ports()`` the default."""
    global _LOWEST, _HIGHEST
    if low < 1 or (high is not None and not low < high <= 65_536):
        raise ValueError(f"not a port window: [{low}, {high})")
    previous = (_LOWEST, _HIGHEST)
    _LOWEST, _HIGHEST = low, high
    return previous


def free_port(span: int = 1) -> int:
    """A port (the first of ``span`` consecutive ones) free on 127.0.0.1 now, for a child to listen on,
    inside the window :func:`confine_ports` set (by default from 20000 up).

    It is chosen below the ephemeral range: a port the kernel handed out for port 0 is free again the
    moment we close it, and any outgoing connection may take it before the child binds it ("address
    already in use"); ports below the range are only ever taken by an explicit bind. Nor is it one of
    the last 2,048 this process handed out: free now does not mean nobody was given it a moment ago."""
    top = min(ephemeral_low(), _HIGHEST if _HIGHEST is not None else ephemeral_low()) - span
    for _ in range(500):
        base = random.randrange(_LOWEST, max(top, _LOWEST + 1))
        if any(port in _HANDED for port in range(base, base + span)):
            continue
        try:
            for port in range(base, base + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        for port in range(base, base + span):
            _HANDED[port] = None
        while len(_HANDED) > _HANDED_MAX:
            del _HANDED[next(iter(_HANDED))]
        return base
    with socket.socket() as s:  # a crowded range: fall back to one the kernel picks
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_block(offsets: Sequence[int], *, low: int = 10_000, high: int | None = None, step: int = 50) -> int:
    """A base port, a multiple of ``step`` from ``low`` up, such that ``base + offset`` is free on 127.0.0.1
    now for every one of ``offsets`` (a local cluster's layout) and the whole block lies below ``high``
    and below the ephemeral range (for the reason :func:`free_port` gives). Raises RuntimeError when 200
    tries found none."""
    top = min(ephemeral_low(), high if high is not None else ephemeral_low()) - max(offsets) - 1
    for _ in range(200):
        base = random.randrange(low, max(top, low + step), step)
        try:
            for off in offsets:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + off))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range for a cluster")


def stop_process(proc: ChildProcess, sig: int, timeout: float, *, raise_on_timeout: bool = True) -> int:
    """Signal a child (unless it already exited) and wait; one that outlives ``timeout`` is killed (and
    the timeout raised, unless told not to). Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            if raise_on_timeout:
                raise
    return proc.wait()


class ChildProcess(Protocol):
    """What im's tools use of a child they started (``subprocess.Popen`` has it)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...


#: Starts ``im ARGS`` with its output appended to a log file, in a session of its own when asked:
#: ``spawn(args, log, new_session)``. :func:`spawn_im` by default; the test suite forks its servers from
#: a process that imported im already (tests/support/zygote.py).
Spawn = Callable[[list[str], Path, bool], ChildProcess]


def spawn_im(args: list[str], log: Path, new_session: bool) -> subprocess.Popen[bytes]:
    """``python -m im ARGS`` as a child, stdout and stderr appended to ``log``, stdin closed."""
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "im", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ},
            start_new_session=new_session,  # signals come from the caller, in order, not from the terminal
        )
