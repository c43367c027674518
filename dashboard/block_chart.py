"""Block scores as a bar chart: a pure builder, DataFrame in, figure out.

Frame columns: ``block`` (name, network order = row order), ``score``, ``removed`` (bool).
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.charts import KEPT_COLOR, PRUNED_COLOR

COLUMNS = ("block", "score", "removed")


def block_scores(frame: pd.DataFrame, criterion: str = "score") -> go.Figure:
    """One bar per residual block in network order; the blocks that go in red."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"block frame lacks column(s) {', '.join(missing)}")
    fig = go.Figure()
    for removed, name, color in ((False, "kept", KEPT_COLOR), (True, "removed", PRUNED_COLOR)):
        rows = frame[frame["removed"].astype(bool) == removed]
        fig.add_trace(go.Bar(x=list(rows["block"]), y=list(rows["score"]), name=name,
                             marker_color=color,
                             hovertemplate="%{x}<br>" + criterion + " %{y:.4g}<extra></extra>"))
    fig.update_xaxes(categoryorder="array", categoryarray=list(frame["block"]),
                     title_text="residual block (network order)")
    fig.update_yaxes(title_text=criterion)
    fig.update_layout(barmode="overlay", height=380, margin={"t": 30, "b": 10},
                      legend={"orientation": "h", "y": 1.08})
    return fig
