"""The Blocks tab: residual blocks in network order, their scores and which would go; how
many blocks (and, for mixtures of experts, what share of experts) the Prune step removes."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import state
from dashboard.block_chart import block_scores
from dashboard.page import PageState
from engine.transform.depth import choose, plan_depth
from engine.transform.experts import expert_scores, plan_experts

_CRITERIA = {"relative_branch_norm": "relative branch norm (example inputs)",
             "block_influence": "block influence, 1 - cos (calibration data)"}
CHOICES_KEY = "_ps_structures"  # model key -> {"remove_blocks": n, "expert_ratio": r}
BLOCKS_KEY = "blocks_to_remove"
EXPERTS_KEY = "experts_to_remove"
_SHOWN_FOR = "_ps_blocks_for"


def chosen_structures(model: state.LoadedModel) -> dict[str, Any]:
    """What the Prune step removes besides channels: ``remove_blocks`` and ``expert_ratio``
    for ``engine.prune`` (None = nothing). Kept apart from the widgets, which Streamlit
    forgets while the Blocks tab is closed."""
    choice = st.session_state.get(CHOICES_KEY, {}).get(model.key, {})
    return {"remove_blocks": choice.get("remove_blocks") or None,
            "expert_ratio": choice.get("expert_ratio") or None}


def _remember(model: state.LoadedModel, **values: Any) -> None:
    st.session_state.setdefault(CHOICES_KEY, {}).setdefault(model.key, {}).update(values)


def _seed_widgets(model: state.LoadedModel, n_blocks: int) -> None:
    """Put the model's remembered choice into the widgets when they are (re)created."""
    ss = st.session_state
    stored = ss.get(CHOICES_KEY, {}).get(model.key, {})
    if ss.get(_SHOWN_FOR) != model.key or BLOCKS_KEY not in ss:
        ss[BLOCKS_KEY] = min(int(stored.get("remove_blocks") or 0), max(n_blocks - 1, 0))
    if ss.get(_SHOWN_FOR) != model.key or EXPERTS_KEY not in ss:
        ss[EXPERTS_KEY] = float(stored.get("expert_ratio") or 0.0)
    ss[_SHOWN_FOR] = model.key


def blocks_frame(report: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [(b["name"], b["score"], b["removed"], b["params"]) for b in report["blocks"]],
        columns=["block", "score", "removed", "params"],
    )


def _routers(model: state.LoadedModel) -> list:
    routers = model.cache.get("routers")
    if routers is None:
        from engine.transform.experts import find_routers

        routers = model.cache["routers"] = find_routers(model.analysis)
    return routers


def render(page: PageState) -> None:
    model, calibration = page.model, page.calibration
    st.markdown(
        "Depth pruning removes whole **residual blocks** (a branch added back to the stream "
        "it leaves: bottleneck blocks, attention and MLP sublayers). The least important go: "
        "by the branch's output norm relative to the stream's on the example inputs, or, with "
        "calibration data, by block influence (1 - cosine similarity of the stream before "
        "and after the block). The blocks chosen here are removed by the **Prune** step, "
        "before the channels of the global ratio."
    )
    which = calibration if isinstance(calibration, str) else getattr(calibration, "label", None)
    key = ("blocks", calibration is None, which)
    cached = model.cache.get(key)
    if cached is None:
        with st.spinner("Scoring the residual blocks…"):
            _blocks, cached = plan_depth(model.analysis, calibration=calibration)
        model.cache[key] = cached
    n = len(cached["blocks"])
    _seed_widgets(model, n)
    if not n:
        st.info("This model has no residual blocks (no branch added back to its stream).")
        _remember(model, remove_blocks=0)
    else:
        count = 0
        scores = {b["name"]: b["score"] for b in cached["blocks"]}
        if n > 1:
            count = st.slider("Blocks to remove", 0, n - 1, key=BLOCKS_KEY,
                              help="How many whole residual blocks the Prune step removes "
                              "(the lowest-scoring ones, marked red), before pruning channels.")
            st.caption(slider_hint(count, choose(scores, 1)[0]))
        else:
            st.caption("The model's only residual block must stay.")
        _remember(model, remove_blocks=int(count))
        chosen = set(choose(scores, count))
        report = {"blocks": [dict(b, removed=b["name"] in chosen) for b in cached["blocks"]]}
        frame = blocks_frame(report)
        st.plotly_chart(block_scores(frame, _CRITERIA[cached["criterion"]]), key="block_chart")
        st.dataframe(frame, hide_index=True)
        removed = [b["name"] for b in report["blocks"] if b["removed"]]
        st.caption(f"{len(removed)} of {n} blocks would go ({', '.join(removed) or 'none'}). "
                   "The same from the command line:")
        st.code(blocks_command(model, count, calibration,
                               st.session_state.get("opt_ratio")), language="bash")
    _experts(model)


def slider_hint(count: int, lowest: str) -> str:
    """What the slider does at its value, and what to try: at 0 (where it starts) nothing is
    removed, and a newcomer did not see that moving it was the point."""
    if count == 0:
        return (f"At 0 no block is removed (depth pruning is off). Try 1: the lowest-scoring "
                f"block, **{lowest}**, turns red below, and **Prune** (Prune & compare tab) "
                "then removes it before the channels; compare the accuracy there with and "
                "without it.")
    return ("The red blocks below go when you press **Prune** (Prune & compare tab), before "
            "the channels of the global ratio. Back to 0 keeps every block.")


def blocks_command(model: state.LoadedModel, count: int, calibration: Any,
                   ratio: float | None) -> str:
    """The CLI line doing what the Prune step does with these blocks: the model, the blocks,
    the calibration data that scored them (block influence) and the channel ratio."""
    name = model.key.split(":", 1)[0]
    model_arg = name if name in ("demo", "demo-lm") else "MODEL"
    parts = ["prunescope prune", model_arg, f"--remove-blocks {int(count)}"]
    if isinstance(calibration, str):
        parts.append(f"--calibration {calibration}")
    elif calibration is not None:
        parts.append("--calibration YOUR_DATA.npz")
    if ratio is not None:
        parts.append(f"--ratio {float(ratio):.2f}")
    parts.append("--out DIR")
    return " ".join(parts)


def _experts(model: state.LoadedModel) -> None:
    """Mixtures of experts: the share of every router's experts the Prune step removes."""
    routers = _routers(model)
    if not routers:
        _remember(model, expert_ratio=0.0)
        return
    st.subheader("Experts")
    st.markdown(
        f"{len(routers)} router(s) pick experts by top-k. Every router loses the share below "
        "of its experts (lowest routing share on calibration data, else smallest weights), "
        "always keeping at least its top-k."
    )
    ratio = st.slider("Share of experts to remove", 0.0, 0.9, step=0.05, key=EXPERTS_KEY,
                      help="expert_ratio of engine.prune (CLI --expert-ratio)")
    _remember(model, expert_ratio=float(ratio))
    # how many go does not depend on the scores; which ones the Prune step decides
    weights = {r.layer: expert_scores(model.analysis, r) for r in routers}
    going = plan_experts(routers, weights, float(ratio))
    st.dataframe(pd.DataFrame([{"router": r.layer, "experts": len(r.ids), "top_k": r.top_k,
                                "would remove": len(going[r.layer])} for r in routers]),
                 hide_index=True)
    st.caption(f"`prunescope prune MODEL --expert-ratio {ratio:.2f} --out DIR`")
