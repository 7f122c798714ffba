"""Which settings may change while the server runs: the one table (:data:`DYNAMIC`), and how a value for
one of them is checked.

Every other setting is read once at start and needs a restart; ``im config set`` refuses it saying so. A
dynamic setting's value comes, lowest first, from: the default < the YAML file < ``IM_`` environment
variables < flags (``--set``), then the configuration centre (etcd, ``im config set``), which wins while it
holds a value. Values are kept as the text an operator typed, exactly as ``--set KEY=VALUE`` takes it, and
checked by the same pydantic fields as the file (:func:`with_values`).

The table is rendered into docs/operations.md ("Configuration centre") by :func:`markdown_table`; a test
keeps the two the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError

from im.config import Config


@dataclass(frozen=True, slots=True)
class Dynamic:
    """One setting that applies without a restart, and where and when a change takes effect."""

    key: str
    applies: str


_GATEWAY_NOW = "gateways (and `im serve`): every connection, from its next frame"
_LOGINS = "API nodes (and `im serve`): the next attempt"
_GATEWAY_LOGINS = "gateways (and `im serve`): the next `auth` frame"

#: The settings that change live; the single source of truth (docs/operations.md renders it).
DYNAMIC: dict[str, Dynamic] = {
    d.key: d
    for d in (
        Dynamic("log_level", "every process: the next log line"),
        Dynamic("limits.send_rate", _GATEWAY_NOW),
        Dynamic("limits.typing_rate", _GATEWAY_NOW),
        Dynamic("limits.max_in_flight", _GATEWAY_NOW),
        Dynamic("limits.max_body_bytes", _GATEWAY_NOW),
        Dynamic(
            "limits.max_frame_bytes",
            "gateways: new connections (an open one keeps the size its `auth_ok` announced)",
        ),
        Dynamic("limits.auth_rate", _GATEWAY_LOGINS),
        Dynamic("limits.auth_burst", _GATEWAY_LOGINS),
        Dynamic("limits.auth_max_wait", _GATEWAY_LOGINS),
        Dynamic("limits.history_page_max", "API nodes (and `im serve`): the next history request"),
        Dynamic(
            "limits.send_order_hold",
            "transfer nodes (and `im serve`): every barrier, held or new; gateways: a connection's barriers from"
            " its next refusal",
        ),
        Dynamic("rates.sends_per_user", _GATEWAY_NOW),
        Dynamic("rates.sends_per_conversation", _GATEWAY_NOW),
        Dynamic("rates.typing_per_user", _GATEWAY_NOW),
        Dynamic("rates.receipts_per_user", _GATEWAY_NOW),
        Dynamic("rates.login_per_account_address", _LOGINS),
        Dynamic("rates.login_per_account", _LOGINS),
        Dynamic("rates.login_per_address", _LOGINS),
        Dynamic("rates.register_per_address", _LOGINS),
        Dynamic("files.max_upload_bytes", "API nodes (and `im serve`): the next upload"),
        Dynamic("tracing.sample_ratio", "every process with `tracing.enabled`: the next new trace"),
        Dynamic(
            "events.webhook_url",
            "processes running the push consumer (started with a webhook URL): the next push",
        ),
    )
}


class SettingError(ValueError):
    """A key or value the configuration centre refuses; the message says why."""


def _field(model: type[BaseModel], name: str) -> Any:
    field = model.model_fields.get(name)
    if field is None:
        return None
    return field.annotation


def known(key: str) -> bool:
    """Whether ``key`` names a setting (``section.field`` or a top-level field), dynamic or not."""
    model: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        if i < len(parts) - 1:
            model = _field(model, part)
    annotation = _field(model, parts[-1])
    # A whole section (``limits``) is not one setting.
    return not (isinstance(annotation, type) and issubclass(annotation, BaseModel) and len(parts) == 1)


def check_key(key: str) -> None:
    """Raise :class:`SettingError` unless ``key`` is a dynamic setting (saying why not)."""
    if key in DYNAMIC:
        return
    if not known(key):
        raise SettingError(f"{key}: no such setting (im config get lists the dynamic ones)")
    raise SettingError(
        f"{key} is read at start only: change it in the file, environment or flags and restart the processes "
        "(im config get lists the settings that change live)"
    )


def value_of(config: Config, key: str) -> Any:
    """The value of ``key`` in ``config``, as JSON would hold it (a rate is ``{limit, period}``)."""
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    if isinstance(node, BaseModel):
        return node.model_dump(mode="json")
    if isinstance(node, Path):
        return str(node)
    if isinstance(node, list):
        return [str(v) if isinstance(v, Path) else v for v in node]
    return node


#: Shown masked wherever a value is printed or logged (``im config``, the nodes' configuration lines).
SECRET = frozenset({"auth.secret", "files.s3.secret_access_key"})
#: URLs whose password is shown masked (``postgresql://im:***@db/im``).
SECRET_URLS = frozenset({"store.postgres_dsn", "presence.redis_url", "events.amqp_url", "events.webhook_url"})


def masked(key: str, value: Any) -> Any:
    """``value`` of setting ``key`` as ``im config`` prints it: secrets as ``***``, URL passwords too."""
    if key in SECRET:
        return "***" if value else value
    if key in SECRET_URLS and isinstance(value, str):
        parts = urlsplit(value)
        if parts.password:
            host = parts.netloc.rpartition("@")[2]
            return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    return value


def shown(value: Any) -> str:
    """A value as an operator would type it again: a rate as ``LIMIT/PERIOD``."""
    if isinstance(value, dict) and set(value) == {"limit", "period"}:
        return f"{value['limit']}/{value['period']:g}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def with_values(base: Config, values: Mapping[str, Any]) -> Config:
    """``base`` with ``values`` (key -> text, or a value as :func:`value_of` gives it) laid over it,
    validated by the configuration's own fields.
    Raises :class:`SettingError` naming the key and the reason."""
    data = base.model_dump()
    for key, text in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = text
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise SettingError(problems) from None


def check(base: Config, key: str, text: str) -> Any:
    """The value ``text`` would give dynamic setting ``key`` over ``base``; :class:`SettingError` if
    ``key`` is not dynamic or ``text`` fails its field's validation."""
    check_key(key)
    return value_of(with_values(base, {key: text}), key)


def defaults() -> Config:
    """The built-in defaults alone (no file, and no ``IM_`` variables, which validating would read)."""
    return Config.model_construct()


def markdown_table() -> str:
    """The table of docs/operations.md, "Configuration centre": key, default, where it applies."""
    defaults_ = defaults()
    rows = ["| Setting | Default | Takes effect in |", "|---|---|---|"]
    for d in DYNAMIC.values():
        rows.append(f"| `{d.key}` | `{shown(value_of(defaults_, d.key))}` | {d.applies} |")
    return "\n".join(rows) + "\n"
