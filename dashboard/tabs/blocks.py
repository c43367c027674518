"""The Blocks tab: residual blocks in network order, their scores and which would go."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import state
from dashboard.block_chart import block_scores
from engine.transform.depth import choose, plan_depth

_CRITERIA = {"relative_branch_norm": "relative branch norm (example inputs)",
             "block_influence": "block influence, 1 - cos (calibration data)"}


def blocks_frame(report: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [(b["name"], b["score"], b["removed"], b["params"]) for b in report["blocks"]],
        columns=["block", "score", "removed", "params"],
    )


def render(model: state.LoadedModel, calibration: Any = None) -> None:
    st.markdown(
        "Depth pruning removes whole **residual blocks** (a branch added back to the stream "
        "it leaves: bottleneck blocks, attention and MLP sublayers). The least important go: "
        "by the branch's output norm relative to the stream's on the example inputs, or, with "
        "calibration data, by block influence (1 - cosine similarity of the stream before "
        "and after the block)."
    )
    which = calibration if isinstance(calibration, str) else getattr(calibration, "label", None)
    key = ("blocks", calibration is None, which)
    cached = model.cache.get(key)
    if cached is None:
        with st.spinner("Scoring the residual blocks…"):
            _blocks, cached = plan_depth(model.analysis, calibration=calibration)
        model.cache[key] = cached
    n = len(cached["blocks"])
    if not n:
        st.info("This model has no residual blocks (no branch added back to its stream).")
        return
    count = st.slider("Blocks to remove", 0, n - 1, 0, key="blocks_to_remove")
    chosen = set(choose({b["name"]: b["score"] for b in cached["blocks"]}, count))
    report = {"blocks": [dict(b, removed=b["name"] in chosen) for b in cached["blocks"]]}
    frame = blocks_frame(report)
    st.plotly_chart(block_scores(frame, _CRITERIA[cached["criterion"]]), key="block_chart")
    st.dataframe(frame, hide_index=True)
    removed = [b["name"] for b in report["blocks"] if b["removed"]]
    st.caption(f"{len(removed)} of {n} blocks would go ({', '.join(removed) or 'none'}): "
               f"`prunescope prune MODEL --remove-blocks {count} --out DIR`")
