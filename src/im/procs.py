"""Child processes of im's own tools (``im cluster``, its private etcd and object store, the tests'
engines): a free port to give one, and a stop that never leaves one behind. Imports nothing of im."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float, *, raise_on_timeout: bool = True) -> int:
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
    return proc.returncode
