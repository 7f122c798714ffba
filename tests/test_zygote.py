"""The suite's way to start ``im`` processes (tests/support/zygote.py) gives what ``subprocess.Popen``
would: a process with the limits and session asked for, its output in its log, its exit status (signals
as negative numbers), and no descriptor of the helper's."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from tests.support.server import ServerProcess
from tests.support.zygote import ZYGOTE


def _open_files(pid: int) -> set[str]:
    """What the descriptors of ``pid`` point to (one closed while this reads is left out)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def test_a_forked_server_has_its_limits_its_log_and_nothing_of_the_helper(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", nofile=777).start()
    assert server.proc is not None
    pid = server.proc.pid
    try:
        limits = [line.split() for line in Path(f"/proc/{pid}/limits").read_text().splitlines()]
        assert ["777", "777"] in [line[3:5] for line in limits if line[:3] == ["Max", "open", "files"]]
        fds = _open_files(pid)
        helper = ZYGOTE.pid
        assert helper is not None
        helpers = _open_files(helper)
        assert not {fd for fd in helpers & fds if fd.startswith("pipe:")}, fds  # none of the helper's pipes
        assert os.readlink(f"/proc/{pid}/fd/1") == str(server.log_path)
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        ignored = int(status["SigIgn"], 16)
        assert ignored & (1 << (signal.SIGPIPE - 1)), "a Python process ignores SIGPIPE (EPIPE instead)"
        assert not ignored & (1 << (signal.SIGINT - 1)) and not ignored & (1 << (signal.SIGTERM - 1))
    finally:
        assert server.stop() == 0  # SIGTERM: a graceful stop, exit 0
    assert "im: HTTP API" in server.log() and "im: stopped" in server.log()  # its output, in its log


def test_a_node_asked_for_a_session_of_its_own_gets_one(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    proc = ZYGOTE.spawn(["serve", "--data-dir", str(tmp_path / "d"), "--http-port", "0"], log, new_session=True)
    try:
        assert os.getsid(proc.pid) == proc.pid  # signals from a terminal do not reach it
    finally:
        proc.kill()
        proc.wait(10)


def test_exit_statuses_are_reported_like_popen(tmp_path: Path) -> None:
    killed = ServerProcess(tmp_path / "killed").start()
    assert killed.proc is not None
    assert killed.proc.poll() is None
    killed.proc.kill()
    assert killed.proc.wait(10) == -signal.SIGKILL
    assert killed.proc.poll() == -signal.SIGKILL

    log = tmp_path / "refused.log"
    refused = ZYGOTE.spawn(["serve", "--http-port", "notanumber"], log)
    assert refused.wait(30) == 2  # argparse's usage error
    assert "notanumber" in log.read_text()
