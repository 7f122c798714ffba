"""``load_config``: defaults < YAML file < ``IM_...`` environment < flags, and errors that name the field."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from im.config import Config, ConfigError, load_config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("IM_"):
            monkeypatch.delenv(key)


Write = Callable[[str], Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """Write the YAML config file; returns its path."""

    def write(text: str) -> Path:
        path = tmp_path / "im.yaml"
        path.write_text(text)
        return path

    return write


def test_defaults() -> None:
    c = load_config()
    assert c == load_config(None, {})
    assert c.data_dir == Path("./im-data") and c.log_level == "info"
    assert (c.http.host, c.http.port, c.http.public_url) == ("127.0.0.1", 8080, None)
    assert (c.gateway.ws_port, c.gateway.node_id) == (8081, "gw-1")
    assert c.limits.send_rate == 2000.0 and c.limits.max_frame_bytes == 64 * 1024
    assert c.auth.secret is None and c.auth.argon2_memory_kib == 65536
    assert c.store.kind == "sqlite"


def test_file_overrides_defaults(write: Write) -> None:
    path = write("log_level: debug\nhttp:\n  port: 9000\nlimits:\n  max_frame_bytes: 2048\n  send_rate: 5\n")
    c = load_config(path)
    assert c.log_level == "debug"
    assert c.http.port == 9000 and c.http.host == "127.0.0.1"  # unset fields of a section keep defaults
    assert c.limits.max_frame_bytes == 2048 and c.limits.send_rate == 5.0
    assert c.limits.max_body_bytes == 32 * 1024
    assert c.gateway.ws_port == 8081


def test_empty_file_is_all_defaults(write: Write) -> None:
    assert load_config(write("")) == load_config()


def test_env_overrides_file(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write("log_level: warning\nhttp:\n  host: 0.0.0.0\n  port: 9000\nauth:\n  access_ttl: 60\n")
    monkeypatch.setenv("IM_HTTP__PORT", "9100")
    monkeypatch.setenv("IM_LOG_LEVEL", "error")
    monkeypatch.setenv("IM_LIMITS__SEND_RATE", "7.5")
    c = load_config(path)
    assert c.http.port == 9100 and c.log_level == "error" and c.limits.send_rate == 7.5
    # Field by field: the file's other values in the same section stay.
    assert c.http.host == "0.0.0.0"
    assert c.auth.access_ttl == 60.0


def test_env_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IM_GATEWAY__NODE_ID", "gw-7")
    monkeypatch.setenv("IM_DATA_DIR", "/tmp/somewhere")
    c = load_config()
    assert c.gateway.node_id == "gw-7" and c.data_dir == Path("/tmp/somewhere")
    assert c.gateway.ws_port == 8081


def test_flags_override_env_and_file(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write("http:\n  port: 9000\n  public_url: https://chat.example\nlimits:\n  send_rate: 3\n")
    monkeypatch.setenv("IM_HTTP__PORT", "9100")
    monkeypatch.setenv("IM_HTTP__HOST", "10.0.0.1")
    c = load_config(path, {"http": {"port": 9200}, "limits": {"send_rate": "5"}})
    assert c.http.port == 9200 and c.limits.send_rate == 5.0
    assert c.http.host == "10.0.0.1"  # env, where the flags are silent
    assert c.http.public_url == "https://chat.example"  # file, where env and flags are silent


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ("flag", "http.port"),
        ("file", "http.port"),
        ("env", "http.port"),
        ("flag", "limits.max_frame_bytes"),
        ("flag", "log_level"),
        ("flag", "auth.secret"),
    ],
)
def test_invalid_value_names_the_field(source: str, field: str, write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {"http.port": "70000", "limits.max_frame_bytes": "12", "log_level": "loud", "auth.secret": "short"}[field]
    section, _, leaf = field.rpartition(".")
    overrides: dict[str, Any] = {}
    path = None
    if source == "flag":
        overrides = {section: {leaf: bad}} if section else {leaf: bad}
    elif source == "file":
        path = write(f"{section}:\n  {leaf}: {bad}\n" if section else f"{leaf}: {bad}\n")
    else:
        monkeypatch.setenv(f"IM_{field.upper().replace('.', '__')}", bad)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert field in str(info.value)


def test_not_a_number_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"http\.port"):
        load_config(None, {"http": {"port": "notanumber"}})


def test_unknown_top_level_key_in_file(write: Write) -> None:
    with pytest.raises(ConfigError, match="bogus"):
        load_config(write("bogus: 1\n"))


def test_unknown_nested_key_in_file(write: Write) -> None:
    """A typo inside a section (``http.prot``) must not be ignored silently."""
    with pytest.raises(ConfigError, match=r"http\.prot"):
        load_config(write("http:\n  prot: 9000\n"))


def test_unknown_nested_key_in_flags() -> None:
    """``--set limits.send_rat=5`` (a typo) must not be ignored silently either."""
    with pytest.raises(ConfigError, match=r"limits\.send_rat"):
        load_config(None, {"limits": {"send_rat": "5"}})


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_file(write: Write, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(text))


def test_unparseable_or_missing_file(write: Write, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(write("http: [unclosed\n"))
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")


def test_argon2_memory_must_cover_parallelism(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="argon2"):
        load_config(None, {"auth": {"argon2_memory_kib": 31, "argon2_parallelism": 4}})
    c = load_config(None, {"auth": {"argon2_memory_kib": 32, "argon2_parallelism": 4}})
    assert c.auth.argon2_memory_kib == 32
    # The rule holds across sources too: memory from the file, parallelism from env, then from a flag.
    path = write("auth:\n  argon2_memory_kib: 1024\n")
    monkeypatch.setenv("IM_AUTH__ARGON2_PARALLELISM", "200")
    with pytest.raises(ConfigError, match="argon2"):
        load_config(path)
    monkeypatch.delenv("IM_AUTH__ARGON2_PARALLELISM")
    with pytest.raises(ConfigError, match="argon2"):
        load_config(path, {"auth": {"argon2_parallelism": 200}})
    assert load_config(path, {"auth": {"argon2_parallelism": 128}}).auth.argon2_parallelism == 128


def test_result_is_a_config() -> None:
    assert isinstance(load_config(), Config)


@pytest.mark.parametrize("url", ["ftp://zipkin/api/v2/spans", "127.0.0.1:9411/api/v2/spans", "http://", "http:// x"])
def test_zipkin_url_must_be_http(url: str) -> None:
    with pytest.raises(ConfigError, match=r"tracing\.zipkin_url"):
        load_config(overrides={"tracing": {"zipkin_url": url}})
    assert load_config(overrides={"tracing": {"zipkin_url": "https://z.example:9411/api/v2/spans"}})


def test_s3_file_storage_needs_a_bucket_and_composes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from im.backends.blobs.s3 import S3BlobStorage
    from im.compose import build_blobs

    with pytest.raises(ConfigError, match=r"files\.s3\.bucket"):
        load_config(None, {"files": {"storage": "s3"}})
    with pytest.raises(ConfigError, match=r"files\.s3\.part_bytes"):
        load_config(None, {"files": {"storage": "s3", "s3": {"bucket": "b", "part_bytes": 1024}}})
    monkeypatch.setenv("IM_FILES__STORAGE", "s3")
    monkeypatch.setenv("IM_FILES__S3__BUCKET", "im-files")
    monkeypatch.setenv("IM_FILES__S3__PREFIX", "prod/")
    files = {"encrypt": False, "s3": {"endpoint": "http://127.0.0.1:8333"}}
    c = load_config(None, {"data_dir": str(tmp_path), "files": files})
    assert (c.files.s3.bucket, c.files.s3.endpoint, c.files.s3.allow_http) == (
        "im-files",
        "http://127.0.0.1:8333",
        False,
    )
    blobs = build_blobs(c, None)
    assert isinstance(blobs, S3BlobStorage)
    assert blobs.settings.prefix == "prod/" and blobs.key("a" * 64) == "prod/aa/" + "a" * 64
