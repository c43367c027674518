"""The "Compare on accuracy" tab: what each option does to the model's metric at each size.

The sweep and the sensitivity curves come from the engine (engine.quality.sweep /
sensitivity); the demo's are precomputed in assets/ (assets/make_demo_sweep.py) so they show at
once. Choosing a point (a click on the chart, or the picker below it) sets its options and
ratio in the sidebar; "Auto ratios" fills the Plan tab's per-group table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import streamlit as st

from dashboard import state
from dashboard.charts_sweep import (
    X_AXES,
    comparison_figure,
    sensitivity_frame,
    sensitivity_heatmap,
    sweep_frame,
)
from dashboard.common import editor_key, session_files, short, show_error
from dashboard.guide import glossary_popover
from dashboard.long_run import LongRun, wait_for_stopped_run
from dashboard.page import PageState
from engine.io.data import DataSet
from engine.options import PruningOptions
from engine.quality.evaluate import HIGHER_IS_BETTER

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEMO_SWEEP = ASSETS / "demo_sweep.json"
DEMO_SENSITIVITY = ASSETS / "demo_sensitivity.json"
COMPARE_AXES = {"layer_norm": "layer norm", "policy": "policy", "criterion": "criterion",
                "group_policy": "group policy"}
OPTION_KEYS = ("criterion", "policy", "layer_norm", "group_policy", "reshape_channel_axis",
               "step_size", "step_op", "seed")
PENDING_KEY = "_ps_pending_point"
DEFAULT_RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7"


def auto_ratios_key(model: state.LoadedModel) -> str:
    return f"auto_ratios_{short(model.key)}"


def apply_pending_choice() -> None:
    """Set the sidebar to a chosen point; runs before the sidebar's widgets exist."""
    ss = st.session_state
    choice = ss.pop(PENDING_KEY, None)
    if not choice:
        return
    for name in OPTION_KEYS:
        if name in choice["options"]:
            ss[f"opt_{name}"] = choice["options"][name]
    ss["opt_ratio"] = float(choice["ratio"])


@st.cache_data(show_spinner=False)
def _read_json(path: str, stamp: float) -> dict:
    return json.loads(Path(path).read_text())


def _demo_report(path: Path) -> dict | None:
    return _read_json(str(path), path.stat().st_mtime) if path.is_file() else None


def render(page: PageState) -> None:
    model, options, eval_data = page.model, page.options, page.eval_data
    st.markdown(
        "What each option does to the model's **metric** at each size, measured on the "
        "evaluation data right after pruning (before any recovery): one curve per value of "
        "the option you compare, the other options "
        "as in the sidebar. **Click a point** (or pick it below) to set its options and ratio "
        "in the sidebar."
    )
    is_demo = model.key.startswith("demo:")
    report = _demo_report(DEMO_SWEEP) if is_demo else None
    if report is None:  # another model (or the demo without its stored sweep): sweep here
        _sweep_controls(model, eval_data)
        report = _last_sweep(model)
    if report is None:
        st.info("No sweep yet: choose what to compare and press **Run sweep**.",
                icon=":material/show_chart:")
    else:
        _comparison(report, options)
    st.divider()
    _sensitivity(model, options, eval_data, is_demo)


def _comparison(report: dict, options: PruningOptions) -> None:
    frame = sweep_frame(report)
    if frame.empty:
        st.warning("The sweep has no finished points.")
        return
    axes = [a for a in COMPARE_AXES if a in frame.columns and frame[a].nunique() > 1] \
        or ["layer_norm"]
    c1, c2 = st.columns(2)
    axis = c1.selectbox("Compare", axes, format_func=lambda a: COMPARE_AXES.get(a, a),
                        key="cmp_axis")
    x = c2.radio("Against", list(X_AXES), format_func=X_AXES.get, horizontal=True,
                 key="cmp_x")
    chosen = options.to_dict()
    rows = frame
    fixed = []
    for name in OPTION_KEYS:
        if name == axis or name not in rows.columns or rows[name].nunique() <= 1:
            continue
        # the other options as in the sidebar, when the sweep has that value
        value = chosen[name] if (rows[name] == chosen[name]).any() else rows[name].iloc[0]
        rows = rows[rows[name] == value]
        fixed.append(f"{name} {value}")
    if fixed:
        st.caption("Other options: " + ", ".join(fixed))
    metric = report["metric"]
    current = current_point(rows, chosen, st.session_state.get("opt_ratio"))
    fig = comparison_figure(rows, axis, x, original=report["original"], metric=metric,
                            higher_is_better=HIGHER_IS_BETTER.get(metric, True),
                            current=current)
    event = st.plotly_chart(fig, key="cmp_chart", on_select="rerun", selection_mode="points",
                            width="stretch")
    labels = {int(r["index"]): f"{r[axis]} @ ratio {r['ratio']:g}: {metric} {r['metric']:.4f}"
              for _, r in rows.iterrows()}
    chosen_index = _selected_index(event, fig)
    # the chart keeps its selection across reruns: act on a new one only
    if chosen_index is not None and chosen_index != st.session_state.get("_cmp_applied"):
        st.session_state["_cmp_applied"] = chosen_index
        if chosen_index in labels:
            st.session_state["cmp_pick"] = chosen_index  # the picker follows the click
        _choose(frame, chosen_index)
    if st.session_state.get("cmp_pick") not in labels:  # start on the sidebar's point
        st.session_state["cmp_pick"] = current if current in labels else None
    c1, c2 = st.columns([3, 1])
    pick = c1.selectbox("Point", list(labels), format_func=labels.get, key="cmp_pick",
                        placeholder="pick a point of the chart (or click one)")
    if c2.button("Use this point", key="cmp_use", disabled=pick is None,
                 help="Pick a point first" if pick is None else
                 "Set the sidebar to this point's options and ratio"):
        _choose(frame, int(pick))
    if current is None:
        st.caption("The sidebar's setting is not a point of this sweep, so it is not marked; "
                   "pick a point to move the sidebar onto the chart.")
    else:
        st.caption("The star marks the sidebar's current setting.")


def current_point(rows, options: dict, ratio: float | None) -> int | None:
    """The sweep index of the point with the sidebar's options and ratio, if it has one."""
    if ratio is None or rows.empty:
        return None
    match = (rows["ratio"] - float(ratio)).abs() < 1e-9
    for name in OPTION_KEYS:
        if name in rows.columns and name in options:
            match &= rows[name].astype(str) == str(options[name])
    found = rows[match]
    return int(found["index"].iloc[0]) if len(found) else None


def _selected_index(event, fig) -> int | None:
    """The sweep index of the clicked point (its trace's customdata)."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    if not points:
        return None
    point = points[0]
    if "customdata" in point:
        return int(np.ravel([point["customdata"]])[0])
    curve, at = point.get("curve_number"), point.get("point_index", point.get("point_number"))
    if curve is None or at is None:
        return None
    return int(fig.data[curve].customdata[at])


def _choose(frame, index: int) -> None:
    row = frame[frame["index"] == index]
    if row.empty:
        return
    row = row.iloc[0]
    options = {name: (row[name].item() if hasattr(row[name], "item") else row[name])
               for name in OPTION_KEYS if name in row}
    st.session_state[PENDING_KEY] = {"options": options, "ratio": float(row["ratio"])}
    st.rerun()


def _sweep_controls(model: state.LoadedModel, eval_data: DataSet | None) -> None:
    if eval_data is None:
        st.info("Upload evaluation data (an .npz with x and labels y) in the sidebar to "
                "compare options on this model's metric.", icon=":material/show_chart:")
        return
    from engine.options import ALLOWED

    c1, c2, c3 = st.columns([2, 3, 1])
    axis = c1.selectbox("Sweep over", list(COMPARE_AXES), format_func=COMPARE_AXES.get,
                        key="sweep_axis")
    values = c2.multiselect("Values", list(v for v in ALLOWED[axis] if v != "index"),
                            default=[v for v in ALLOWED[axis] if v != "index"][:5],
                            key=f"sweep_values_{axis}")
    ratios = c3.text_input("Ratios", DEFAULT_RATIOS, key="sweep_ratios")
    if not st.button("Run sweep", key="sweep_run", type="primary", disabled=not values,
                     help=None if values else "Choose at least one value to sweep over"):
        return
    from engine.quality.sweep import sweep

    # written after every point, so a stopped sweep still shows what finished
    path = session_files().subdir("sweeps") / f"{short(model.key)}.json"
    path.unlink(missing_ok=True)
    model.cache["sweep_path"] = str(path)
    work = LongRun("Sweep", "sweep")
    try:
        # in this process (Streamlit's threads make forking unsafe)
        work.run(lambda: sweep(model.analysis, {axis: values}, ratios, eval_data=eval_data,
                               workers=1, out_json=path, stop=work.stop,
                               progress=lambda d, n, _r: work.update(d, n, "points")),
                 keep=lambda _report: None)  # the report is the file written point by point
    except Exception as e:  # noqa: BLE001 - one line in the page
        show_error(e, "The sweep failed")


def _last_sweep(model: state.LoadedModel) -> dict | None:
    wait_for_stopped_run("sweep")
    path = model.cache.get("sweep_path")
    if not path or not Path(path).is_file():
        return None
    report = json.loads(Path(path).read_text())
    if not report.get("complete"):
        st.caption(f"Stopped sweep: {len(report['points'])} of {report['total']} points "
                   "finished; they are shown below.")
    return report


def _sensitivity(model: state.LoadedModel, options: PruningOptions,
                 eval_data: DataSet | None, is_demo: bool) -> None:
    st.subheader("Sensitivity of each group")
    report = _demo_report(DEMO_SENSITIVITY) if is_demo else None
    if report is not None:
        st.caption("Each group pruned alone at each ratio, default options, measured on the "
                   "demo's calibration split (the evaluation set stays held out).")
    elif eval_data is not None:
        wait_for_stopped_run("sens")  # a stopped run stores what finished
        report = model.cache.get("sensitivity")
        if st.button("Measure sensitivity", key="sens_run",
                     help="Each group pruned alone at 0.1 ... 0.9, on the sidebar's data"):
            from engine.quality.sensitivity import sensitivity

            work = LongRun("Sensitivity", "sens")

            def keep(done: dict) -> None:
                model.cache["sensitivity"] = done

            try:
                report = work.run(lambda: sensitivity(
                    model.analysis, options, eval_data=eval_data, workers=1, stop=work.stop,
                    progress=lambda d, n, _r: work.update(d, n, "points")), keep)
            except Exception as e:  # noqa: BLE001
                show_error(e, "Measuring the sensitivity failed")
    if report is None:
        st.caption("No sensitivity curves yet.")
        return
    if not report.get("complete", True):
        st.caption(f"Stopped: {len(report['points'])} of {report['total']} points finished; "
                   "the missing cells are blank. Auto ratios use the finished points.")
    metric = report["metric"]
    higher = HIGHER_IS_BETTER.get(metric, True)
    log = st.toggle("Log colour scale", value=not higher, key="sens_log",
                    help="Spreads small and large changes apart: on a linear scale a few "
                    "large values leave the rest white.")
    st.plotly_chart(sensitivity_heatmap(sensitivity_frame(report), metric,
                                        higher_is_better=higher, log=log),
                    key="sens_heatmap", width="stretch")
    glossary_popover("sens")
    _auto_ratios(model, report, eval_data)


def _auto_ratios(model: state.LoadedModel, report: dict, eval_data: DataSet | None) -> None:
    c1, c2, c3 = st.columns([1, 2, 1])
    resource = c1.radio("Target", ["flops", "params"], horizontal=True, key="auto_resource",
                        format_func=RESOURCE_WORDS.get)
    target = c2.slider("Fraction to remove", 0.05, 0.9, 0.5, 0.05, key="auto_target")
    if not c3.button("Auto ratios", key="auto_run", type="primary"):
        chosen = st.session_state.get(auto_ratios_key(model))
        if chosen:
            summary = st.session_state.get(AUTO_SUMMARY_KEY, {}).get(model.key)
            if summary:
                st.success(summary)
            st.caption("Per-group ratios in the Plan tab: "
                       + ", ".join(f"{k} {v:g}" for k, v in chosen.items()))
        return
    from engine.quality.targets import ratios_for_target
    from engine.scoring.analysis import plan as make_engine_plan

    sens_options = PruningOptions.from_any(report["options"])
    try:
        with st.spinner("choosing per-group ratios and measuring them…"):
            section = ratios_for_target(
                model.analysis, sens_options, sensitivity_report=report,
                analysis=model.analysis, eval_data=eval_data,
                **{f"target_{resource}": target})
            chosen_plan = make_engine_plan(model.analysis, sens_options,
                                           ratios=section["ratios"])
    except Exception as e:  # noqa: BLE001
        show_error(e, "Auto ratios failed")
        return
    pruned = sum(int(g.pruned.size) for g in chosen_plan.groups)
    total = sum(int(g.scores.size) for g in chosen_plan.groups)
    ss = st.session_state
    ss[auto_ratios_key(model)] = section["ratios"]
    ss.pop(editor_key(model), None)  # the table shows the new ratios
    summary = auto_summary(section, resource, pruned / max(total, 1))
    ss.setdefault(AUTO_SUMMARY_KEY, {})[model.key] = summary
    # Every group now has its own ratio: the sidebar shows the share of channels they prune,
    # and the options the ratios were chosen with.
    ss[PENDING_KEY] = {"options": {k: v for k, v in report["options"].items()
                                   if k in OPTION_KEYS},
                       "ratio": round(pruned / max(total, 1), 2)}
    st.rerun()


RESOURCE_WORDS = {"flops": "FLOPs", "params": "parameters"}
AUTO_SUMMARY_KEY = "_ps_auto_summary"


def auto_summary(section: dict, resource: str, channel_share: float) -> str:
    """What Auto ratios did, in words: the target, what was removed (and why more), the
    metric of the chosen ratios against the uniform ratio and the original."""
    words = RESOURCE_WORDS.get(resource, resource)
    target = float(section["target"]["remove"])
    removed = float(section["removed"])
    text = f"Target: remove {target:.0%} of the {words}; the chosen ratios remove {removed:.1%}"
    over = removed - target
    if over > 0.005:
        text += (f" ({over * 100:.1f} points more: channels go in whole steps and blocks, so "
                 "the nearest plan at or above the target was taken)")
    elif over < -0.005:
        text += f" ({-over * 100:.1f} points less: no plan reaches the target)"
    text += (f", pruning {channel_share:.1%} of the channels; the sidebar's ratio now shows that "
             f"share. The uniform global ratio removing as much is "
             f"{section['uniform']['ratio']:g}.")
    comparison = section.get("comparison")
    if comparison:
        m = comparison["metric"]
        fmt = "{:.2%}" if HIGHER_IS_BETTER.get(m, True) and m != "relative_error" else "{:.4g}"
        text += (f" {m.capitalize()} on {comparison['data']}: chosen ratios "
                 f"{fmt.format(comparison['auto'])}, uniform ratio "
                 f"{fmt.format(comparison['uniform'])}, original "
                 f"{fmt.format(comparison['original'])}.")
    else:
        text += " Not measured on evaluation data (none given)."
    return text
