"""Dynamic settings applied while a process runs (the table is :data:`im.dynamic.DYNAMIC`).

A :class:`LiveConfig` holds the process's configuration as it started (its *base*: defaults < file <
environment < flags) and the values the configuration centre holds; it lays the second over the first
and, when the result changes, calls its appliers. The appliers change what the hot paths read, in
place: the hub's shared :class:`~im.protocol.session.Limits` (one attribute read per frame, as before),
its shared rate rules (each connection takes new hits at its next limited frame), the read side's page
size, the upload size, the login budgets, the root logger's level and the trace sampler. Nothing on the
per-message path looks a setting up.

Where values come from:

- registry.kind=etcd (every role of a cluster, and ``im serve`` on etcd): :class:`CentreFollower` reads
  the centre (im.backends.config) at start and follows it; its watch reopens after etcd restarts;
- otherwise ``im serve`` re-reads its file, environment and flags on SIGHUP (:class:`FileReload`).

A value that fails its field's validation (written around ``im config set``, e.g. with etcdctl) is not
applied: the process keeps its last good value and logs one line for that value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from im.backends.config import ConfigStore
from im.backends.registry import Registry
from im.compose import build_centre, hub_rates, login_rules
from im.config import Config, ConfigError, LimitsConfig
from im.core.accounts import AccountService
from im.core.committer import Committer
from im.core.reads import ChatReads
from im.dynamic import DYNAMIC, SettingError, masked, shown, value_of, with_values
from im.files import FileService
from im.gateway.hub import Hub
from im.lifecycle import Lifecycle, Part
from im.observability import tracing

if TYPE_CHECKING:  # RabbitMQ's client: imported by im.compose.event_workers when events go there
    from im.events.push import PushConsumer

log = logging.getLogger("im.config")

Applier = Callable[[Config], None]


class LiveConfig:
    """The current configuration of a process: its base, with the centre's valid dynamic values over it."""

    def __init__(self, base: Config) -> None:
        self.base = base
        #: What the process applies now (base + accepted centre values).
        self.current = base
        #: key -> text accepted from the centre (the last good value of each key it holds).
        self.accepted: dict[str, str] = {}
        self._refused: dict[str, str] = {}  # key -> the text already logged as refused (one line per value)
        self._appliers: list[Applier] = []

    def on_change(self, applier: Applier) -> None:
        """Call ``applier`` with the new configuration after each change of a dynamic setting."""
        self._appliers.append(applier)

    def set_centre(self, values: Mapping[str, str]) -> None:
        """Everything the centre holds now (a key no longer there: back to the base value)."""
        accepted: dict[str, str] = {}
        for key, text in sorted(values.items()):
            try:
                if key not in DYNAMIC:
                    raise SettingError("not a setting that changes live")
                with_values(self.base, {key: text})
            except SettingError as exc:
                if self._refused.get(key) != text:
                    self._refused[key] = text
                    keeping = shown(masked(key, value_of(self.current, key))) if key in DYNAMIC else "nothing"
                    bad = masked(key, text)
                    log.warning("configuration centre: %s=%r ignored (%s); keeping %s", key, bad, exc, keeping)
                if key in self.accepted:
                    accepted[key] = self.accepted[key]
                continue
            self._refused.pop(key, None)
            accepted[key] = text
        for key in [k for k in self._refused if k not in values]:
            del self._refused[key]
        self.accepted = accepted
        self._rebuild()

    def set_base(self, fresh: Config) -> None:
        """A re-read file (SIGHUP): its dynamic settings apply; any other difference is logged in one line
        (it needs a restart) and not applied."""
        restart = sorted(k for k in _flat_differences(self.base, fresh) if k not in DYNAMIC)
        if restart:
            log.warning("configuration reloaded: %s changed but need a restart (not applied)", ", ".join(restart))
        dynamic = {k: value_of(fresh, k) for k in DYNAMIC}  # as values: a None stays None
        try:
            self.base = with_values(self.base, dynamic)
        except SettingError as exc:  # cannot happen for values a Config already holds; say so if it does
            log.error("configuration reload refused: %s", exc)
            return
        self._rebuild()

    def _rebuild(self) -> None:
        try:
            fresh = with_values(self.base, self.accepted)
        except SettingError as exc:
            log.error("configuration centre: values refused together (%s); keeping the current ones", exc)
            return
        changed = [k for k in DYNAMIC if value_of(fresh, k) != value_of(self.current, k)]
        if not changed:
            return
        self.current = fresh
        log.info("configuration: %s", ", ".join(f"{k}={shown(masked(k, value_of(fresh, k)))}" for k in changed))
        for apply in list(self._appliers):
            try:
                apply(fresh)
            except Exception:
                log.exception("applying the configuration with %s failed", getattr(apply, "__qualname__", apply))


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict) and set(node) != {"limit", "period"}:
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def _flat_differences(a: Config, b: Config) -> set[str]:
    fa, fb = _flat(a.model_dump(mode="json")), _flat(b.model_dump(mode="json"))
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


# --- appliers: what each component reads ---------------------------------------------------------------


def apply_logging(config: Config) -> None:
    logging.getLogger().setLevel(config.log_level.upper())


def apply_tracing(config: Config) -> None:
    tracing.set_sample_ratio(config.tracing.sample_ratio)


def follow_hub(live: LiveConfig, hub: Hub) -> None:
    """The hub's shared session limits (in place) and shared rate rules follow ``live``."""

    def apply(config: Config) -> None:
        lim, shared = config.limits, hub.limits
        shared.send_rate = lim.send_rate
        shared.typing_rate = lim.typing_rate
        shared.max_in_flight = lim.max_in_flight
        shared.max_body_bytes = lim.max_body_bytes
        shared.max_frame_bytes = lim.max_frame_bytes  # read by each new connection's transport and session
        shared.auth_rate = lim.auth_rate  # read by the login gate at the next auth
        shared.auth_burst = lim.auth_burst
        shared.auth_max_wait = min(lim.auth_max_wait, config.gateway.auth_timeout / 2)
        shared.send_order_hold = lim.send_order_hold  # read by each session's barrier at its next refusal
        hub.rates.set_rates(hub_rates(config))

    live.on_change(apply)


def follow_committer(live: LiveConfig, committer: Committer) -> None:
    """The committer's sender-order barriers hold for ``limits.send_order_hold``: the barriers already
    held too (each is judged against the hold in force when a later send asks)."""

    def apply(config: Config) -> None:
        committer.order.hold = config.limits.send_order_hold

    live.on_change(apply)


def follow_reads(live: LiveConfig, reads: ChatReads, api_limits: LimitsConfig | None = None) -> None:
    """History pages: the read side's cap, and the HTTP routes' (``api_limits``, the object the app holds)."""

    def apply(config: Config) -> None:
        reads.history_page_max = config.limits.history_page_max
        if api_limits is not None:
            api_limits.history_page_max = config.limits.history_page_max

    live.on_change(apply)


def follow_files(live: LiveConfig, files: FileService) -> None:
    """The largest upload accepted (checked as the bytes stream in)."""

    def apply(config: Config) -> None:
        files.max_upload_bytes = config.files.max_upload_bytes

    live.on_change(apply)


def follow_push(live: LiveConfig, consumers: Sequence[PushConsumer]) -> None:
    """The push webhook's URL (read by each POST). A process started without one runs no consumer, and
    unsetting it cannot stop a running one: that needs a restart, and the URL in use stays."""

    def apply(config: Config) -> None:
        url = config.events.webhook_url
        if not consumers:
            return
        if url is None:
            keeping = consumers[0].webhook_url
            log.warning("events.webhook_url cannot be unset while pushing (restart to stop); keeping %s", keeping)
            return
        for consumer in consumers:
            consumer.webhook_url = url

    live.on_change(apply)


def follow_accounts(live: LiveConfig, accounts: AccountService) -> None:
    """The login and registration budgets (when this process counts them)."""

    def apply(config: Config) -> None:
        if accounts.guard is not None:
            accounts.guard.set_rules(**login_rules(config))

    live.on_change(apply)


# --- sources: the centre (etcd), or the file on SIGHUP ---------------------------------------------------


class CentreFollower:
    """A lifecycle part: reads the centre before the process serves (within ``first_read`` seconds; an
    etcd that does not answer by then is logged, the base values are used meanwhile) and follows it
    until the stop."""

    def __init__(self, live: LiveConfig, store: ConfigStore, *, first_read: float = 5.0) -> None:
        self.live = live
        self.store = store
        self.first_read = first_read
        self._unwatch: Callable[[], None] | None = None

    async def start(self) -> None:
        await self.store.start()
        read = asyncio.Event()

        def changed(values: dict[str, str]) -> None:
            self.live.set_centre(values)
            read.set()

        self._unwatch = self.store.watch(changed)
        try:
            await asyncio.wait_for(read.wait(), self.first_read)
        except TimeoutError:
            log.warning(
                "configuration centre: not read within %gs; using the configured values until it answers",
                self.first_read,
            )

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        await self.store.close()


class FileReload:
    """SIGHUP for a process without a centre (``im serve`` on the in-memory registry): ``load`` reads the
    file, environment and flags again; the dynamic settings apply, others are named as needing a restart.
    A file that does not load is logged and nothing changes."""

    def __init__(self, live: LiveConfig, load: Callable[[], Config]) -> None:
        self.live, self.load = live, load

    def __call__(self) -> None:
        try:
            fresh = self.load()
        except ConfigError as exc:
            log.error("configuration reload failed, nothing changed: %s", exc)
            return
        self.live.set_base(fresh)


def live_config(
    config: Config,
    registry: Registry,
    lifecycle: Lifecycle,
    *,
    reload: Callable[[], Config] | None = None,
    hub: Hub | None = None,
    reads: ChatReads | None = None,
    api_limits: LimitsConfig | None = None,
    accounts: AccountService | None = None,
    files: FileService | None = None,
    committer: Committer | None = None,
) -> tuple[LiveConfig, list[Part]]:
    """A process's live configuration, following what it has; the parts to run (the centre's follower,
    placed after the stores). Without a centre, ``reload`` (if given) is SIGHUP's re-read."""
    live = LiveConfig(config.model_copy(deep=True))
    live.on_change(apply_logging)
    live.on_change(apply_tracing)
    if hub is not None:
        follow_hub(live, hub)
    if reads is not None:
        follow_reads(live, reads, api_limits)
    if accounts is not None:
        follow_accounts(live, accounts)
    if files is not None:
        follow_files(live, files)
    if committer is not None:
        follow_committer(live, committer)
    store = build_centre(config, registry)
    if store is not None:
        follower = CentreFollower(live, store)
        return live, [Part("configuration centre", follower.start, follower.stop)]
    if reload is not None:
        lifecycle.on_reload(FileReload(live, reload))
    return live, []


__all__ = [
    "CentreFollower",
    "FileReload",
    "LiveConfig",
    "build_centre",
    "live_config",
]
