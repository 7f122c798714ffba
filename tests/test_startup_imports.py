"""A process imports only the engines its configuration uses (im.compose builds them, importing each
engine's module, and its driver, where it builds one): most of a process's start is spent importing, and
an unused engine's client costs tenths of a second (redis-py, aio-pika with httpx, aetcd with gRPC, asyncpg).

A real ``im serve`` on the default settings (SQLite, presence in memory, no etcd, no RabbitMQ) runs under
``python -X importtime`` from its start to its stop, and its import log must not name any of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from im.procs import stop_process

#: Module (and its submodules) -> what would have imported it: none is used by ``im serve``'s defaults.
NOT_FOR_THE_DEFAULTS = {
    "redis": "the Redis client (presence.kind=redis, events.dedupe=redis)",
    "asyncpg": "the PostgreSQL driver (store.kind=postgres)",
    "aetcd": "the etcd client (registry.kind=etcd)",
    "aio_pika": "the RabbitMQ client (events.kind=rabbitmq)",
    "aiormq": "the RabbitMQ client (events.kind=rabbitmq)",
    "obstore": "the S3 client (files.storage=s3)",
    "im.backends.registry.etcd": "registry.kind=etcd",
    "im.backends.config.etcd": "registry.kind=etcd (the configuration centre)",
    "im.backends.node_ids.etcd": "registry.kind=etcd (node ids)",
    "im.backends.presence.redis": "presence.kind=redis",
    "im.backends.rate_limit.redis": "presence.kind=redis",
    "im.backends.dedupe.redis": "events.dedupe=redis",
    "im.backends.sql.postgres_db": "store.kind=postgres",
    "im.backends.chat.postgres": "store.kind=postgres",
    "im.backends.accounts.postgres": "store.kind=postgres",
    "im.backends.files.postgres": "store.kind=postgres",
    "im.backends.blobs.s3": "files.storage=s3",
    "im.events.push": "events.kind=rabbitmq",
    "im.events.relay": "events.kind=rabbitmq",
    "im.transfer": "the transfer link (im transfer, im gateway, im api)",
}

READY_LINE = "im: Web chat"


def imported_modules(log: str) -> set[str]:
    """The modules named by ``python -X importtime``'s lines in ``log`` (other lines are ignored)."""
    names = set()
    for line in log.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                names.add(name)
    return names


def unwanted(modules: set[str]) -> list[str]:
    """The entries of NOT_FOR_THE_DEFAULTS that ``modules`` name (themselves or a submodule), with why."""
    return [
        f"{prefix} ({why})"
        for prefix, why in NOT_FOR_THE_DEFAULTS.items()
        if any(module == prefix or module.startswith(prefix + ".") for module in modules)
    ]


def test_the_parser_reads_an_import_log() -> None:
    log = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       624 |     477830 |         redis.asyncio\n"
        "2026-12-05T23:11:33.234Z INFO gw-1 serve im: connections: at most 1 | 2\n"
        "import time:      1699 |     952188 |   im.api.server\n"
    )
    assert imported_modules(log) == {"redis.asyncio", "im.api.server"}
    assert unwanted(imported_modules(log)) == [f"redis ({NOT_FOR_THE_DEFAULTS['redis']})"]
    assert unwanted({"redisx", "im.events", "im.transferx"}) == []


def test_im_serve_with_the_defaults_imports_no_other_engine(tmp_path: Path) -> None:
    data_dir, err_path = tmp_path / "data", tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IM_")}  # the defaults, whatever the caller set
    cmd = [sys.executable, "-X", "importtime", "-m", "im", "serve", "--data-dir", str(data_dir)]
    cmd += ["--http-port", "0", "--ws-port", "0", "--tcp-port", "0"]
    ready = threading.Event()
    out: list[str] = []

    def read(stdout: IO[bytes]) -> None:
        for raw in stdout:
            out.append(line := raw.decode(errors="replace"))
            if READY_LINE in line:
                ready.set()

    with open(err_path, "wb") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env) as proc:
        assert proc.stdout is not None
        reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            started = ready.wait(60)
        finally:
            code = stop_process(proc, signal.SIGTERM, 30)  # the stop's imports are in the log too
            reader.join(5)
    log = err_path.read_text(errors="replace")
    assert started, f"im serve did not start:\n{''.join(out)}\n{log[-4000:]}"
    assert code == 0, f"im serve exited with {code}:\n{log[-4000:]}"
    modules = imported_modules(log)
    # The log is read, and the serve path went through the composition root to the embedded engines.
    assert {"im.compose", "im.server", "im.backends.chat.sqlite", "im.backends.presence.memory"} <= modules
    assert not unwanted(modules), "im serve on its defaults imported engines it does not use:\n" + "\n".join(
        unwanted(modules)
    )
