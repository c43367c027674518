"""The Plan tab: one row per group, with its own ratio or a pin; the frozen layers."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dashboard import state
from dashboard.common import editor_key, short
from dashboard.page import PageState
from engine.errors import PruneScopeError

BAD_CELLS_KEY = "_ps_bad_cells"
PINS_KEY = "_ps_pins"  # model key -> pinned group names (kept while the tab is closed)


def pins_key(model: state.LoadedModel) -> str:
    return f"pins_{short(model.key)}"


def overrides(model: state.LoadedModel) -> tuple[dict[str, float], list[str]]:
    """Per-group ratios and pins from the Plan tab's edits (read before drawing it)."""
    groups = [g.name for g in model.analysis.groups]
    edits = st.session_state.get(editor_key(model)) or {}
    ratios: dict[str, float] = dict(_auto_ratios(model))  # edits below win
    bad: list[str] = []
    st.session_state[BAD_CELLS_KEY] = bad
    for row, change in (edits.get("edited_rows") or {}).items():
        i = int(row)
        if not 0 <= i < len(groups) or "Own ratio" not in change:
            continue
        try:
            value = parse_own_ratio(change["Own ratio"], groups[i])
        except PruneScopeError as e:  # said in the Plan tab; the cell is not used
            bad.append(str(e))
            continue
        if value is None:
            ratios.pop(groups[i], None)
        else:
            ratios[groups[i]] = value
    pinned = [g for g in st.session_state.get(PINS_KEY, {}).get(model.key, []) if g in groups]
    return ratios, pinned


def parse_own_ratio(text: object, group: str) -> float | None:
    """An "Own ratio" cell: blank = the global ratio (None), else a number 0 <= r < 1."""
    if text is None or (isinstance(text, float) and pd.isna(text)) or not str(text).strip():
        return None
    try:
        value = float(str(text).strip().rstrip("%")) / (100 if str(text).strip().endswith("%")
                                                       else 1)
    except ValueError:
        raise PruneScopeError(f"Own ratio of group {group!r} is {text!r}: give a number from 0 "
                              "to 0.99 (or leave it blank for the global ratio)") from None
    if not 0 <= value < 1:
        raise PruneScopeError(f"Own ratio of group {group!r} is {text!r}: allowed 0 <= ratio "
                              "< 1 (blank = the global ratio)")
    return value


def _keep_pins(model: state.LoadedModel) -> None:
    st.session_state.setdefault(PINS_KEY, {})[model.key] = list(
        st.session_state.get(pins_key(model)) or [])


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
    names = [g.name for g in an.groups]
    key = pins_key(model)
    if key not in st.session_state:  # the widget starts from the pins kept for this model
        st.session_state[key] = list(st.session_state.get(PINS_KEY, {}).get(model.key, []))
    st.pills("Pinned groups (one click pins or unpins; a pinned group keeps every channel)",
             names, selection_mode="multi", key=key, on_change=_keep_pins, args=(model,))
    pinned = set(st.session_state.get(key) or [])
    rows = []
    for g in an.groups:
        gp = by_name.get(g.name)
        own = auto.get(g.name)
        rows.append({
            "Group": g.name,
            "Member layers": ", ".join(g.layers),
            "Channels": int(g.channels),
            "To prune": int(gp.pruned.size) if gp is not None else 0,
            "Kept": int(gp.kept.size) if gp is not None else int(g.channels),
            "Own ratio": "" if own is None else f"{own:.2f}",
            "Pinned": "yes" if g.name in pinned else "",
        })
    table = pd.DataFrame(rows)
    longest = max((len(r["Member layers"]) for r in rows), default=10)
    st.data_editor(
        table,
        key=editor_key(model),
        num_rows="fixed",
        hide_index=True,
        width="stretch",
        disabled=["Group", "Member layers", "Channels", "To prune", "Kept", "Pinned"],
        column_config={
            "Own ratio": st.column_config.TextColumn(
                "Own ratio", help="This group's own pruning ratio, e.g. 0.3; blank = the "
                "global ratio"),
            "Pinned": st.column_config.TextColumn(
                "Pinned", help="Pin or unpin with the buttons above the table"),
            # wide enough for every member name: nothing is cut off
            "Member layers": st.column_config.TextColumn(
                width=min(max(160, 7 * longest + 24), 1400)),
        },
    )
    for message in st.session_state.get(BAD_CELLS_KEY) or []:
        st.error(message + " (not used)", icon=":material/warning:")
    if st.button("Reset per-group settings", key="reset_editor"):
        st.session_state.pop(editor_key(model), None)
        st.session_state.pop(key, None)
        st.session_state.get(PINS_KEY, {}).pop(model.key, None)
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

