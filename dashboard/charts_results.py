"""Figures for the Prune tab's results: pure functions, DataFrame in, figure out.

Frames
------
widths frame (`dashboard.frames.widths_frame` makes it from report.json): one row per group,
    order, group, before, after (channels of the group in the original and the pruned model)
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.charts import KEPT_COLOR, LEGEND_CLEAR_OF_TOOLBAR, category_axis

BEFORE_COLOR = "#adb5bd"
BEFORE_NAME = "before (original)"
AFTER_NAME = "after (pruned)"


def widths_figure(widths: pd.DataFrame) -> go.Figure:
    """Channels of every group before and after pruning, side by side, in network order; the
    hover gives the share kept."""
    missing = [c for c in ("order", "group", "before", "after") if c not in widths.columns]
    if missing:
        raise ValueError(f"widths frame lacks column(s): {', '.join(missing)}")
    rows = widths.sort_values("order", kind="stable")
    groups = rows["group"].astype(str).tolist()
    kept = [a / b if b else 1.0 for a, b in zip(rows["after"], rows["before"])]
    fig = go.Figure()
    fig.add_trace(go.Bar(name=BEFORE_NAME, x=groups, y=rows["before"].astype(int).tolist(),
                         marker_color=BEFORE_COLOR,
                         hovertemplate="<b>%{x}</b><br>before: %{y} channels<extra></extra>"))
    fig.add_trace(go.Bar(name=AFTER_NAME, x=groups, y=rows["after"].astype(int).tolist(),
                         marker_color=KEPT_COLOR, customdata=[[k] for k in kept],
                         hovertemplate="<b>%{x}</b><br>after: %{y} channels "
                                       "(%{customdata[0]:.0%} kept)<extra></extra>"))
    fig.update_layout(barmode="group", height=380, yaxis_title="channels",
                      **LEGEND_CLEAR_OF_TOOLBAR)
    category_axis(fig, groups)
    return fig
