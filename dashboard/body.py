"""The page below its header: the sidebar read into one `dashboard.page.PageState`, then the
open tab drawn from it (app.py draws the header first, then runs `run_page`)."""

from __future__ import annotations

import json

import streamlit as st

from dashboard import sources, state
from dashboard.common import calibration_for, get_model, make_plan, show_error
from dashboard.page import PageState
from dashboard.sidebar import (
    index_example,
    parse_indices,
    sidebar_device,
    sidebar_eval,
    sidebar_model,
    sidebar_options,
    sidebar_uniform,
)
from dashboard.tabs import TABS, blocks, compare
from dashboard.tabs import plan as plan_tab_view
from engine.device import using
from engine.scoring.criteria import CRITERIA_NEEDING_CALIBRATION


def main() -> None:
    page = _page_state()
    tabs = st.tabs([tab.title for tab in TABS], key="main_tab", on_change="rerun")
    # Lazy tabs: only the open tab's content runs (the Graphs tab exports ONNX on first use).
    for tab, container in zip(TABS, tabs):
        if container.open is False:
            continue
        with container:
            if tab.needs_plan and page.plan is None:
                nothing = "No scores to draw" if tab.module == "scores" else "Nothing to prune"
                st.info(f"{nothing} until the options above make a plan (see the message "
                        "above the tabs).")
                continue
            _guarded(tab.render, page)


def _page_state() -> PageState:
    """The sidebar read once: the model, its data, the options and the plan they give."""
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
        options, ratio, indices_text = sidebar_options(model.analysis)
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
    calibration = calibration_for(eval_data)
    plan_args = {"ratio": ratio, "ratios": ratios, "pinned": pinned,
                 "calibration": calibration, "indices": indices, "uniform": uniform}
    structures = blocks.chosen_structures(model)  # whole blocks / experts (Blocks tab)
    signature = json.dumps({"model": model.key, "options": options.to_dict(), "ratio": ratio,
                            "ratios": ratios, "pinned": sorted(pinned), "indices": indices,
                            "uniform": uniform, **structures,
                            "eval": eval_data.source if eval_data else None}, sort_keys=True)
    plan = None
    if options.criterion == "index" and not indices:
        st.info("Criterion **index**: list the filter indices to remove under “Channel indices "
                "to remove” in the sidebar (one line per layer, e.g. "
                f"`{index_example(model.analysis)}`), or press “Use the example” there. "
                "Layer names are in the Plan tab.", icon=":material/edit_note:")
    elif options.criterion in CRITERIA_NEEDING_CALIBRATION and eval_data is None:
        st.error(f"Criterion {options.criterion} needs calibration data: upload an .npz with an "
                 "array 'x' under “Calibration / evaluation data” in the sidebar.",
                 icon=":material/warning:")
    else:
        try:
            plan = make_plan(model, options, **plan_args)
        except Exception as e:
            show_error(e, "Cannot plan with these options")
    return PageState(model=model, options=options, ratio=ratio, eval_data=eval_data,
                     calibration=calibration, plan_args=plan_args, structures=structures,
                     signature=signature, plan=plan)


def _guarded(render, page: PageState) -> None:
    """Run one tab; an unexpected error becomes a one-line message, the rest stays usable."""
    try:
        render(page)
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        show_error(e, "Something went wrong in this view")


def run_page() -> None:
    """The page, with any unexpected error shown as one line instead of a traceback."""
    try:
        with using(sidebar_device()):
            main()
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        show_error(e, "Something went wrong")

