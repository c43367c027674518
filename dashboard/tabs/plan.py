"""The Plan tab: one row per group, with its own ratio or a pin; the frozen layers."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dashboard import state
from dashboard.common import editor_key
from dashboard.page import PageState


def overrides(model: state.LoadedModel) -> tuple[dict[str, float], list[str]]:
    """Per-group ratios and pins from the Plan table's edits (read before drawing it)."""
    groups = [g.name for g in model.analysis.groups]
    edits = st.session_state.get(editor_key(model)) or {}
    ratios: dict[str, float] = dict(_auto_ratios(model))  # edits below win
    pinned: list[str] = []
    for row, change in (edits.get("edited_rows") or {}).items():
        i = int(row)
        if not 0 <= i < len(groups):
            continue
        value = change.get("Own ratio")
        if value is not None and not pd.isna(value):
            ratios[groups[i]] = float(value)
        if change.get("Pinned"):
            pinned.append(groups[i])
    return ratios, pinned


def _auto_ratios(model: state.LoadedModel) -> dict[str, float]:
    """Ratios the Compare tab's "Auto ratios" chose (they fill the Own ratio column)."""
    from dashboard.tabs.compare import auto_ratios_key

    return st.session_state.get(auto_ratios_key(model)) or {}


def render(page: PageState) -> None:
    model, plan = page.model, page.plan
    st.markdown(
        "Every prunable group of connected channels, in network order. Set a group's **own "
        "ratio** (blank = the global ratio) or **pin** it to keep all its channels; the "
        "charts and the Prune button follow."
    )
    an = model.analysis
    by_name = {g.name: g for g in plan.groups} if plan is not None else {}
    auto = _auto_ratios(model)
    rows = []
    for g in an.groups:
        gp = by_name.get(g.name)
        rows.append({
            "Group": g.name,
            "Member layers": ", ".join(g.layers),
            "Channels": int(g.channels),
            "To prune": int(gp.pruned.size) if gp is not None else 0,
            "Kept": int(gp.kept.size) if gp is not None else int(g.channels),
            "Own ratio": auto.get(g.name),
            "Pinned": False,
        })
    table = pd.DataFrame(rows).astype({"Own ratio": "float64"})
    st.data_editor(
        table,
        key=editor_key(model),
        num_rows="fixed",
        hide_index=True,
        width="stretch",
        disabled=["Group", "Member layers", "Channels", "To prune", "Kept"],
        column_config={
            "Own ratio": st.column_config.NumberColumn(
                "Own ratio", min_value=0.0, max_value=0.99, step=0.01, format="%.2f",
                help="This group's own pruning ratio; blank = the global ratio"),
            "Pinned": st.column_config.CheckboxColumn(
                "Pinned", help="Keep every channel of this group"),
            "Member layers": st.column_config.TextColumn(width="large"),
        },
    )
    if st.button("Reset per-group settings", key="reset_editor"):
        st.session_state.pop(editor_key(model), None)
        from dashboard.tabs.compare import auto_ratios_key

        st.session_state.pop(auto_ratios_key(model), None)
        st.rerun()
    st.subheader("Frozen layers")
    if an.frozen:
        st.dataframe(
            pd.DataFrame([{"Layers": ", ".join(f.layers), "Reason": f.reason}
                          for f in an.frozen]),
            hide_index=True, width="stretch",
        )
    else:
        st.caption("No frozen layers.")
    if plan is not None:
        st.download_button("Download plan.json", json.dumps(plan.to_dict(), default=float),
                           file_name="plan.json", mime="application/json", key="dl_plan")

