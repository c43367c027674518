"""PruneScope dashboard: score, plan, prune and compare a PyTorch model in the browser.

Run with ``make run`` (or ``streamlit run dashboard/app.py``). Opens on the built-in demo
model with its scores drawn. All pruning is done by the engine's public API; this page only
collects options, draws the engine's numbers and shows the results. Each tab lives in its own
module under dashboard/tabs/; the sidebar in dashboard/sidebar.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ (not the repository) on sys.path.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from dashboard import sources, state  # noqa: E402
from dashboard.common import calibration_for, get_model, make_plan, show_error  # noqa: E402
from dashboard.sidebar import (  # noqa: E402
    parse_indices,
    sidebar_device,
    sidebar_eval,
    sidebar_model,
    sidebar_options,
    sidebar_uniform,
)
from dashboard.tabs import blocks, compare, graphs, prune, scores  # noqa: E402
from dashboard.tabs import plan as plan_tab_view  # noqa: E402
from engine.device import using  # noqa: E402
from engine.scoring.criteria import CRITERIA_NEEDING_CALIBRATION  # noqa: E402

TABS = ("Scores", "Plan", "Prune & compare", "Compare on accuracy", "Graphs", "Blocks")


def main() -> None:
    st.set_page_config(page_title="PruneScope", page_icon="✂️", layout="wide")
    st.title("✂️ PruneScope")
    st.markdown(
        "See how important every channel of a PyTorch model is under each pruning option, "
        "choose what to cut, prune it, and compare the smaller model with the original. "
        "It opens on a built-in demo model: every feature works without an upload."
    )
    ss = st.session_state
    try:
        request = sidebar_model()
    except Exception as e:
        request = None
        show_error(e)
    model = None
    if request is not None:
        try:
            model = get_model(request)
            state.set_active(ss, model)
        except Exception as e:
            show_error(e, f"Could not load {request.label}")
    if model is None:
        model = state.active_model(ss)
        if model is None:
            try:
                model = get_model(sources.demo_request())
                state.set_active(ss, model)
            except Exception as e:
                show_error(e, "Could not load the demo model")
                st.stop()
        if request is not None or ss.get("source") != sources.DEMO:
            st.caption(f"Still showing: **{model.label}**")

    eval_data = sidebar_eval(model)
    compare.apply_pending_choice()  # a point chosen in the comparison chart sets the sidebar
    try:
        options, ratio, indices_text = sidebar_options()
        indices = parse_indices(indices_text) if options.criterion == "index" else None
        uniform = sidebar_uniform(model, options.criterion)
    except Exception as e:
        show_error(e)
        st.stop()

    an = model.analysis
    frozen_n = len(an.frozen)
    st.caption(
        f"Model: **{model.label}** · {len(an.groups)} prunable groups · "
        f"{sum(int(g.channels) for g in an.groups):,} channels · {frozen_n} frozen layer set(s)"
        + (f" · evaluation data: {eval_data.source} ({len(eval_data)} samples)"
           if eval_data else "")
    )
    ratios, pinned = plan_tab_view.overrides(model)
    plan_args = {"ratio": ratio, "ratios": ratios, "pinned": pinned,
                 "calibration": calibration_for(eval_data), "indices": indices,
                 "uniform": uniform}
    structures = blocks.chosen_structures(model)  # whole blocks / experts (Blocks tab)
    signature = json.dumps({"model": model.key, "options": options.to_dict(), "ratio": ratio,
                            "ratios": ratios, "pinned": sorted(pinned), "indices": indices,
                            "uniform": uniform, **structures,
                            "eval": eval_data.source if eval_data else None}, sort_keys=True)
    plan = None
    if options.criterion == "index" and not indices:
        st.info("Criterion **index**: list the filter indices to remove under “Channel indices "
                "to remove” in the sidebar (one line per layer, e.g. `block1.conv1: 0, 3`). "
                "Layer names are in the Plan tab.", icon="✍️")
    elif options.criterion in CRITERIA_NEEDING_CALIBRATION and eval_data is None:
        st.error(f"Criterion {options.criterion} needs calibration data: upload an .npz with an "
                 "array 'x' under “Calibration / evaluation data” in the sidebar.", icon="⚠️")
    else:
        try:
            plan = make_plan(model, options, **plan_args)
        except Exception as e:
            show_error(e, "Cannot plan with these options")

    tabs = st.tabs(TABS, key="main_tab", on_change="rerun")
    scores_tab, plan_tab, prune_tab, compare_tab, graphs_tab, blocks_tab = tabs
    # Lazy tabs: only the open tab's content runs (the Graphs tab exports ONNX on first use).
    if scores_tab.open is not False and plan is not None:
        with scores_tab:
            _guarded(scores.render, model, plan, options, plan_args)
    if plan_tab.open is not False:
        with plan_tab:
            _guarded(plan_tab_view.render, model, plan)
    if prune_tab.open is not False and plan is not None:
        with prune_tab:
            _guarded(prune.render, model, plan, signature, ratio, eval_data, plan_args,
                     structures)
    if compare_tab.open is not False:
        with compare_tab:
            _guarded(compare.render, model, options, eval_data)
    if graphs_tab.open is not False:
        with graphs_tab:
            _guarded(graphs.render, model)
    if blocks_tab.open is not False:
        with blocks_tab:
            _guarded(blocks.render, model, calibration_for(eval_data))


def _guarded(render, *args) -> None:
    """Run one tab; an unexpected error becomes a one-line message, the rest stays usable."""
    try:
        render(*args)
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        show_error(e, "Something went wrong in this view")


def _run_page() -> None:
    """The page, with any unexpected error shown as one line instead of a traceback."""
    try:
        with using(sidebar_device()):
            main()
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        show_error(e, "Something went wrong")


_run_page()
