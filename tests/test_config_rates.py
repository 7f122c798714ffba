"""The ``rates`` section: LIMIT/PERIOD rules from flags, files and the environment; bad ones named."""

from __future__ import annotations

import pytest

from im.config import ConfigError, RateConfig, load_config


def test_rules_as_text_or_mapping() -> None:
    c = load_config(
        None,
        {
            "rates": {
                "login_per_address": "5/60",
                "sends_per_user": "100/1s",
                "typing_per_user": {"limit": 3, "period": 0.5},
            }
        },
    )
    assert c.rates.login_per_address == RateConfig(limit=5, period=60.0)
    assert c.rates.sends_per_user == RateConfig(limit=100, period=1.0)
    assert c.rates.typing_per_user == RateConfig(limit=3, period=0.5)
    assert c.rates.register_per_address == RateConfig(limit=20, period=3600.0)  # untouched default


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IM_RATES__LOGIN_PER_ACCOUNT", "7/120")
    assert load_config(None, {}).rates.login_per_account == RateConfig(limit=7, period=120.0)


@pytest.mark.parametrize("bad", ["20", "0/60", "20/0", "x/60", "20/-1"])
def test_bad_rules_name_the_field(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"rates\.login_per_address"):
        load_config(None, {"rates": {"login_per_address": bad}})


def test_defaults_leave_room_for_normal_use() -> None:
    r = load_config(None, {}).rates
    assert r.sends_per_user.limit / r.sends_per_user.period >= 2000  # im bench: ~2,000 sends/s per user
    # One address alone cannot spend the per-account login budget (docs/security.md section 5).
    pair = r.login_per_account_address
    assert pair.limit + 3600 * pair.limit / pair.period < r.login_per_account.limit * 3600 / r.login_per_account.period
    assert r.hash_concurrency >= 1 and r.hash_per_address >= 1
