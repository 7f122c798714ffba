"""``python -m im`` as a real subprocess: ``config`` shows the merged configuration, ``serve`` refuses bad input
before starting anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SECRET = "s3cr3t-value-0123456"  # 20 characters


def run_im(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 15
) -> tuple[subprocess.CompletedProcess[str], float]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("IM_")}
    clean.update(env or {})
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "im", *args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=timeout
    )
    return done, time.monotonic() - started


def test_config_shows_flags_and_masks_the_secret(tmp_path: Path) -> None:
    assert len(SECRET) == 20
    done, _ = run_im(
        "config",
        "--set",
        "limits.send_rate=5",
        "--http-port",
        "9999",
        cwd=tmp_path,
        env={"IM_AUTH__SECRET": SECRET, "IM_GATEWAY__NODE_ID": "gw-env"},
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["limits"]["send_rate"] == 5
    assert shown["http"]["port"] == 9999
    assert shown["gateway"]["node_id"] == "gw-env"
    assert shown["gateway"]["ws_port"] == 8081
    assert shown["auth"]["secret"] and shown["auth"]["secret"] != SECRET
    assert SECRET not in done.stdout and SECRET not in done.stderr


def test_serve_rejects_a_non_numeric_port_fast(tmp_path: Path) -> None:
    done, took = run_im("serve", "--http-port", "notanumber", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode != 0
    assert "--http-port" in done.stderr
    assert took < 10
    assert not (tmp_path / "data").exists()


def test_serve_refuses_an_invalid_setting_without_starting(tmp_path: Path) -> None:
    done, took = run_im("serve", "--set", "http.port=70000", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "http.port" in done.stderr
    assert "HTTP API" not in done.stdout and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was started or created
    assert took < 10


def test_role_processes_refuse_embedded_engines_naming_the_settings(tmp_path: Path) -> None:
    for role in ("api", "gateway", "transfer"):
        done, _ = run_im(role, "--set", "presence.kind=redis", cwd=tmp_path)
        assert done.returncode == 2, (role, done.stdout, done.stderr)
        assert f"im {role}" in done.stderr
        assert "store.kind=postgres" in done.stderr and "registry.kind=etcd" in done.stderr
        assert "presence.kind=redis" not in done.stderr  # that one is already set


def test_config_masks_every_secret_and_url_password(tmp_path: Path) -> None:
    s3_secret, db_password, mq_password = "s3-secret-9f8e7d", "db-pass-1a2b3c", "mq-pass-4d5e6f"
    done, _ = run_im(
        "config",
        "--set",
        "files.s3.secret_access_key=" + s3_secret,
        "--set",
        f"store.postgres_dsn=postgresql://im:{db_password}@db.example:5432/im",
        "--set",
        f"events.amqp_url=amqp://im:{mq_password}@mq.example:5672/",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for secret in (s3_secret, db_password, mq_password):
        assert secret not in done.stdout
    shown = json.loads(done.stdout)
    assert shown["files"]["s3"]["secret_access_key"] == "***"
    assert shown["store"]["postgres_dsn"] == "postgresql://im:***@db.example:5432/im"
    assert shown["events"]["amqp_url"] == "amqp://im:***@mq.example:5672/"
    assert shown["presence"]["redis_url"] == "redis://127.0.0.1:6379/0"  # no password: as it is
    dsn = f"store.postgres_dsn=postgresql://im:{db_password}@h/im"
    got, _ = run_im("config", "get", "store.postgres_dsn", "--set", dsn, cwd=tmp_path)
    assert got.returncode == 0 and db_password not in got.stdout and "im:***@h" in got.stdout, got.stdout
