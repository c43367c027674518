"""The first screen's chart as static SVG: a pure function, stats frame in, SVG text out.

Why: a browser meeting the page for the first time spends seconds downloading and compiling
Plotly's JavaScript (Streamlit's 4.7 MB Plotly chunk) before the interactive score chart can
draw (docs/dashboard-frame.md, "First paint"). The Scores tab therefore sends this SVG of the
same chart, drawn from the same stats frame as `dashboard.charts.score_overview`, together
with the Plotly chart; the browser draws the image as soon as its main thread gets to it
(usually before Plotly's script has run), and `SWAP_CSS` hides it as soon as Plotly has
drawn the interactive chart in the same container.

The image goes out as Markdown image syntax with a data URI (`static_markdown`): Markdown's
element script comes with Streamlit's own bundle, and image syntax needs neither ``st.html``'s
script chunk nor the HTML parser (``rehype-raw``) that Markdown loads for raw HTML. Those
chunks are loaded lazily, six requests at a time, behind the chunks of every sidebar widget;
the image needs no request at all.
"""

from __future__ import annotations

import base64
import math
from html import escape

import pandas as pd

from dashboard.charts import ALL_COLOR, CUT_COLOR, KEPT_COLOR, PRUNED_COLOR
from dashboard.frames import STAT_COLUMNS

STATIC_CLASS = "ps-static-chart"
# The Streamlit container (key) holding both charts, and the one inside it holding the static
# copy; CSS hides the static one once the Plotly chart beside it has drawn (Chromium, Firefox
# and Safari all support :has).
CONTAINER_KEY = "ps_overview"
STATIC_KEY = "ps_static_chart"
SWAP_CSS = (  # the static copy's child of the charts' container, whatever Streamlit wraps it in
    f"<style>.st-key-{CONTAINER_KEY}:has(.js-plotly-plot .main-svg) > "
    f":is(.st-key-{STATIC_KEY}, :has(.st-key-{STATIC_KEY})) {{display: none;}}</style>"
)
STATIC_ALT = "Combined normalized score of every group (static copy)"
PRELOAD_NOTE = "interactive chart loading…"

_WIDTH = 1000
_LEFT, _RIGHT, _TOP = 64, 20, 44
_GRID = "#e9ecef"
_TEXT = "#495057"
_MAX_LABELS = 40  # beyond this many groups every k-th name is written


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def score_overview_svg(stats: pd.DataFrame, threshold: float | None) -> str:
    """What `dashboard.charts.score_overview` draws, as static SVG markup.

    Top: per group, the kept (green) and pruned (red) channels' scores as boxes (quartiles)
    with min-max whiskers, and the global cut as a dashed line; bottom: kept and pruned
    channel counts as stacked bars; group names in network order below. Group names are
    escaped (they come from the user's model)."""
    missing = [c for c in STAT_COLUMNS if c not in stats.columns]
    if missing:
        raise ValueError(f"stats frame lacks column(s): {', '.join(missing)}")
    first = stats.sort_values("order", kind="stable").drop_duplicates("group")
    groups = [str(g) for g in first["group"]]
    many = len(groups) > 8
    label_room = 0 if not groups else min(150, 12 + 6 * max(len(g) for g in groups)) \
        if many else 24
    top_h, gap, bottom_h = 330.0, 30.0, 120.0
    height = int(_TOP + top_h + gap + bottom_h + label_room + 8)
    plot_w = _WIDTH - _LEFT - _RIGHT
    slot = plot_w / max(len(groups), 1)
    shown = stats[(stats["subset"].isin(("kept", "pruned"))) & (stats["n"] > 0)]
    values = [*shown["min"].tolist(), *shown["max"].tolist()]
    if threshold is not None:
        values.append(float(threshold))
    values = [v for v in values if math.isfinite(v)]
    ticks = nice_ticks(min(values), max(values), 6) if values else [0.0, 1.0]
    low, high = ticks[0], ticks[-1]

    def y_score(v: float) -> float:
        return _TOP + top_h * (1 - (v - low) / ((high - low) or 1.0))

    counts = {s: stats[stats["subset"] == s].set_index("group")["n"] for s in ("kept", "pruned")}
    totals = [int(counts["kept"].get(g, 0)) + int(counts["pruned"].get(g, 0)) for g in groups]
    count_ticks = nice_ticks(0, max(totals, default=1) or 1, 3)
    bar_top = _TOP + top_h + gap

    def y_count(v: float) -> float:
        return bar_top + bottom_h * (1 - v / (count_ticks[-1] or 1))

    parts = [
        f'<svg class="{STATIC_CLASS}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {_WIDTH} {height}" width="100%" role="img" '
        f'aria-label="Combined normalized score of every group" '
        f'style="font-family: sans-serif; font-size: 12px; max-width: 100%;">',
    ]
    for tick in ticks:  # score grid and axis labels
        y = y_score(tick)
        parts.append(f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="{_GRID}"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" '
                     f'fill="{_TEXT}">{_fmt(tick)}</text>')
    for tick in count_ticks:
        y = y_count(tick)
        parts.append(f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="{_GRID}"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" '
                     f'fill="{_TEXT}">{_fmt(tick)}</text>')
    mid_top, mid_bottom = _TOP + top_h / 2, bar_top + bottom_h / 2
    parts.append(f'<text transform="translate(14 {mid_top:.0f}) rotate(-90)" '
                 f'text-anchor="middle" fill="{_TEXT}">normalized score</text>')
    parts.append(f'<text transform="translate(14 {mid_bottom:.0f}) rotate(-90)" '
                 f'text-anchor="middle" fill="{_TEXT}">channels</text>')
    box_w = slot * 0.36
    boxes = {(str(r["group"]), r["subset"]): r for _, r in shown.iterrows()}
    for i, group in enumerate(groups):
        x0 = _LEFT + i * slot
        for j, (subset, color) in enumerate((("kept", KEPT_COLOR), ("pruned", PRUNED_COLOR))):
            r = boxes.get((group, subset))
            if r is None:
                continue
            cx = x0 + slot * (0.3 + 0.4 * j)
            left = cx - box_w / 2
            parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y_score(r["max"]):.1f}" '
                         f'y2="{y_score(r["min"]):.1f}" stroke="{color}"/>')
            q3, q1 = y_score(r["q3"]), y_score(r["q1"])
            parts.append(f'<rect x="{left:.1f}" y="{q3:.1f}" width="{box_w:.1f}" '
                         f'height="{max(q1 - q3, 1):.1f}" fill="{color}" fill-opacity="0.35" '
                         f'stroke="{color}"><title>{escape(group)} {subset}: {int(r["n"])} '
                         f'channels</title></rect>')
            med = y_score(r["median"])
            parts.append(f'<line x1="{left:.1f}" x2="{left + box_w:.1f}" y1="{med:.1f}" '
                         f'y2="{med:.1f}" stroke="{color}" stroke-width="2"/>')
        base = y_count(0)
        kept = int(counts["kept"].get(group, 0))
        pruned = int(counts["pruned"].get(group, 0))
        bar_w, bar_x = slot * 0.7, x0 + slot * 0.15
        parts.append(f'<rect x="{bar_x:.1f}" y="{y_count(kept):.1f}" width="{bar_w:.1f}" '
                     f'height="{base - y_count(kept):.1f}" fill="{KEPT_COLOR}"/>')
        parts.append(f'<rect x="{bar_x:.1f}" y="{y_count(kept + pruned):.1f}" '
                     f'width="{bar_w:.1f}" height="{y_count(kept) - y_count(kept + pruned):.1f}"'
                     f' fill="{PRUNED_COLOR}"/>')
        every = max(1, math.ceil(len(groups) / _MAX_LABELS))
        if i % every == 0:
            lx, ly = x0 + slot / 2, base + 14
            name = escape(group)
            if many:
                parts.append(f'<text transform="translate({lx:.1f} {ly:.1f}) rotate(-60)" '
                             f'text-anchor="end" fill="{_TEXT}" font-size="10">{name}</text>')
            else:
                parts.append(f'<text x="{lx:.1f}" y="{ly + 2:.1f}" text-anchor="middle" '
                             f'fill="{_TEXT}">{name}</text>')
    if threshold is not None and groups:
        y = y_score(float(threshold))
        parts.append(f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="{CUT_COLOR}" stroke-dasharray="6 4" stroke-width="1.5"/>')
    legend = [("kept", KEPT_COLOR, False), ("pruned", PRUNED_COLOR, False)]
    if threshold is not None:
        legend.append(("global cut", CUT_COLOR, True))
    x = _LEFT
    for name, color, dashed in legend:
        if dashed:
            parts.append(f'<line x1="{x}" x2="{x + 22}" y1="18" y2="18" stroke="{color}" '
                         'stroke-dasharray="6 4" stroke-width="1.5"/>')
        else:
            parts.append(f'<rect x="{x}" y="12" width="22" height="12" fill="{color}" '
                         'fill-opacity="0.35" stroke="' + color + '"/>')
        parts.append(f'<text x="{x + 28}" y="22" fill="{_TEXT}">{name}</text>')
        x += 40 + 7 * len(name)
    parts.append(f'<text x="{_WIDTH - _RIGHT}" y="22" text-anchor="end" fill="{ALL_COLOR}" '
                 f'font-size="11">{PRELOAD_NOTE}</text>')
    parts.append("</svg>")
    return "".join(parts)


def static_markdown(stats: pd.DataFrame, threshold: float | None) -> str:
    """`score_overview_svg` as a Markdown image with a data URI, for ``st.markdown`` without
    ``unsafe_allow_html``: no HTML (which would load Markdown's lazily loaded HTML parser)
    and no URL to request (the page's six connections are busy with script chunks)."""
    data = base64.b64encode(score_overview_svg(stats, threshold).encode()).decode()
    return f"![{STATIC_ALT}](data:image/svg+xml;base64,{data})"
