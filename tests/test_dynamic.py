"""The table of dynamic settings (im.dynamic) and how a process applies them (im.live_config): valid
values apply over the configured ones, a bad one is ignored with one log line and the last good value
kept, a value removed goes back to the configured one, a re-read file applies only its dynamic settings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from im.config import Config, load_config
from im.dynamic import DYNAMIC, SettingError, check, check_key, known, markdown_table
from im.live_config import LiveConfig
from im.observability import tracing

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def test_every_dynamic_key_is_a_setting_and_the_docs_show_the_table() -> None:
    assert DYNAMIC, "the table is empty"
    for key in DYNAMIC:
        assert known(key), key
    assert markdown_table() in DOCS.read_text(), "docs/operations.md: paste im.dynamic.markdown_table() again"


def test_check_refuses_unknown_static_and_invalid_values_saying_why() -> None:
    base = load_config(None)
    assert check(base, "limits.send_rate", "500") == 500.0
    assert check(base, "rates.sends_per_user", "20/2") == {"limit": 20, "period": 2.0}
    assert check(base, "log_level", "debug") == "debug"
    with pytest.raises(SettingError, match="no such setting"):
        check_key("limits.no_such_thing")
    with pytest.raises(SettingError, match="read at start only"):
        check_key("http.port")
    with pytest.raises(SettingError, match="no such setting"):
        check_key("limits")  # a section, not a setting
    with pytest.raises(SettingError, match="send_rate"):
        check(base, "limits.send_rate", "fast")
    with pytest.raises(SettingError, match="greater than 0"):
        check(base, "limits.send_rate", "0")
    with pytest.raises(SettingError, match="LIMIT/PERIOD"):
        check(base, "rates.sends_per_user", "20")


def _live(**sets: str) -> tuple[LiveConfig, list[Config]]:
    live = LiveConfig(load_config(None, {"limits": {"send_rate": 100}}))
    applied: list[Config] = []
    live.on_change(applied.append)
    return live, applied


def test_centre_values_apply_and_a_removed_one_goes_back_to_the_configured_value() -> None:
    live, applied = _live()
    live.set_centre({"limits.send_rate": "5", "rates.sends_per_user": "3/1"})
    assert live.current.limits.send_rate == 5.0
    assert (live.current.rates.sends_per_user.limit, live.current.rates.sends_per_user.period) == (3, 1.0)
    assert len(applied) == 1
    live.set_centre({"limits.send_rate": "5", "rates.sends_per_user": "3/1"})  # nothing changed: no call
    assert len(applied) == 1
    live.set_centre({})
    assert live.current.limits.send_rate == 100.0  # the configured value (flags), not the default
    assert len(applied) == 2


def test_a_bad_value_keeps_the_last_good_one_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    live, applied = _live()
    live.set_centre({"limits.send_rate": "5"})
    with caplog.at_level(logging.WARNING, logger="im.config"):
        live.set_centre({"limits.send_rate": "fast"})
        live.set_centre({"limits.send_rate": "fast", "log_level": "debug"})  # the same bad value: no new line
        live.set_centre({"limits.send_rate": "fast", "http.port": "1"})  # not dynamic: ignored, one line
    # Warnings only: whether the INFO line of the first change is captured depends on the level an earlier
    # test left on the root logger.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in lines if "limits.send_rate='fast' ignored" in m]) == 1, lines
    assert "keeping 5.0" in lines[0]
    assert len([m for m in lines if "http.port" in m]) == 1, lines
    assert live.current.limits.send_rate == 5.0
    assert live.current.http.port == 8080
    live.set_centre({"limits.send_rate": "7"})
    assert live.current.limits.send_rate == 7.0
    assert applied[-1].limits.send_rate == 7.0


def test_a_reloaded_file_applies_dynamic_settings_and_names_the_others(caplog: pytest.LogCaptureFixture) -> None:
    live, applied = _live()
    fresh = load_config(None, {"limits": {"send_rate": 9}, "http": {"port": 9999}, "log_level": "warning"})
    with caplog.at_level(logging.WARNING, logger="im.config"):
        live.set_base(fresh)
    assert live.current.limits.send_rate == 9.0
    assert live.current.log_level == "warning"
    assert live.current.http.port == 8080  # needs a restart: not applied
    restart = [r.getMessage() for r in caplog.records if "need a restart" in r.getMessage()]
    assert len(restart) == 1 and "http.port" in restart[0] and "send_rate" not in restart[0]
    assert applied and applied[-1].limits.send_rate == 9.0
    # The centre still wins over the file for what it holds.
    live.set_centre({"limits.send_rate": "2"})
    live.set_base(load_config(None, {"limits": {"send_rate": 50}}))
    assert live.current.limits.send_rate == 2.0


def test_config_root_is_beside_the_registry_prefix() -> None:
    assert load_config(None).registry.config_root() == "/im/config/"
    assert load_config(None, {"registry": {"prefix": "/a/b/services/"}}).registry.config_root() == "/a/b/config/"
    explicit = {"registry": {"config_prefix": "/elsewhere/"}}
    assert load_config(None, explicit).registry.config_root() == "/elsewhere/"


def test_the_trace_sample_ratio_changes_live() -> None:
    before = tracing._ratio
    try:
        tracing.set_sample_ratio(1.0)
        assert all(tracing.sampled() for _ in range(100))
        tracing.set_sample_ratio(0.0)
        assert not any(tracing.sampled() for _ in range(100))
        with pytest.raises(ValueError, match="between 0 and 1"):
            tracing.set_sample_ratio(1.5)
    finally:
        tracing.set_sample_ratio(before)


def _im_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("IM_")} | (env or {})
    cmd = [sys.executable, "-m", "im", "config", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=clean)


def test_im_config_get_shows_the_layers_and_set_refuses_without_etcd() -> None:
    got = _im_config("get", "limits.send_rate", "--set", "limits.send_rate=5", env={"IM_LIMITS__SEND_RATE": "7"})
    assert got.returncode == 0, got.stderr
    assert "limits.send_rate = 5.0   (from flags)" in got.stdout
    assert "  default      2000.0" in got.stdout and "  environment  7" in got.stdout
    secret = "a-secret-of-twenty-chars"
    masked = _im_config("get", "auth.secret", "--set", f"auth.secret={secret}")
    assert masked.returncode == 0 and secret not in masked.stdout and "***" in masked.stdout
    static = _im_config("set", "http.port", "1")
    assert static.returncode == 2 and "read at start only" in static.stderr
    no_centre = _im_config("set", "limits.send_rate", "5")
    assert no_centre.returncode == 2 and "registry.kind=etcd" in no_centre.stderr


def test_configuration_lines_mask_a_password_in_a_url(caplog: pytest.LogCaptureFixture) -> None:
    live, _ = _live()
    with caplog.at_level(logging.INFO, logger="im.config"):
        live.set_centre({"events.webhook_url": "https://push:hunter2-secret@push.example/im"})
        live.set_centre({"events.webhook_url": "ftp://push:other-secret@push.example/im"})  # refused
    lines = [r.getMessage() for r in caplog.records]
    assert any("events.webhook_url=https://push:***@push.example/im" in m for m in lines), lines
    assert any("ignored" in m for m in lines), lines
    assert not [m for m in lines if "hunter2-secret" in m or "other-secret" in m], lines
