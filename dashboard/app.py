"""PruneScope dashboard: score, plan, prune and compare a PyTorch model in the browser.

Run with ``make run`` (or ``streamlit run dashboard/app.py``). Opens on the built-in demo
model with its scores drawn. All pruning is done by the engine's public API; this page only
collects options, draws the engine's numbers and shows the results. Each tab lives in its own
module under dashboard/tabs/, listed once in the tab registry `dashboard.tabs.TABS`; each
tab's ``render`` takes the one `dashboard.page.PageState` built here from the sidebar
(dashboard/sidebar.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ (not the repository) on sys.path.
_ROOT = Path(__file__).resolve().parent.parent
FAVICON = Path(__file__).resolve().parent / "favicon.png"
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from engine.offline import stay_offline  # noqa: E402

stay_offline()

import streamlit as st  # noqa: E402

from dashboard import sources, state  # noqa: E402
from dashboard.common import calibration_for, get_model, make_plan, show_error  # noqa: E402
from dashboard.guide import start_here  # noqa: E402
from dashboard.page import PageState  # noqa: E402
from dashboard.sidebar import (  # noqa: E402
    index_example,
    parse_indices,
    sidebar_device,
    sidebar_eval,
    sidebar_model,
    sidebar_options,
    sidebar_uniform,
)
from dashboard.tabs import TABS, blocks, compare  # noqa: E402
from dashboard.tabs import plan as plan_tab_view  # noqa: E402
from engine.device import using  # noqa: E402
from engine.scoring.criteria import CRITERIA_NEEDING_CALIBRATION  # noqa: E402


def main() -> None:
    # a local icon: a material or emoji icon makes the browser fetch it from Google's fonts
    st.set_page_config(page_title="PruneScope", page_icon=str(FAVICON), layout="wide")
    st.title("PruneScope")
    st.markdown(
        "See how important every channel of a PyTorch model is under each pruning option, "
        "choose what to cut, prune it, and compare the smaller model with the original. "
        "It opens on a built-in demo model: every feature works without an upload."
    )
    start_here()
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


def _run_page() -> None:
    """The page, with any unexpected error shown as one line instead of a traceback."""
    try:
        with using(sidebar_device()):
            main()
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        show_error(e, "Something went wrong")


_run_page()
