"""The bench's outputs: a rich table, the ``--json`` document and the ``--png`` plots."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["idle_table", "load_table", "write_json", "write_png"]


def _num(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{fmt}}{unit}"


def load_table(r: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    c = r["config"]
    shape = (
        f"{c['groups']} groups of {c['group_size']} ({c['group_senders']} sending)"
        if c["mode"] == "groups"
        else f"{c['pairs']} pairs"
    )
    title = (
        f"im bench: {shape}, {c['load']}, {c['transport']}/{c['encoding']}, "
        f"{c['duration']:g} s (+{c['warmup']:g} s warmup), {c['procs']} client procs"
    )
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    lat = r["latency_ms"]
    t.add_row("delivered messages/s", _num(r["delivered_per_s"]))
    t.add_row("sent (acked) messages/s", _num(r["acked_per_s"]))
    if r.get("offered_per_s"):
        t.add_row("offered messages/s", _num(r["offered_per_s"]))
    t.add_row("server CPU-ms per 1k delivered", _num(r["server_cpu_ms_per_1k"], ",.1f"))
    if c["mode"] == "groups":
        t.add_row("server CPU-ms per 1k sent", _num(r["server_cpu_ms_per_1k_sent"], ",.1f"))
    t.add_row("server CPU", _num(r["server_cpu_pct"], ".0f", " %"))
    if c.get("server_build"):
        t.add_row("server build (im.compiled)", c["server_build"])
    engines = r.get("engines_cpu_ms_per_1k") or {}
    for engine, ms in engines.items():
        t.add_row(f"{engine} CPU-ms per 1k delivered", _num(ms, ",.1f"))
    if engines and r.get("server_and_engines_cpu_ms_per_1k") is not None:
        t.add_row("server + engines CPU-ms per 1k delivered", _num(r["server_and_engines_cpu_ms_per_1k"], ",.1f"))
    t.add_row("bench clients CPU", _num(r["clients_cpu_pct"], ".0f", " %"))
    t.add_row("other processes' CPU", _num(r["other_cpu_pct"], ".0f", " %"))
    t.add_row("irq + softirq CPU (loopback networking)", _num(r.get("irq_cpu_pct"), ".0f", " %"))
    t.add_row(
        "latency p50 / p90 / p99 / max",
        " / ".join(_num(lat[k], ".2f") for k in ("p50", "p90", "p99", "max")) + " ms",
    )
    checks = r["checks"]
    for name in ("lost", "duplicated", "out_of_order"):
        style = "green" if checks[name] == 0 else "bold red"
        t.add_row(name.replace("_", "-"), f"[{style}]{checks[name]}[/]")
    others = {k: v for k, v in checks.items() if k not in ("lost", "duplicated", "out_of_order")}
    bad = {k: v for k, v in others.items() if v}
    t.add_row(
        "refused / errors / disconnects / unfinished",
        f"[{'bold red' if bad else 'green'}]"
        + " / ".join(str(others[k]) for k in ("refused", "errors", "disconnects", "unfinished"))
        + "[/]",
    )
    retried = r.get("totals", {}).get("retried_codes", {})
    if retried:
        t.add_row(
            "sends refused, then resent (by code)",
            "[yellow]" + ", ".join(f"{code} {n:,}" for code, n in sorted(retried.items())) + "[/]",
        )
    console.print(t)
    if retried.get("rate_limited"):
        console.print(
            f"[yellow]note: the server refused {retried['rate_limited']:,} sends rate_limited (its limits, e.g. "
            "rates.sends_per_user, held the load back): these figures are the limits', not its capacity. To "
            "measure capacity, lift them (--server-set rates.sends_per_user=1000000/2 "
            "--server-set rates.sends_per_conversation=1000000/2)[/]"
        )
    if r["problems"]:
        console.print("[bold red]problems:[/]")
        for p in r["problems"][:10]:
            console.print(f"  {p}")
    if r.get("noisy"):
        console.print(
            f"[yellow]note: {r['other_cpu_pct']:.0f} % of a core went to other processes during the "
            "measurement: figures are noisy[/]"
        )


def idle_table(r: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    c = r["config"]
    t = Table(
        title=f"im bench idle: {c['connections']:,} connections over {c['transport']}, {c['procs']} client procs",
        header_style="bold",
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("connections authenticated", f"{r['connected']:,}")
    t.add_row("failed", f"[{'green' if r['failed'] == 0 else 'bold red'}]{r['failed']}[/]")
    t.add_row("connect time", f"{r['connect_s']:.1f} s ({r['connect_per_s']:,.0f}/s)")
    t.add_row("server RSS before", _num(r["rss_before"] / 2**20 if r["rss_before"] else None, ",.1f", " MiB"))
    t.add_row("server RSS with connections", _num(r["rss_after"] / 2**20 if r["rss_after"] else None, ",.1f", " MiB"))
    t.add_row(
        "server memory per connection",
        _num(r["bytes_per_connection"] and r["bytes_per_connection"] / 1024, ",.1f", " KiB"),
    )
    if r.get("rss_closed"):
        t.add_row("server RSS after closing", _num(r["rss_closed"] / 2**20, ",.1f", " MiB"))
    console.print(t)
    for p in r["problems"][:10]:
        console.print(f"  [red]{p}[/]")


def write_json(r: dict[str, Any], path: str | Path) -> None:
    """The results as JSON (NaN, e.g. a latency with no sample, becomes null)."""
    doc = _clean({k: v for k, v in r.items() if not k.startswith("_")})
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _clean(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


def write_png(r: dict[str, Any], path: str | Path) -> None:
    """Latency histogram and delivered messages/s over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = [1000 * x for x in r.get("_latencies", [])] or list(r.get("latencies_ms_sample", []))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if lat:
        hi = max(lat)
        lo = max(min(lat), 1e-3)
        bins = [lo * (hi / lo) ** (i / 60) for i in range(61)] if hi > lo else 60
        ax1.hist(lat, bins=bins, color="#4477aa")
        ax1.set_xscale("log")
        for name, color in (("p50", "green"), ("p99", "red")):
            value = r["latency_ms"][name]
            ax1.axvline(value, color=color, linestyle="--", label=f"{name} {value:.2f} ms")
        ax1.legend()
    ax1.set_xlabel("latency (ms, log scale)")
    ax1.set_ylabel("messages")
    ax1.set_title("delivery latency (measured interval)")
    series = r.get("series", [])
    xs, ys = [], []
    for a, b in itertools.pairwise(series):
        dt = b["t"] - a["t"]
        if dt > 0:
            xs.append(b["t"])
            ys.append((b["delivered"] - a["delivered"]) / dt)
    ax2.plot(xs, ys, color="#228833")
    c = r["config"]
    ax2.axvspan(0, c["warmup"], color="grey", alpha=0.2, label="warmup")
    ax2.axvline(c["warmup"] + c["duration"], color="grey", linestyle=":", label="stop")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("delivered messages/s")
    ax2.set_title("throughput over time")
    ax2.legend()
    fig.suptitle(
        f"im bench: {r['delivered_per_s']:,.0f} msg/s delivered, {c['transport']}, "
        f"{c['pairs'] or c['groups']} {c['mode']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
