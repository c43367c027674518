"""Plotly figure builders: pure functions, DataFrame in, figure out.

Every builder takes the long/wide frames made by ``dashboard.frames`` (or hand-made ones in
tests) and never touches the engine, so they can be unit-tested without a model.

Frames used here
----------------
stats frame (one row per group and subset), columns:
    order, group, subset ("all" | "kept" | "pruned"), n, min, q1, median, q3, max
detail frame (one row per channel and series), columns:
    channel, series, kind ("member" | "combined"), score, pruned
norm stats frame: a stats frame (subset "all") plus a ``norm`` column
norm prune frame: norm, order, group, channels, pruned
policy frame: policy, channel, score, pruned
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

KEPT_COLOR = "#2b8a3e"
PRUNED_COLOR = "#e03131"
CUT_COLOR = "#1c1c1c"
ALL_COLOR = "#4263eb"
# Chosen for distance in CIELAB: any two of the first five differ by more than 55 (Delta E
# 76), any two of all eight by more than 35, so neighbouring curves never look alike.
SERIES_COLORS = (
    "#1c7ed6", "#e8b400", "#d6336c", "#099268", "#ae3ec9", "#343a40", "#74b816", "#fd7e14",
)
# A second cue besides colour (colour-blind readers, print): one marker shape per series.
SERIES_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "x", "pentagon",
                  "hexagon")
# Plotly's toolbar sits at the top right of a chart; upright in the right margin it cannot
# cover a legend laid out left to right above the plot.
TOOLBAR_MARGIN = 56
LEGEND_CLEAR_OF_TOOLBAR = {
    "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0, "xanchor": "left"},
    "modebar": {"orientation": "v"},
    "margin": {"l": 10, "r": TOOLBAR_MARGIN, "t": 60, "b": 40},
}
CUT_NAME = "global cut"
BAR_WIDTH = 0.7  # of a category's width: the overview's channel-count bars

_STAT_COLUMNS = ("order", "group", "subset", "n", "min", "q1", "median", "q3", "max")


def _clear_of_toolbar(top: int = 60, legend_y: float = 1.02) -> dict:
    """Layout keys placing the legend above the plot and the toolbar upright at the right."""
    layout = {k: dict(v) for k, v in LEGEND_CLEAR_OF_TOOLBAR.items()}
    layout["legend"]["y"] = legend_y
    layout["margin"]["t"] = top
    return layout


def _ordered_groups(frame: pd.DataFrame) -> list[str]:
    """Group names in network order (the ``order`` column), each once."""
    if frame.empty:
        return []
    first = frame.sort_values("order", kind="stable").drop_duplicates("group")
    return [str(g) for g in first["group"]]


def _check_columns(frame: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} frame lacks column(s): {', '.join(missing)}")


def _box_trace(rows: pd.DataFrame, name: str, color: str, **kwargs) -> go.Box:
    """A box drawn from precomputed statistics: q1/median/q3 box, min/max whiskers.

    Drawing from quartiles instead of raw points keeps the overview fast with 150+ groups
    and tens of thousands of channels.
    """
    counts = rows["n"].astype(int).tolist()
    return go.Box(
        name=name,
        x=rows["group"].astype(str).tolist(),
        q1=rows["q1"].tolist(),
        median=rows["median"].tolist(),
        q3=rows["q3"].tolist(),
        lowerfence=rows["min"].tolist(),
        upperfence=rows["max"].tolist(),
        marker_color=color,
        line_width=1.2,
        boxpoints=False,
        customdata=[[c] for c in counts],
        hovertemplate=(
            "<b>%{x}</b><br>" + name + ": %{customdata[0]} channels<br>"
            "min %{lowerfence:.4g} · q1 %{q1:.4g} · median %{median:.4g}"
            " · q3 %{q3:.4g} · max %{upperfence:.4g}<extra></extra>"
        ),
        **kwargs,
    )


def _cut_trace(groups: list[str], threshold: float, **kwargs) -> go.Scatter:
    """The global cut as a dashed line across every group (a trace, so it is in the legend)."""
    return go.Scatter(
        name=CUT_NAME,
        x=groups,
        y=[float(threshold)] * len(groups),
        mode="lines",
        line={"color": CUT_COLOR, "dash": "dash", "width": 1.5},
        hovertemplate=f"{CUT_NAME}: {float(threshold):.4g}<extra></extra>",
        **kwargs,
    )


def category_axis(fig: go.Figure, groups: list[str], n_rows: int | None = None) -> None:
    """Categorical x axes that keep the given (network) order, whatever the trace order."""
    many = len(groups) > 40
    axis = {
        "type": "category",
        "categoryorder": "array",
        "categoryarray": groups,
        "tickangle": -60 if len(groups) > 8 else 0,
        "tickfont": {"size": 9 if many else 11},
    }
    if n_rows is None:
        fig.update_xaxes(**axis)
        return
    for row in range(1, n_rows + 1):
        fig.update_xaxes(**axis, row=row, col=1)


def score_overview(stats: pd.DataFrame, threshold: float | None, title: str = "") -> go.Figure:
    """Normalized (combined) score distribution of every group, in network order.

    Top: kept and pruned channels as two box series (side by side per group), with the
    global cut as a dashed line. Bottom: stacked bars of kept/pruned channel counts.
    """
    _check_columns(stats, _STAT_COLUMNS, "stats")
    groups = _ordered_groups(stats)
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.72, 0.28],
        vertical_spacing=0.04,
    )
    for subset, color in (("kept", KEPT_COLOR), ("pruned", PRUNED_COLOR)):
        rows = stats[(stats["subset"] == subset) & (stats["n"] > 0)]
        rows = rows.sort_values("order", kind="stable")
        fig.add_trace(_box_trace(rows, subset, color, legendgroup=subset, offsetgroup=subset),
                      row=1, col=1)
    if threshold is not None and groups:
        fig.add_trace(_cut_trace(groups, threshold), row=1, col=1)
        # The trace runs between the first and last category centres; the shape carries the
        # cut across the whole plot width.
        fig.add_hline(y=float(threshold), line={"color": CUT_COLOR, "dash": "dash", "width": 1},
                      opacity=0.6, row=1, col=1)
    counts = _counts(stats, groups)
    for subset, color in (("kept", KEPT_COLOR), ("pruned", PRUNED_COLOR)):
        fig.add_trace(
            go.Bar(
                name=f"{subset} channels",
                x=groups,
                y=counts[subset],
                marker_color=color,
                legendgroup=subset,
                showlegend=False,
                hovertemplate="<b>%{x}</b><br>" + subset + ": %{y} channels<extra></extra>",
                # Centred under the group's name: without an explicit offset, Plotly gives the
                # bars a third slot beside the boxes' two offset groups (right of the name).
                offset=-BAR_WIDTH / 2,
                width=BAR_WIDTH,
            ),
            row=2,
            col=1,
        )
    fig.update_layout(
        title=title or None,
        boxmode="group",
        barmode="stack",
        height=560 if len(groups) <= 40 else 680,
        hovermode="closest",
        **_clear_of_toolbar(top=70 if title else 50),
    )
    fig.update_yaxes(title_text="normalized score", row=1, col=1)
    fig.update_yaxes(title_text="channels", row=2, col=1)
    category_axis(fig, groups, n_rows=2)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    return fig


def _counts(stats: pd.DataFrame, groups: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for subset in ("kept", "pruned"):
        rows = stats[stats["subset"] == subset].set_index("group")["n"]
        out[subset] = [int(rows.get(g, 0)) for g in groups]
    return out


def group_detail(detail: pd.DataFrame, threshold: float | None, title: str = "") -> go.Figure:
    """One group channel by channel: each member's normalized score and the combined score.

    Top: one line per member (normalized scores) with the pruned channels marked by a red
    cross. Bottom: the combined score per channel, kept and pruned bars in two colours, and
    the global cut when there is one.
    """
    _check_columns(detail, ("channel", "series", "kind", "score", "pruned"), "detail")
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("normalized score of each member", "combined score"),
    )
    members = detail[detail["kind"] == "member"]
    for i, (series, rows) in enumerate(members.groupby("series", sort=False)):
        rows = rows.sort_values("channel")
        fig.add_trace(
            go.Scatter(
                name=str(series),
                x=rows["channel"].tolist(),
                y=rows["score"].tolist(),
                mode="lines+markers",
                marker={"size": 6, "symbol": SERIES_SYMBOLS[i % len(SERIES_SYMBOLS)]},
                line={"width": 1.2, "color": SERIES_COLORS[i % len(SERIES_COLORS)]},
                hovertemplate=f"{series}<br>channel %{{x}}: %{{y:.4g}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    pruned_members = members[members["pruned"].astype(bool)]
    if not pruned_members.empty:
        fig.add_trace(
            go.Scatter(
                name="pruned channel",
                x=pruned_members["channel"].tolist(),
                y=pruned_members["score"].tolist(),
                mode="markers",
                marker={"symbol": "x", "size": 9, "color": PRUNED_COLOR},
                hovertemplate="pruned channel %{x}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    combined = detail[detail["kind"] == "combined"].sort_values("channel")
    for subset, color, flag in (("kept", KEPT_COLOR, False), ("pruned", PRUNED_COLOR, True)):
        rows = combined[combined["pruned"].astype(bool) == flag]
        fig.add_trace(
            go.Bar(
                name=f"combined · {subset}",
                x=rows["channel"].tolist(),
                y=rows["score"].tolist(),
                marker_color=color,
                hovertemplate="channel %{x}: %{y:.4g} (" + subset + ")<extra></extra>",
            ),
            row=2,
            col=1,
        )
    if threshold is not None and not combined.empty:
        fig.add_trace(
            _cut_line(combined["channel"].tolist(), threshold),
            row=2,
            col=1,
        )
    fig.update_layout(
        title=title or None,
        barmode="overlay",
        height=540,
        **_clear_of_toolbar(top=90 if title else 70, legend_y=1.08),
    )
    fig.update_xaxes(title_text="channel", row=2, col=1)
    return fig


def norm_comparison(stats: pd.DataFrame, thresholds: dict[str, float | None]) -> go.Figure:
    """The same groups under every layer norm: one subplot and one box trace per norm.

    Each norm gets its own y axis because the scales differ by orders of magnitude
    (softmax vs none); each subplot carries that norm's global cut.
    """
    _check_columns(stats, (*_STAT_COLUMNS, "norm"), "norm stats")
    norms = list(dict.fromkeys(stats["norm"].astype(str)))
    groups = _ordered_groups(stats)
    fig = make_subplots(
        rows=max(len(norms), 1),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.035,
        subplot_titles=norms or None,
    )
    for i, norm in enumerate(norms, start=1):
        rows = stats[(stats["norm"] == norm) & (stats["subset"] == "all")]
        rows = rows.sort_values("order", kind="stable")
        fig.add_trace(
            _box_trace(rows, norm, SERIES_COLORS[(i - 1) % len(SERIES_COLORS)]), row=i, col=1
        )
        threshold = thresholds.get(norm)
        if threshold is not None and groups:
            fig.add_trace(
                _cut_trace(groups, threshold, showlegend=i == 1, legendgroup=CUT_NAME),
                row=i,
                col=1,
            )
    fig.update_layout(
        height=190 * max(len(norms), 1) + 80,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        showlegend=False,
    )
    category_axis(fig, groups, n_rows=max(len(norms), 1))
    for row in range(1, len(norms)):
        fig.update_xaxes(showticklabels=False, row=row, col=1)
    return fig


def prune_count_comparison(frame: pd.DataFrame, by: str) -> go.Figure:
    """Channels each variant (norm or policy, column ``by``) would prune per group: one bar
    trace per variant, groups in network order."""
    _check_columns(frame, (by, "order", "group", "channels", "pruned"), "prune count")
    groups = _ordered_groups(frame)
    fig = go.Figure()
    for i, (variant, rows) in enumerate(frame.groupby(by, sort=False)):
        rows = rows.sort_values("order", kind="stable")
        fig.add_trace(
            go.Bar(
                name=str(variant),
                x=rows["group"].astype(str).tolist(),
                y=rows["pruned"].astype(int).tolist(),
                marker_color=SERIES_COLORS[i % len(SERIES_COLORS)],
                customdata=rows[["channels"]].to_numpy().tolist(),
                hovertemplate=(
                    f"{variant}<br>%{{x}}: prune %{{y}} of %{{customdata[0]}}<extra></extra>"
                ),
            )
        )
    fig.update_layout(
        barmode="group",
        height=380,
        yaxis_title="channels pruned",
        **_clear_of_toolbar(top=50),
    )
    category_axis(fig, groups)
    return fig


def policy_comparison(frame: pd.DataFrame, thresholds: dict[str, float | None]) -> go.Figure:
    """Combined score of one connected group under each policy, channel by channel: one
    subplot and one bar trace per policy, pruned channels in red."""
    _check_columns(frame, ("policy", "channel", "score", "pruned"), "policy")
    policies = list(dict.fromkeys(frame["policy"].astype(str)))
    fig = make_subplots(
        rows=max(len(policies), 1),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=policies or None,
    )
    for i, policy in enumerate(policies, start=1):
        rows = frame[frame["policy"] == policy].sort_values("channel")
        pruned = rows["pruned"].astype(bool).tolist()
        fig.add_trace(
            go.Bar(
                name=policy,
                x=rows["channel"].tolist(),
                y=rows["score"].tolist(),
                marker_color=[PRUNED_COLOR if p else KEPT_COLOR for p in pruned],
                customdata=[["pruned" if p else "kept"] for p in pruned],
                hovertemplate=(
                    f"{policy}<br>channel %{{x}}: %{{y:.4g}} (%{{customdata[0]}})<extra></extra>"
                ),
            ),
            row=i,
            col=1,
        )
        threshold = thresholds.get(policy)
        if threshold is not None and not rows.empty:
            fig.add_trace(
                _cut_line(rows["channel"].tolist(), threshold, showlegend=False),
                row=i,
                col=1,
            )
    fig.update_layout(
        height=200 * max(len(policies), 1) + 60,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        showlegend=False,
    )
    fig.update_xaxes(title_text="channel", row=max(len(policies), 1), col=1)
    return fig


def trace_names(fig: go.Figure) -> list[str]:
    """Names of the traces of a figure, in drawing order (handy for tests and captions)."""
    return [str(t.name) for t in fig.data]


def _cut_line(channels: list, threshold: float, **extra) -> go.Scatter:
    """The global cut as a dashed horizontal line across a group's channels."""
    return go.Scatter(
        name=CUT_NAME,
        x=[min(channels) - 0.5, max(channels) + 0.5],
        y=[float(threshold)] * 2,
        mode="lines",
        line={"color": CUT_COLOR, "dash": "dash", "width": 1.5},
        hovertemplate=f"{CUT_NAME}: {float(threshold):.4g}<extra></extra>",
        **extra,
    )
