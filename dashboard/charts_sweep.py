"""Figures for the "Compare on accuracy" view: pure functions, DataFrame in, figure out.

Frames
------
sweep frame (one row per measured point; `sweep_frame` makes it from a sweep report):
    index, criterion, policy, layer_norm, group_policy, reshape_channel_axis, step_size,
    step_op, seed, ratio, params, flops, params_kept, flops_kept, metric
sensitivity frame (`sensitivity_frame`): group, order, ratio, metric, drop (how much worse
    than the original: a fall for accuracy, a rise for perplexity)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.charts import LEGEND_CLEAR_OF_TOOLBAR, SERIES_COLORS, SERIES_SYMBOLS

X_AXES = {"ratio": "pruning ratio", "params_kept": "parameters kept (fraction)",
          "flops_kept": "FLOPs kept (fraction)"}
PARETO_NAME = "Pareto front"
ORIGINAL_COLOR = "#868e96"
ORIGINAL_NAME = "original"
PARETO_COLOR = "#1c1c1c"
CURRENT_NAME = "sidebar setting"
CURRENT_COLOR = "#ffd43b"


def sweep_frame(report: Mapping[str, Any]) -> pd.DataFrame:
    """One row per finished point of a sweep report (points with an error are left out)."""
    before = report["before"]
    rows = []
    for p in report["points"]:
        if "metric" not in p:
            continue
        rows.append({"index": p["index"], **p["options"], "ratio": p["ratio"],
                     "params": p["params"], "flops": p["flops"],
                     "params_kept": p["params"] / max(before["params"], 1),
                     "flops_kept": p["flops"] / max(before["flops"], 1),
                     "metric": p["metric"]})
    return pd.DataFrame(rows)


def sensitivity_frame(report: Mapping[str, Any]) -> pd.DataFrame:
    rows = [{"group": g["name"], "order": i, "ratio": c["ratio"], "metric": c["metric"],
             "drop": c["drop"]}
            for i, g in enumerate(report["groups"]) for c in g["curve"] if c["ratio"] > 0]
    return pd.DataFrame(rows, columns=["group", "order", "ratio", "metric", "drop"])


def pareto_mask(x: np.ndarray, y: np.ndarray, smaller_x_better: bool) -> np.ndarray:
    """Points no other point beats on both x and y (y: higher is better)."""
    x = -np.asarray(x, dtype=float) if smaller_x_better else np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        keep[i] = not dominated.any()
    return keep


def comparison_figure(frame: pd.DataFrame, axis: str, x: str = "ratio", *,
                      original: float | None = None, metric: str = "accuracy",
                      higher_is_better: bool = True, current: int | None = None) -> go.Figure:
    """The metric against `x`, one trace per value of `axis` (own colour and marker); the
    original level as a dashed line named in the legend; the Pareto front (best metric for
    the size, over every trace) as open rings; the point `current` (a sweep index: the
    sidebar's setting) as a star.

    Each marker's customdata is the point's `index` (what a click selects)."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}")
    fig = go.Figure()
    for i, (value, rows) in enumerate(frame.groupby(axis, sort=False)):
        rows = rows.sort_values(x)
        fig.add_trace(go.Scatter(
            x=rows[x].tolist(), y=rows["metric"].tolist(), mode="lines+markers",
            name=str(value), customdata=rows["index"].tolist(),
            marker={"size": 9, "symbol": SERIES_SYMBOLS[i % len(SERIES_SYMBOLS)]},
            line={"color": SERIES_COLORS[i % len(SERIES_COLORS)]},
            hovertemplate=f"{axis}={value}<br>ratio %{{text}}<br>{metric} %{{y:.4f}}"
                          "<extra></extra>",
            text=[f"{r:g}" for r in rows["ratio"]],
        ))
    if len(frame):
        y = frame["metric"].to_numpy() * (1 if higher_is_better else -1)
        front = frame[pareto_mask(frame[x].to_numpy(), y, smaller_x_better=x != "ratio")]
        front = front.sort_values(x)
        fig.add_trace(go.Scatter(
            x=front[x].tolist(), y=front["metric"].tolist(), mode="markers", name=PARETO_NAME,
            customdata=front["index"].tolist(),
            marker={"size": 16, "symbol": "circle-open", "color": PARETO_COLOR,
                    "line": {"width": 2}},
            hovertemplate=f"Pareto front<br>{metric} %{{y:.4f}}<extra></extra>",
        ))
    if current is not None and (frame["index"] == current).any():
        row = frame[frame["index"] == current].iloc[0]
        fig.add_trace(go.Scatter(
            x=[row[x]], y=[row["metric"]], mode="markers", name=CURRENT_NAME,
            customdata=[int(current)],
            marker={"size": 20, "symbol": "star", "color": CURRENT_COLOR,
                    "line": {"width": 1.5, "color": PARETO_COLOR}},
            hovertemplate=f"sidebar setting<br>{metric} %{{y:.4f}}<extra></extra>",
        ))
    if original is not None and len(frame):
        # a legend entry, not a text label on the plot: markers cannot hide it
        lo, hi = float(frame[x].min()), float(frame[x].max())
        fig.add_trace(go.Scatter(
            x=[lo, hi], y=[original, original], mode="lines",
            name=f"{ORIGINAL_NAME} {original:.4g}",
            line={"dash": "dash", "color": ORIGINAL_COLOR, "width": 1.5},
            hovertemplate=f"original model: {metric} {original:.4f}<extra></extra>",
        ))
    fig.update_layout(xaxis_title=X_AXES[x], yaxis_title=metric, legend_title=axis,
                      height=480, clickmode="event+select", **LEGEND_CLEAR_OF_TOOLBAR)
    if x != "ratio":
        fig.update_xaxes(autorange="reversed")  # smaller models to the right, like the ratio
    return fig


def change_words(metric: str, higher_is_better: bool) -> str:
    """What a positive value of the sensitivity's ``drop`` means for `metric`."""
    return f"{metric} drop" if higher_is_better else f"{metric} rise"


def sensitivity_heatmap(frame: pd.DataFrame, metric: str = "accuracy", *,
                        higher_is_better: bool = True, log: bool = False) -> go.Figure:
    """Group x ratio: how much worse the metric gets when only that group is pruned at that
    ratio (a drop for accuracy, a rise for perplexity). With `log`, colours follow log10 of
    the change (changes <= 0 get the smallest positive one) and the colour bar is labelled in
    the metric's own units."""
    words = change_words(metric, higher_is_better)
    order = frame.sort_values("order").drop_duplicates("group")["group"].tolist()
    table = frame.pivot_table(index="group", columns="ratio", values="drop").reindex(order)
    values = table.to_numpy(dtype=float)
    colorbar: dict[str, Any] = {"title": words}
    z = values
    if log:
        positive = values[np.isfinite(values) & (values > 0)]
        floor = float(positive.min()) if positive.size else 1e-6
        z = np.log10(np.where(np.isfinite(values), np.maximum(values, floor), np.nan))
        lo, hi = (float(np.nanmin(z)), float(np.nanmax(z))) if np.isfinite(z).any() else (0, 1)
        ticks = np.arange(np.floor(lo), np.ceil(hi) + 1)
        colorbar.update(title=f"{words} (log scale)", tickvals=ticks.tolist(),
                        ticktext=[f"{10 ** t:g}" for t in ticks])
    fig = go.Figure(go.Heatmap(
        z=[[None if not np.isfinite(v) else float(v) for v in row] for row in z],
        customdata=values.tolist(), x=[f"{r:g}" for r in table.columns],
        y=table.index.tolist(), colorscale="Reds", zmin=None if log else 0,
        colorbar=colorbar,
        hovertemplate="%{y}<br>ratio %{x}<br>" + words + " %{customdata:.4g}<extra></extra>",
    ))
    fig.update_layout(xaxis_title="ratio of this group alone", yaxis_title="group",
                      height=max(260, 40 + 28 * len(order)), margin={"t": 30, "b": 40})
    fig.update_yaxes(autorange="reversed")
    return fig
