"""A private schema on the test PostgreSQL server, for tests of the PostgreSQL stores.

The server is ``IM_TEST_POSTGRES_DSN`` (default: the local server, user ``postgres``, database ``test``).
Each :class:`PgSchema` is a fresh ``im_test_<random>`` schema, dropped with everything in it by
:meth:`PgSchema.drop`, so tests are isolated and may run in parallel. An unreachable server fails the
test: it is never skipped (in CI a missing service is a failure).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import asyncpg
import pytest

from im.backends.sql.postgres_db import PostgresDatabase
from im.procs import free_port, stop_process
from tests.support.pki import EnginePki


class Startable(Protocol):
    async def start(self) -> None: ...


DSN = os.environ.get("IM_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class PgSchema:
    """A schema name that no other test uses; databases opened on it see only its tables."""

    def __init__(self) -> None:
        self.name = f"im_test_{secrets.token_hex(6)}"

    def database(self, *, min_size: int = 1, max_size: int = 4) -> PostgresDatabase:
        """A (not yet opened) database on this schema; opening it creates the schema and migrates it."""
        return PostgresDatabase(DSN, schema=self.name, min_size=min_size, max_size=max_size, connect_timeout=5.0)

    async def drop(self) -> None:
        conn = await connect()
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        finally:
            await conn.close()


async def connect() -> asyncpg.Connection:
    """A plain connection to the test server (fails the test, with the DSN, when it is unreachable)."""
    try:
        return await asyncpg.connect(DSN, timeout=5.0)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.fail(f"PostgreSQL at {DSN} is unreachable ({type(exc).__name__}: {exc}); set IM_TEST_POSTGRES_DSN")


async def start(*services: Startable) -> None:
    """Start stores on the test server, failing the test with the DSN when it cannot be reached."""
    try:
        for service in services:
            await service.start()
    except (OSError, TimeoutError) as exc:
        pytest.fail(f"PostgreSQL at {DSN} is unreachable ({type(exc).__name__}: {exc}); set IM_TEST_POSTGRES_DSN")


class _Postmaster:
    """What the private servers below share: a directory of their own with a data directory ``initdb``
    makes once (``initdb`` and ``postgres`` from PATH; trust, user and database ``postgres``, no sync at
    init), a free port, and a postmaster started on them and waited for until it accepts connections.
    Runs as the ``postgres`` system user when the tests run as root (PostgreSQL refuses root). The shared
    server on 5432 is never touched."""

    def __init__(self, prefix: str) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self._user = "postgres" if os.geteuid() == 0 else None

    def log(self, tail: int = 4000) -> str:
        try:
            return (self.dir / "postgres.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _initdb(self) -> None:
        if self._user is not None:
            shutil.chown(self.dir, self._user, self._user)
        subprocess.run(
            ["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
            user=self._user,
        )

    def _launch(self, settings: list[str], timeout: float) -> None:
        """Start the postmaster (``-c`` each of ``settings``; its own process group, its socket in the
        directory) and wait until it logs that it accepts connections (after crash recovery, if any). A
        postmaster that exits or is not ready within ``timeout`` fails with the tail of its log (and is
        killed)."""
        cmd = ["postgres", "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir)]
        for setting in settings:
            cmd += ["-c", setting]
        log_path = self.dir / "postgres.log"
        offset = len(log_path.read_bytes()) if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, user=self._user, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()}")
            if b"ready to accept connections" in log_path.read_bytes()[offset:]:
                return
            time.sleep(0.02)
        stop_process(self.proc, signal.SIGKILL, 10.0, raise_on_timeout=False)
        raise RuntimeError(f"postgres did not start in {timeout}s:\n{self.log()}")


class TlsPostgres(_Postmaster):
    """A private PostgreSQL on a free port that accepts only TLS connections (on 127.0.0.1 and 127.0.0.2)
    with a client certificate of ``pki``'s CA (``hostssl ... clientcert=verify-ca``, ``hostnossl ...
    reject``); user and database ``postgres``. No fsync: a test instance. ``stop`` removes it."""

    def __init__(self, pki: EnginePki) -> None:
        super().__init__("im-pg-tls-")
        self.pki = pki

    def dsn(self, host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/postgres"

    def start(self, timeout: float = 30.0) -> TlsPostgres:
        tls = self.dir / "tls"
        tls.mkdir()
        for name, src in [("server.crt", self.pki.server.cert), ("server.key", self.pki.server.key)]:
            shutil.copy(src, tls / name)
        shutil.copy(self.pki.ca.cert, tls / "ca.crt")
        (tls / "server.key").chmod(0o600)
        if self._user is not None:
            for path in [tls, *tls.iterdir()]:
                shutil.chown(path, self._user, self._user)
        self._initdb()
        (self.data / "pg_hba.conf").write_text(
            "hostssl all all 127.0.0.0/8 trust clientcert=verify-ca\n"
            "hostnossl all all 127.0.0.0/8 reject\n"
            "local all all trust\n"
        )
        try:
            self._launch(
                [
                    "listen_addresses=127.0.0.1,127.0.0.2",  # .2: an address the certificate does not name
                    "ssl=on",
                    f"ssl_cert_file={tls / 'server.crt'}",
                    f"ssl_key_file={tls / 'server.key'}",
                    f"ssl_ca_file={tls / 'ca.crt'}",
                    "fsync=off",
                    "max_connections=30",
                ],
                timeout,
            )
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT, 10.0, raise_on_timeout=False)  # fast shutdown
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres(_Postmaster):
    """A private PostgreSQL on a free port that a test may stop, crash and start again on the same data
    directory: the database going away under a running cluster (tests/faults/test_database.py). Plain TCP
    on 127.0.0.1, trust, user and database ``postgres``, in its own process group. ``fsync=on`` and
    ``synchronous_commit=on`` (the durability an ack relies on) unless ``fsync=False`` (a test where
    durability is not the point, e.g. tests/faults/test_storm.py); ``max_connections`` as given.

    ``stop("fast")`` and ``stop("immediate")`` are ``pg_ctl stop -m fast`` / ``-m immediate`` (SIGINT /
    SIGQUIT to the postmaster); ``kill()`` is a crash: SIGKILL of the postmaster, then of whatever backend
    outlives it. ``start()`` again recovers from the WAL. ``destroy`` removes it."""

    def __init__(self, *, max_connections: int = 100, fsync: bool = True) -> None:
        super().__init__("im-pg-")
        self.max_connections = max_connections
        self.fsync = fsync
        self._initialised = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 30.0) -> PrivatePostgres:
        """Start (initdb first, once) and wait until it accepts connections (after crash recovery)."""
        assert not self.running, "postgres is running already"
        if not self._initialised:
            self._initdb()
            self._initialised = True
        settings = [
            "listen_addresses=127.0.0.1",
            f"fsync={'on' if self.fsync else 'off'}",
            "synchronous_commit=on",
            f"max_connections={self.max_connections}",
        ]
        try:
            self._launch(settings, timeout)
        except RuntimeError:
            self.kill()
            raise
        return self

    def stop(self, mode: str = "fast", timeout: float = 20.0) -> None:
        """``pg_ctl stop -m fast`` (SIGINT: sessions ended, a checkpoint) or ``-m immediate`` (SIGQUIT: no
        checkpoint, recovery at the next start)."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        if self.proc is not None:
            stop_process(self.proc, sig, timeout, raise_on_timeout=False)
            self._reap()

    def kill(self) -> None:
        """A crash: SIGKILL the postmaster; its backends notice its death and exit (those that do not within
        5 s are killed too), so the next start finds the shared memory free and replays the WAL."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # its own session: the process group of every backend
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 5.0
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            pgid = self.proc.pid
            deadline = time.monotonic() + 10.0
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def destroy(self) -> None:
        """Stop it (immediate) and delete its data directory."""
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pg() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL (:class:`PrivatePostgres`, durable) a test may stop, crash and start again;
    removed at the end."""
    server = PrivatePostgres().start()
    yield server
    server.destroy()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
