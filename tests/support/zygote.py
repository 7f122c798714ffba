"""Start ``im`` server processes by forking one that has already imported them, for the test suite.

Most of the 2 to 2.5 s an ``im serve`` (or an ``im gateway``, ``im transfer``, ``im api``) takes to be ready
on this machine is importing FastAPI, pydantic, uvicorn and im itself, and building the routes: the
same work for every one of the few hundred servers the suite starts. :class:`Zygote` runs one helper
process (this module's ``__main__``) that imports all of that once and then forks a child per request;
the child sets up its stdio, session and limits as ``subprocess.Popen`` would, and runs ``im``'s own
``main(argv)`` — the same code path as ``python -m im ARGS``, in a real process of its own, on real
sockets. Only the imports are shared (nothing else runs before the fork: no event loop, no thread, no
engine client; gRPC is not imported, since its fork handlers do not survive a fork of a process that
initialised it).

The helper is the children's parent: it reaps them and reports each exit status back, so
:class:`ForkedProcess` offers what the tests use of ``subprocess.Popen`` (``pid``, ``poll``, ``wait``,
``send_signal``, ``terminate``, ``kill``, ``returncode``). Tests about how ``im`` starts (imports,
command-line errors) still run ``python -m im`` themselves.

Protocol (JSON lines): request on the helper's stdin ``{"argv", "log", "cwd", "env", "nofile",
"new_session"}``; answers on its stdout ``{"spawned": pid}`` (in request order) and, at any time,
``{"exited": pid, "code": returncode}``.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: What the helper imports before it forks: what every role imports on its way to ready, no engines.
PRELOAD = ("im.cli", "im.server", "im.compose", "im.compose_security", "im.api.app", "im.api.server")


class ForkedProcess:
    """A child of the zygote, with the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"im (pid {self.pid})", timeout or 0.0)
            self._zygote.wait_exit(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid that may have been reused
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The helper process, started on first use (one per test process)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._spawned: queue.Queue[int] = queue.Queue()
        self._exited: dict[int, int] = {}
        self._changed = threading.Condition()

    def spawn(
        self,
        argv: list[str],
        log: Path,
        *,
        cwd: Path | None = None,
        nofile: int | None = None,
        new_session: bool = False,
    ) -> ForkedProcess:
        """Fork a child that runs ``im`` with ``argv``, its stdout and stderr appended to ``log``."""
        log.open("ab").close()  # there when this returns, as Popen's caller would have it
        request = {
            "argv": argv,
            "log": str(log),
            "cwd": str(cwd or Path.cwd()),
            "env": dict(os.environ),
            "nofile": nofile,
            "new_session": new_session,
        }
        with self._lock:
            proc = self._started()
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            pid = self._spawned.get(timeout=30)
        return ForkedProcess(self, pid)

    @property
    def pid(self) -> int | None:
        """The helper's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def spawn_im(self, args: list[str], log: Path, new_session: bool) -> ForkedProcess:
        """:data:`im.procs.Spawn`, for ``LocalCluster(spawn=ZYGOTE.spawn_im)``."""
        return self.spawn(args, log, new_session=new_session)

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            return self._exited.get(pid)

    def wait_exit(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()  # the helper exits at the end of its input
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(10)  # it reads to the end of the helper's output
            self._reader = None
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.zygote"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=Path(__file__).resolve().parents[2],
            )
            self._reader = threading.Thread(target=self._read, args=(self._proc,), name="im-zygote-reader", daemon=True)
            self._reader.start()
        return self._proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            answer = json.loads(line)
            if "spawned" in answer:
                self._spawned.put(answer["spawned"])
            else:
                with self._changed:
                    self._exited[answer["exited"]] = answer["code"]
                    self._changed.notify_all()


#: The zygote of this test process (tests/conftest.py closes it when the session ends).
ZYGOTE = Zygote()


# --- the helper process ---------------------------------------------------------------------------------


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become ``python -m im ARGV`` as Popen would have started it; never returns."""
    code = 1
    try:
        # The dispositions a fresh interpreter starts with: SIGPIPE and SIGXFSZ stay ignored (Python's
        # own start-up ignores them, and the helper is a Python process too), SIGINT raises
        # KeyboardInterrupt, the rest are the defaults.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)  # from here on a failure is reported in the log, not in the helper's answers
        os.dup2(log, 2)
        if request["new_session"]:
            os.setsid()
        if request["nofile"] is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (request["nofile"], request["nofile"]))
        os.closerange(3, 1 << 16)  # nothing of the helper's (its pipes, the wakeup pipe) stays open
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdio for its lifetime
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["im", *request["argv"]]
        import im.compose
        import im.observability.health

        # The one value im takes at import that must be this process's own: when it started (the
        # registry's ``started_at``, ``im cluster status``'s uptime).
        im.observability.health.PROCESS_STARTED = im.compose.PROCESS_STARTED = time.time()  # type: ignore[attr-defined]
        from im.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout.buffer
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test run's ^C goes to pytest, which closes us
    stdin = sys.stdin.buffer
    pending = b""
    while True:
        ready, _, _ = select.select([stdin, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        while True:  # reap every child that exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            out.write(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            out.flush()
        if stdin in ready:
            data = os.read(stdin.fileno(), 65536)
            if not data:
                return  # the test process closed us (or died)
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                set_up_r, set_up_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    _child(request)  # closes set_up_w with the rest once its session, limits and stdio are set
                os.close(set_up_w)
                os.read(set_up_r, 1)  # EOF: set up (as Popen returns only once its child did that much)
                os.close(set_up_r)
                out.write(json.dumps({"spawned": pid}).encode() + b"\n")
                out.flush()


if __name__ == "__main__":
    _serve()
