"""A start that cannot succeed ends with one line naming the problem and its fix, exit status 1, and no
traceback (im.startup): real ``im`` subprocesses against a taken port, a PostgreSQL without the database,
nothing listening where PostgreSQL or etcd should be, a data directory that cannot be made.

The processes of every case start at once (one module fixture) and each test reads its own: a failed start
costs a second or two of CPU, mostly imports, and the cases do not touch each other's resources.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from im.config import Config
from im.net import BindError
from im.procs import free_port
from im.startup import EXIT_START, StartupError, explain
from tests.support.etcd import shared_etcd
from tests.support.postgres import DSN, PgSchema

#: The process's own log lines (logs.format=text), and gRPC core's (``E1205 16:00:53.877 ...``).
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT|[EWI]\d{4} \d\d:\d\d:\d\d)")
SECRET = "startup-errors-secret-0123"
ZERO_PORTS = ("--http-port", "0", "--ws-port", "0", "--tcp-port", "0", "--set", "transfer.port=0")


@dataclass
class Ran:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Cases:
    taken_port: int
    dead_port: int
    missing_db: str
    tmp: Path
    ran: dict[str, Ran]

    def line(self, case: str, command: str) -> str:
        """The one line of a failed start: exit status 1, no traceback, nothing else but log lines."""
        done = self.ran[case]
        assert done.returncode == EXIT_START, (done.args, done.returncode, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"im {command}: "), lines
        return lines[0]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cases]:
    tmp = tmp_path_factory.mktemp("startup")
    schemas: list[PgSchema] = []  # each role's tables, apart from every other's (its own master key)
    missing_db = f"im_missing_{secrets.token_hex(4)}"
    dead = free_port()  # nothing listens there
    etcd_dead = ("--set", "registry.kind=etcd", "--set", f"registry.etcd_endpoint=127.0.0.1:{dead}")
    # The transfer node claims its node id in etcd before it listens: a live one, under a prefix of its own.
    etcd_live = ["--set", f"registry.etcd_endpoint={shared_etcd().endpoint}"]
    etcd_live += ["--set", f"registry.prefix=/im-startup-{secrets.token_hex(4)}/"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def serve(name: str, *extra: str) -> list[str]:
            return ["serve", "--data-dir", str(tmp / name), *ZERO_PORTS, *extra]

        def role(name: str, role: str, *extra: str) -> list[str]:
            schema = PgSchema()
            schemas.append(schema)
            shared = [
                *("--set", "store.kind=postgres", "--set", f"store.postgres_dsn={DSN}"),
                *("--set", f"store.postgres_schema={schema.name}", "--set", "presence.kind=redis"),
                *("--set", "registry.kind=etcd", "--set", f"auth.secret={SECRET}"),
            ]
            return [role, "--data-dir", str(tmp / name), *shared, *ZERO_PORTS, *extra]

        postgres = ("--set", "store.kind=postgres", "--set")
        runs = {
            "http taken": serve("http", "--http-port", str(port)),
            "transfer taken": role("tr", "transfer", *etcd_live, "--set", f"transfer.port={port}"),
            "no database": serve("db", *postgres, "store.postgres_dsn=" + _dsn(DSN, database=missing_db)),
            "no postgres": serve(
                "pg", *postgres, f"store.postgres_dsn=postgresql://postgres:hunter2@127.0.0.1:{dead}/x"
            ),
            "no etcd, serve": serve("etcd-serve", *etcd_dead),
            "no etcd, gateway": role("etcd-gw", "gateway", *etcd_dead),
            "no etcd, api": role("etcd-api", "api", *etcd_dead),
            "not a directory": ["serve", "--data-dir", str(tmp / "a-file" / "data"), *ZERO_PORTS],
            "debug": serve("debug", "--http-port", str(port), "--log-level", "debug"),
        }
        (tmp / "a-file").write_text("not a directory")
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("IM_")}
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "im", *args],
                cwd=tmp,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, args in runs.items()
        }
        ran = {}
        try:
            for name, proc in procs.items():
                out, err = proc.communicate(timeout=90)
                ran[name] = Ran(runs[name], proc.returncode, out, err)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    yield Cases(port, dead, missing_db, tmp, ran)
    for schema in schemas:
        asyncio.run(schema.drop())


def _dsn(dsn: str, *, database: str) -> str:
    return urlsplit(dsn)._replace(path=f"/{database}").geturl()


def test_a_taken_port_names_the_address_and_the_flag(cases: Cases) -> None:
    line = cases.line("http taken", "serve")
    assert f"127.0.0.1:{cases.taken_port}" in line and "already in use" in line
    assert "--http-port" in line


def test_a_taken_transfer_port_names_the_setting(cases: Cases) -> None:
    line = cases.line("transfer taken", "transfer")
    assert f"127.0.0.1:{cases.taken_port}" in line and "transfer.port" in line


def test_a_missing_postgres_database_says_how_to_create_it(cases: Cases) -> None:
    line = cases.line("no database", "serve")
    assert f"no database '{cases.missing_db}'" in line
    assert f"createdb -h {urlsplit(DSN).hostname}" in line and line.endswith("in store.postgres_dsn")


def test_nothing_listening_for_postgres_names_the_engine_and_setting(cases: Cases) -> None:
    line = cases.line("no postgres", "serve")
    assert f"PostgreSQL at 127.0.0.1:{cases.dead_port} does not answer (Connection refused)" in line
    assert "store.postgres_dsn" in line and "hunter2" not in line


@pytest.mark.parametrize(
    ("case", "command"), [("no etcd, serve", "serve"), ("no etcd, gateway", "gateway"), ("no etcd, api", "api")]
)
def test_etcd_not_running_names_its_endpoints(cases: Cases, case: str, command: str) -> None:
    line = cases.line(case, command)
    # The first to meet it says so: the node id claim (im serve, with etcd) or the registry (a gateway).
    assert f"etcd at 127.0.0.1:{cases.dead_port} does not answer" in line
    assert "start etcd" in line and "registry.etcd_endpoints" in line


def test_a_data_dir_that_cannot_be_made_names_the_path(cases: Cases) -> None:
    line = cases.line("not a directory", "serve")
    assert f"cannot use {cases.tmp / 'a-file' / 'data'}" in line and "Not a directory" in line


def test_debug_shows_the_traceback_too(cases: Cases) -> None:
    done = cases.ran["debug"]
    assert done.returncode == EXIT_START
    assert "Traceback" in done.stderr and "BindError" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("im serve: cannot listen on")


def test_what_is_not_recognised_is_left_to_its_traceback() -> None:
    config = Config()
    assert explain(ValueError("a bug"), config) is None
    assert explain(RuntimeError("also a bug"), config) is None
    known = StartupError("the problem", "the fix")
    assert explain(known, config) is known and str(known) == "the problem: the fix"
    for port, flag in [(config.http.port, "--http-port"), (config.gateway.ws_port, "--ws-port"), (9, "port setting")]:
        try:
            raise RuntimeError("wrapped") from BindError(errno.EADDRINUSE, "Address already in use", "127.0.0.1", port)
        except RuntimeError as exc:
            why = explain(exc, config)
        assert why is not None and flag in why.fix and f"127.0.0.1:{port}" in why.problem
