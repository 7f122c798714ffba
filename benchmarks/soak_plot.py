"""The soak's arithmetic and picture: least-squares slopes and an SVG written by hand (no plotting library).

>>> slope([0, 1, 2, 3], [5, 7, 9, 11])
2.0
>>> slope([1], [3]) is None
True
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def slope(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than two points or no spread in xs)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    n = len(pts)
    if n < 2:
        return None
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return round(sum((x - mx) * (y - my) for x, y in pts) / sxx, 4)


def slope_at_equal(xs: Sequence[float], zs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least squares of ys = a + b*xs + c*zs: (b, c). With xs the time and zs a process's connections,
    b is its growth that the connections it holds do not explain (what a leak would show), c its cost per
    connection. None with fewer than four points or when xs and zs move together (no way to tell apart)."""
    n = len(xs)
    if n < 4:
        return None
    mx, mz, my = sum(xs) / n, sum(zs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    szz = sum((z - mz) ** 2 for z in zs)
    sxz = sum((x - mx) * (z - mz) for x, z in zip(xs, zs, strict=True))
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    szy = sum((z - mz) * (y - my) for z, y in zip(zs, ys, strict=True))
    det = sxx * szz - sxz * sxz
    if sxx == 0 or szz == 0 or abs(det) < 1e-9 * sxx * szz:
        return None
    return (szz * sxy - sxz * szy) / det, (sxx * szy - sxz * sxy) / det


def _panel(
    out: list[str],
    top: float,
    title: str,
    series: list[tuple[str, list[tuple[float, float]]]],
    t_max: float,
    faults: list[tuple[float, str]],
    warmup: float,
) -> None:
    left, width, height = 70.0, 860.0, 200.0
    ys = [y for _, pts in series for _, y in pts]
    y_max = max(ys, default=1.0) * 1.1 or 1.0

    def px(t: float) -> float:
        return left + width * t / (t_max or 1.0)

    def py(y: float) -> float:
        return top + height - height * y / y_max

    out.append(f'<text x="{left}" y="{top - 8}" font-size="14" font-weight="bold">{html.escape(title)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>')
    if warmup < t_max:
        out.append(
            f'<rect x="{left}" y="{top}" width="{px(warmup) - left:.1f}" height="{height}" fill="#eee" opacity="0.6"/>'
        )
    for i in range(5):
        y = y_max * i / 4
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" font-size="10" text-anchor="end">{y:.0f}</text>')
    for t, _ in faults:
        x = px(t)
        line = f'x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + height}"'
        out.append(f'<line {line} stroke="#bbb" stroke-dasharray="3,3"/>')
    for k, (name, pts) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        if pts:
            d = " ".join(f"{px(t):.1f},{py(y):.1f}" for t, y in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        lx = left + 10 + 105 * k
        out.append(f'<rect x="{lx}" y="{top + height + 8}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{top + height + 17}" font-size="11">{html.escape(name)}</text>')


def write_svg(
    path: Path, rows: list[dict[str, Any]], names: list[str], faults: list[tuple[float, str]], warmup: float
) -> None:
    """Four panels over time (minutes on the axis): RSS and descriptors per process, connections (held by
    the clients, open on each gateway) and asyncio tasks per node. Dashed lines: faults; grey: the warm-up
    left out of the slopes."""
    t_max = max((r["t"] for r in rows), default=1.0)

    def series(key: str) -> list[tuple[str, list[tuple[float, float]]]]:
        return [(n, [(r["t"], float(r[f"{n}.{key}"])) for r in rows if r.get(f"{n}.{key}") is not None]) for n in names]

    tasks = [(n, pts) for n, pts in series("tasks") if pts]
    conns = [("held (clients)", [(r["t"], float(r["held"])) for r in rows])]
    conns += [(f"{n}", pts) for n, pts in series("conns") if pts and any(y for _, y in pts)]
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="960" height="1120" font-family="sans-serif">']
    out.append('<rect width="100%" height="100%" fill="white"/>')
    _panel(out, 30, "RSS, MiB", series("rss_mib"), t_max, faults, warmup)
    _panel(out, 300, "open descriptors", series("fds"), t_max, faults, warmup)
    _panel(out, 570, "connections: held by the clients, open on each gateway", conns, t_max, faults, warmup)
    _panel(out, 840, "asyncio tasks per node", tasks, t_max, faults, warmup)
    minutes = int(t_max // 60)
    for m in range(0, minutes + 1, max(1, minutes // 15)):
        x = 70 + 860 * m * 60 / (t_max or 1.0)
        out.append(f'<text x="{x:.1f}" y="1080" font-size="10" text-anchor="middle">{m}</text>')
    out.append('<text x="500" y="1105" font-size="12" text-anchor="middle">minutes (dashed: faults)</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
