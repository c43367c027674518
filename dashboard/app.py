"""PruneScope dashboard: score, plan, prune and compare a PyTorch model in the browser.

Run with ``make run`` (or ``streamlit run dashboard/app.py``). Opens on the built-in demo
model with its scores drawn. All pruning is done by the engine's public API; this page only
collects options, draws the engine's numbers and shows the results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

# `streamlit run dashboard/app.py` puts dashboard/ (not the repository) on sys.path.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import engine  # noqa: E402
import engine.io.export  # noqa: E402
import engine.quality.metrics  # noqa: E402
from dashboard import charts, frames, netron_server, sources, state  # noqa: E402
from dashboard.prune_run import PruneRun, comparison_rows, run_prune  # noqa: E402
from engine.errors import PruneScopeError  # noqa: E402
from engine.options import (  # noqa: E402
    CRITERIA,
    GROUP_POLICIES,
    LAYER_NORMS,
    POLICIES,
    RESHAPE_CHANNEL_AXES,
    STEP_OPS,
    PruningOptions,
)

DEFAULTS = PruningOptions()
DEFAULT_RATIO = 0.5
RESULT_KEY = "_ps_result"
FAILED_KEY = "_ps_failed"
EVAL_KEY = "_ps_eval"
TABS = ("Scores", "Plan", "Prune & compare", "Graphs")
SCORE_VIEWS = ("Overview", "Compare layer norms", "Compare policies")

HELP = {
    "criterion": "How a channel's raw importance is measured: l2/l1 = norm of its filter; "
    "gm = distance to the other filters (redundant filters score low); nuclear_norm = "
    "size of its feature maps on calibration data; random = seeded baseline; index = "
    "you name the channels to remove.",
    "policy": "How the members of a connected group (e.g. the convs feeding a residual add) "
    "are combined into one score per channel: sum or average of their normalized scores, "
    "or backward = normalize the sum of the raw scores (the post-residual feature map).",
    "layer_norm": "Makes layers comparable before the global ranking: standard_score (z-score), "
    "tss_norm (divide by the sum), linear_scaling (min-max to 0..1), softmax_norm, or none "
    "(compare raw scores).",
    "group_policy": "Grouped convolutions and head reshapes must keep the same number of "
    "channels per block: sum/average score an in-block index over all blocks; count removes "
    "the smallest per-block count under the cut; none removes the same number per block.",
    "reshape_channel_axis": "For a channel split into (blocks, size), e.g. 12 heads × 64: "
    "-1/1 prune inside every block, -2/0 prune whole blocks (heads).",
    "step_size": "The number of channels kept in each group is aligned to a multiple of this "
    "(hardware-friendly sizes); 1 disables alignment.",
    "step_op": "How the kept count is aligned to the step size: round, round_up, round_down, or "
    "none (no alignment).",
    "ratio": "Fraction of all prunable channels to remove, ranked together across layers by "
    "normalized score (0 ≤ ratio < 1). Groups with their own ratio in the Plan tab use that.",
    "seed": "Seed of the random criterion (and any other seeded choice).",
}


# ----------------------------------------------------------------------------- helpers


def _short(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _session_files() -> sources.SessionFiles:
    """The session's temp folder; also removes the folders of sessions that have closed."""
    session_id = None
    try:
        from streamlit.runtime import Runtime
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        session_id = ctx.session_id if ctx else None
        if Runtime.exists():
            runtime = Runtime.instance()
            alive = _session_alive_check(runtime)
            if sources.start_sweeper(alive, netron_server.stop_under, _sweep_interval_s()):
                sources.remove_orphans()
            sources.sweep(alive, netron_server.stop_under)
    except Exception:  # cleanup is best effort; the folders also go at process exit
        pass
    return state.session_files(st.session_state, session_id)


def _session_alive_check(runtime: Any):
    """A session still exists while it is connected or kept for a reconnect.

    A briefly disconnected browser (network blip, laptop lid) reconnects to its session for
    ``server.disconnectedSessionTTL`` seconds; its uploads must still be there then.
    """
    manager = getattr(runtime, "_session_mgr", None)
    get_info = getattr(manager, "get_session_info", None)

    def alive(session_id: str) -> bool:
        if runtime.is_active_session(session_id):
            return True
        return get_info is not None and get_info(session_id) is not None

    return alive


def _sweep_interval_s() -> float:
    try:
        return max(0.2, float(os.environ.get("PRUNESCOPE_SWEEP_S", "30")))
    except ValueError:
        return 30.0


def _show_error(error: BaseException, what: str = "") -> None:
    prefix = f"{what}: " if what else ""
    st.error(prefix + sources.one_line(error), icon="⚠️")


def _upload_limit_mb() -> int:
    try:
        return int(st.get_option("server.maxUploadSize"))
    except Exception:
        return 200


def _upload_limit_note(limit_mb: int) -> None:
    # The browser refuses a file over the limit before the page sees it (the file's name
    # turns red, the reason is in its tooltip), so the limit is stated up front.
    st.sidebar.caption(f"Uploads up to {limit_mb} MB: a larger file is refused (its name "
                       "turns red; hover it for the reason). Larger models: use “Local file "
                       "path”, which reads the file in place.")


def _load(request: sources.ModelRequest) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {}
    if request.trust_pickle:
        kwargs["trust_pickle"] = True
    if request.input_shapes:
        kwargs["input_shapes"] = [tuple(s) for s in request.input_shapes]
    captured = engine.load_model(request.source, **kwargs)
    analysis = engine.analyze(captured)
    return captured, analysis


def _get_model(request: sources.ModelRequest) -> state.LoadedModel:
    ss = st.session_state
    failed: dict[str, str] = ss.setdefault(FAILED_KEY, {})
    if request.key in failed:
        # The same failing request is not retried on every rerun; the message stays.
        raise PruneScopeError(failed[request.key])
    try:
        with st.spinner(f"Loading and analysing {request.label}…"):
            return state.get_model(ss, request.key, request.label, lambda: _load(request))
    except Exception as e:
        failed[request.key] = sources.readable(sources.one_line(e), request)
        raise PruneScopeError(failed[request.key]) from None


# ----------------------------------------------------------------------------- sidebar


def sidebar_model() -> sources.ModelRequest | None:
    """Model source widgets; returns the request to load (None while waiting for a file)."""
    st.sidebar.header("Model")
    initial = os.environ.get("PRUNESCOPE_MODEL", "demo")
    if initial != "demo" and "source" not in st.session_state:
        # `prunescope dashboard MODEL` opens on that file
        st.session_state["source"] = sources.LOCAL_PATH
        st.session_state["local_path"] = initial
    source = st.sidebar.radio(
        "Model source",
        sources.SOURCES,
        key="source",
        help="Start with the built-in demo; bring your own model as a torch.export .pt2 "
        "(upload or path on this machine), or a pickled .pt if you trust it.",
    )
    limit = _upload_limit_mb()
    files = _session_files()
    if source == sources.DEMO:
        st.sidebar.caption("A small digit classifier (8×8 images) with residual, grouped, "
                           "depthwise and attention blocks, plus its own evaluation set.")
        return sources.demo_request()
    if source == sources.UPLOAD_PT2:
        up = st.sidebar.file_uploader(
            "Model file (.pt2)", type=["pt2"], key="upload_pt2",
            help="A program saved with torch.export.save.",
        )
        _upload_limit_note(limit)
        if up is None:
            return None
        path = files.store_upload(up.file_id, up.name, up)
        return sources.path_request(path, label=f"upload {up.name}", shown_as=up.name)
    if source == sources.LOCAL_PATH:
        raw = st.sidebar.text_input(
            "Path to a model file on this machine", key="local_path",
            placeholder="/models/resnet50.pt2",
            help="Read in place, never copied: for models too large to upload.",
        )
        trust = False
        shapes = None
        if raw.strip().lower().endswith((".pt", ".pth")):
            trust = st.sidebar.checkbox(
                "I trust this file: loading a .pt pickle runs code from it",
                key="trust_path_pickle",
            )
            shapes_text = st.sidebar.text_input(
                "Input shape(s)", key="path_shapes", placeholder="1,3,224,224",
                help="One shape per model input, ';' between inputs.",
            )
            shapes = sources.parse_shapes(shapes_text) if trust and shapes_text.strip() else None
        if not raw.strip():
            return None
        return sources.path_request(raw, trust_pickle=trust, input_shapes=shapes)
    # Pickled .pt upload: needs explicit trust and the input shapes.
    st.sidebar.warning("A .pt pickle can run arbitrary code when loaded. Only load files "
                       "you trust.", icon="🔓")
    trust = st.sidebar.checkbox("I trust this file: loading a .pt pickle runs code from it",
                                key="trust_pickle")
    shapes_text = st.sidebar.text_input(
        "Input shape(s)", key="pt_shapes", placeholder="1,3,224,224",
        help="One shape per model input (batch first), ';' between inputs.",
    )
    up = st.sidebar.file_uploader("Model file (.pt)", type=["pt", "pth"], key="upload_pt",
                                  disabled=not trust)
    _upload_limit_note(limit)
    if up is None or not trust:
        return None
    shapes = sources.parse_shapes(shapes_text)
    path = files.store_upload(up.file_id, up.name, up)
    return sources.path_request(path, trust_pickle=True, input_shapes=shapes,
                                label=f"upload {up.name}", shown_as=up.name)


def sidebar_eval(model: state.LoadedModel) -> sources.EvalData | None:
    up = st.sidebar.file_uploader(
        "Calibration / evaluation data (.npz, optional)", type=["npz"], key="upload_eval",
        help="An .npz with 'x' (model inputs, samples on the first axis) and optional integer "
        "labels 'y'. Used by the nuclear_norm criterion and for the before/after fidelity. "
        "The demo brings its own.",
    )
    ss = st.session_state
    cached = ss.get(EVAL_KEY)
    if up is not None:
        key = f"upload:{up.file_id}"
        if cached is None or cached[0] != key:
            try:
                data = sources.load_npz(up.getvalue(), label=f"{up.name}")
            except Exception as e:
                _show_error(e)
                data = None
            ss[EVAL_KEY] = cached = (key, data)
        if cached[1] is not None:
            return cached[1]
    if model.key.startswith("demo:"):
        key = "demo"
        if cached is None or cached[0] != key:
            ss[EVAL_KEY] = cached = (key, sources.demo_eval())
        return cached[1]
    return None


def sidebar_options() -> tuple[PruningOptions, float, str]:
    st.sidebar.header("Pruning options")
    sb = st.sidebar

    def select(label: str, values: tuple, name: str):
        default = getattr(DEFAULTS, name)
        return sb.selectbox(label, values, index=values.index(default), key=f"opt_{name}",
                            help=HELP[name])

    criterion = select("Criterion", CRITERIA, "criterion")
    policy = select("Policy", POLICIES, "policy")
    layer_norm = select("Layer norm", LAYER_NORMS, "layer_norm")
    group_policy = select("Group policy", GROUP_POLICIES, "group_policy")
    axis = select("Reshape channel axis", RESHAPE_CHANNEL_AXES, "reshape_channel_axis")
    step_size = sb.number_input("Step size", min_value=1, max_value=1024,
                                value=DEFAULTS.step_size, step=1, key="opt_step_size",
                                help=HELP["step_size"])
    step_op = select("Step op", STEP_OPS, "step_op")
    ratio = sb.slider("Pruning ratio", min_value=0.0, max_value=0.95, value=DEFAULT_RATIO,
                      step=0.01, key="opt_ratio", help=HELP["ratio"])
    seed = sb.number_input("Seed", min_value=0, value=DEFAULTS.seed, step=1, key="opt_seed",
                           help=HELP["seed"])
    indices_text = ""
    if criterion == "index":
        indices_text = sb.text_area(
            "Channel indices to remove", key="opt_indices",
            placeholder="block1.conv1: 0, 3, 5",
            help="Criterion 'index': one line per layer, 'layer: i, j, k' (filter indices of "
            "that layer). Layer names are in the Plan tab.",
        )
    options = PruningOptions(
        criterion=criterion, policy=policy, layer_norm=layer_norm, group_policy=group_policy,
        reshape_channel_axis=int(axis), step_size=int(step_size), step_op=step_op,
        seed=int(seed),
    )
    return options, float(ratio), indices_text


def parse_indices(text: str) -> dict[str, list[int]] | None:
    """``layer: 0, 3, 5`` lines to {layer: [0, 3, 5]}; None when empty."""
    out: dict[str, list[int]] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        name, sep, rest = line.rpartition(":")
        if not sep or not name.strip():
            raise PruneScopeError(f"bad indices line {line.strip()!r}: use 'layer: 0, 3, 5'")
        try:
            out[name.strip()] = [int(v) for v in re.split(r"[,\s]+", rest.strip()) if v]
        except ValueError:
            raise PruneScopeError(
                f"bad indices line {line.strip()!r}: indices must be integers"
            ) from None
    return out or None


# ----------------------------------------------------------------------------- plan


def editor_key(model: state.LoadedModel) -> str:
    return f"layers_{_short(model.key)}"


def overrides(model: state.LoadedModel) -> tuple[dict[str, float], list[str]]:
    """Per-group ratios and pins from the Plan table's edits (read before drawing it)."""
    groups = [g.name for g in model.analysis.groups]
    edits = st.session_state.get(editor_key(model)) or {}
    ratios: dict[str, float] = {}
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


def make_plan(model: state.LoadedModel, options: PruningOptions, ratio: float,
              ratios: dict[str, float], pinned: list[str], calibration: Any,
              indices: dict[str, list[int]] | None) -> Any:
    return engine.plan(model.analysis, options, ratio=ratio, ratios=ratios or None,
                       pinned=tuple(pinned), calibration=calibration, indices=indices)


def calibration_for(eval_data: sources.EvalData | None) -> Any:
    """The calibration array, the same object on every rerun so the engine's raw-score cache
    (keyed by calibration) is hit."""
    if eval_data is None:
        return None
    return eval_data.x


# ----------------------------------------------------------------------------- tabs


def tab_scores(model: state.LoadedModel, plan: Any, options: PruningOptions, plan_args: dict):
    view = st.segmented_control("View", SCORE_VIEWS, default=SCORE_VIEWS[0], key="score_view",
                                label_visibility="collapsed") or SCORE_VIEWS[0]
    if view == "Overview":
        scores_overview(model, plan, options)
    elif view == "Compare layer norms":
        compare_norms(model, options, plan_args)
    else:
        compare_policies(model, options, plan_args)


def scores_overview(model: state.LoadedModel, plan: Any, options: PruningOptions) -> None:
    total = sum(int(g.scores.size) for g in plan.groups)
    pruned = sum(int(g.pruned.size) for g in plan.groups)
    c = st.columns(4)
    c[0].metric("Prunable groups", len(plan.groups))
    c[1].metric("Channels", f"{total:,}")
    c[2].metric("Channels to prune", f"{pruned:,}", f"-{pruned / max(total, 1):.1%}",
                delta_color="off")
    c[3].metric("Global cut", "—" if plan.threshold is None else f"{plan.threshold:.4g}")
    st.markdown(
        f"**Combined normalized score of every group** (criterion `{options.criterion}`, "
        f"layer norm `{options.layer_norm}`, policy `{options.policy}`), in network order. "
        "Boxes span the quartiles, whiskers min–max; green = kept channels, red = pruned, "
        "dashed line = the global cut."
    )
    fig = charts.score_overview(frames.stats_frame(plan), plan.threshold)
    st.plotly_chart(fig, key="chart_overview", width="stretch")

    st.subheader("Drill down into one group")
    names = [g.name for g in plan.groups]
    labels = {g.name: f"{g.name}  ·  {len(g.layers)} member(s), {g.scores.size} ch"
              for g in plan.groups}
    name = st.selectbox("Group", names, key=f"drill_{_short(model.key)}",
                        format_func=labels.get,
                        help="Each member's normalized scores and the combined score, "
                        "channel by channel.")
    gp = plan.group(name) if hasattr(plan, "group") else next(
        g for g in plan.groups if g.name == name)
    st.caption(f"Members: {', '.join(gp.layers)} · pruned {gp.pruned.size} of {gp.scores.size}"
               f" channels ({getattr(gp, 'mode', '')})")
    detail = charts.group_detail(frames.detail_frame(gp, options.policy),
                                 plan.threshold if getattr(gp, "mode", "global") == "global"
                                 else None)
    st.plotly_chart(detail, key="chart_detail", width="stretch")


def _variant_plans(model, options, plan_args, field_name, values) -> tuple[dict, list[str]]:
    plans: dict[str, Any] = {}
    errors: list[str] = []
    for value in values:
        try:
            plans[value] = make_plan(model, replace(options, **{field_name: value}), **plan_args)
        except Exception as e:
            errors.append(f"{value}: {sources.one_line(e)}")
    return plans, errors


def compare_norms(model: state.LoadedModel, options: PruningOptions, plan_args: dict) -> None:
    st.markdown(
        f"**The same groups under all five layer norms** at ratio {plan_args['ratio']:.2f} "
        f"(criterion `{options.criterion}`, policy `{options.policy}`). Raw scores are reused; "
        "only the normalization changes. The dashed line is each norm's global cut."
    )
    plans, errors = _variant_plans(model, options, plan_args, "layer_norm", LAYER_NORMS)
    for msg in errors:
        st.error(msg)
    if not plans:
        return
    fig = charts.norm_comparison(frames.norm_stats_frame(plans),
                                 {n: p.threshold for n, p in plans.items()})
    st.plotly_chart(fig, key="chart_norms", width="stretch")
    st.markdown("**What each norm would prune** (channels per group):")
    counts = frames.prune_count_frame(plans, by="norm")
    st.plotly_chart(charts.prune_count_comparison(counts, by="norm"), key="chart_norm_counts",
                    width="stretch")
    st.dataframe(frames.pivot_counts(counts, by="norm"), hide_index=True, width="stretch")


def compare_policies(model: state.LoadedModel, options: PruningOptions,
                     plan_args: dict) -> None:
    connected = [g.name for g in model.analysis.groups if len(g.layers) > 1]
    if not connected:
        st.info("This model has no connected groups (groups with more than one member): "
                "the three policies agree on every group.")
        return
    st.markdown(
        f"**Connected groups under each policy** at ratio {plan_args['ratio']:.2f} "
        f"(layer norm `{options.layer_norm}`). `sum` inflates groups with many members, "
        "`average` keeps them comparable with single layers, `backward` scores the "
        "post-residual feature map."
    )
    plans, errors = _variant_plans(model, options, plan_args, "policy", POLICIES)
    for msg in errors:
        st.error(msg)
    if not plans:
        return
    name = st.selectbox("Connected group", connected, key=f"policy_group_{_short(model.key)}")
    fig = charts.policy_comparison(frames.policy_frame(plans, name),
                                   {p: plan.threshold for p, plan in plans.items()})
    st.plotly_chart(fig, key="chart_policies", width="stretch")
    counts = frames.prune_count_frame(plans, by="policy")
    st.markdown("**What each policy would prune** (all groups; connected groups first):")
    table = frames.pivot_counts(counts, by="policy")
    if not table.empty:
        is_connected = table["group"].isin(connected)
        table = pd.concat([table[is_connected], table[~is_connected]], ignore_index=True)
    st.dataframe(table, hide_index=True, width="stretch")


def tab_plan(model: state.LoadedModel, plan: Any | None) -> None:
    st.markdown(
        "Every prunable group of connected channels, in network order. Set a group's **own "
        "ratio** (blank = the global ratio) or **pin** it to keep all its channels; the "
        "charts and the Prune button follow."
    )
    an = model.analysis
    by_name = {g.name: g for g in plan.groups} if plan is not None else {}
    rows = []
    for g in an.groups:
        gp = by_name.get(g.name)
        rows.append({
            "Group": g.name,
            "Member layers": ", ".join(g.layers),
            "Channels": int(g.channels),
            "To prune": int(gp.pruned.size) if gp is not None else 0,
            "Kept": int(gp.kept.size) if gp is not None else int(g.channels),
            "Own ratio": None,
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


def tab_prune(model: state.LoadedModel, plan: Any, signature: str, ratio: float,
              eval_data: sources.EvalData | None) -> None:
    total = sum(int(g.scores.size) for g in plan.groups)
    pruned = sum(int(g.pruned.size) for g in plan.groups)
    st.markdown(
        f"The current plan removes **{pruned:,} of {total:,}** prunable channels "
        f"({pruned / max(total, 1):.1%}). Prune builds the smaller model, saves it as "
        "`model.pt2`, `model.onnx` and `report.json`, and compares it with the original"
        + (f" on **{eval_data.label}** ({eval_data.n} samples)." if eval_data else ".")
    )
    if st.button("Prune", type="primary", key="prune", icon="✂️"):
        files = _session_files()
        out_dir = files.subdir(f"pruned-{_short(model.key)}-{_short(signature)}")
        with st.status("Pruning…", expanded=True) as status:
            try:
                run = run_prune(engine, model, plan, out_dir, eval_data, signature, ratio,
                                progress=st.write)
            except Exception as e:
                status.update(label="Pruning failed", state="error")
                _show_error(e, "Pruning failed")
            else:
                st.session_state[RESULT_KEY] = run
                status.update(label="Pruned and saved", state="complete", expanded=False)
    run: PruneRun | None = st.session_state.get(RESULT_KEY)
    if run is None or run.model_key != model.key:
        st.info("Press **Prune** to build the pruned model and see before/after numbers.")
        return
    if run.signature != signature:
        st.warning("These results are for earlier options "
                   f"({_options_line(run.options, run.ratio)}). Press Prune to update.")
    show_result(run)


def _options_line(options: dict, ratio: float) -> str:
    parts = [f"{k}={v}" for k, v in options.items() if k != "seed"]
    return ", ".join(parts + [f"ratio={ratio:.2f}"])


def show_result(run: PruneRun) -> None:
    st.subheader("Before / after")
    c = st.columns(4)
    b, a = run.before, run.after
    for col, label, key in ((c[0], "Parameters", "params"), (c[1], "FLOPs", "flops")):
        if b.get(key) and a.get(key) is not None:
            col.metric(label, f"{a[key]:,}", f"{(a[key] - b[key]) / b[key]:+.1%}",
                       delta_color="inverse")
    fid = run.fidelity
    if "top1_agreement" in fid:
        c[2].metric("Top-1 agreement", f"{fid['top1_agreement']:.1%}",
                    help="Share of samples where the pruned model predicts the same class")
    if "accuracy_after" in fid:
        c[3].metric("Accuracy after", f"{fid['accuracy_after']:.1%}",
                    f"{fid['accuracy_after'] - fid['accuracy_before']:+.1%} "
                    f"(before {fid['accuracy_before']:.1%})")
    st.dataframe(pd.DataFrame(comparison_rows(run)), hide_index=True, width="stretch")
    if fid:
        rows = [{"Measure": "Samples", "Value": f"{fid.get('samples', 0):,}"}]
        if "top1_agreement" in fid:
            rows.append({"Measure": "Top-1 agreement with the original",
                         "Value": f"{fid['top1_agreement']:.2%}"})
        if "max_abs_diff" in fid:
            rows.append({"Measure": "Max abs output difference",
                         "Value": f"{fid['max_abs_diff']:.4g}"})
        if "accuracy_before" in fid:
            rows.append({"Measure": "Accuracy before", "Value": f"{fid['accuracy_before']:.2%}"})
            rows.append({"Measure": "Accuracy after", "Value": f"{fid['accuracy_after']:.2%}"})
        st.markdown(f"**Fidelity** on {run.fidelity_on}:")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    for note in run.notes:
        st.caption(note)
    st.subheader("Downloads")
    c = st.columns(3)
    mimes = {"model.pt2": "application/octet-stream", "model.onnx": "application/octet-stream",
             "report.json": "application/json"}
    for col, (name, mime) in zip(c, mimes.items()):
        path = _file_named(run, name)
        if path is None:
            col.caption(f"{name}: not written")
            continue
        col.download_button(
            f"Download {name}", data=lambda p=path: p.read_bytes(), file_name=name, mime=mime,
            key=f"dl_{name.replace('.', '_')}", icon="⬇️", width="stretch", on_click="ignore",
        )


def _file_named(run: PruneRun, name: str) -> Path | None:
    for key, path in run.files.items():
        if path.name == name or key == name or key == Path(name).stem:
            if path.is_file():
                return path
    return None


def tab_graphs(model: state.LoadedModel) -> None:
    st.markdown("The original and the pruned graph in [Netron](https://netron.app), served "
                "locally (127.0.0.1) from the ONNX files.")
    left, right = st.columns(2)
    with left:
        st.markdown("**Original**")
        try:
            path = _original_graph_file(model)
            server = netron_server.serve(path)
            st.iframe(server.url, height=720)
            st.caption(f"{path.name} · {server.url}")
        except Exception as e:
            _show_error(e, "Cannot show the original graph")
    with right:
        st.markdown("**Pruned**")
        run: PruneRun | None = st.session_state.get(RESULT_KEY)
        path = _file_named(run, "model.onnx") if run and run.model_key == model.key else None
        if path is None:
            st.info("Prune the model (Prune & compare tab) to see its graph here.")
            return
        try:
            server = netron_server.serve(path)
            st.iframe(server.url, height=720)
            st.caption(f"{path.name} · {server.url}")
        except Exception as e:
            _show_error(e, "Cannot show the pruned graph")


def _original_graph_file(model: state.LoadedModel) -> Path:
    """ONNX of the original (Netron reads it best), exported once per model."""
    cached = model.cache.get("original_onnx")
    if cached is not None and Path(cached).is_file():
        return Path(cached)
    files = _session_files()
    out = files.subdir(f"original-{_short(model.key)}") / "original.onnx"
    with st.spinner("Exporting the original model to ONNX for Netron…"):
        engine.io.export.export_onnx(model.captured.program, out)
    model.cache["original_onnx"] = out
    return out


# ----------------------------------------------------------------------------- page


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
        _show_error(e)
    model = None
    if request is not None:
        try:
            model = _get_model(request)
            state.set_active(ss, model)
        except Exception as e:
            _show_error(e, f"Could not load {request.label}")
    if model is None:
        model = state.active_model(ss)
        if model is None:
            try:
                model = _get_model(sources.demo_request())
                state.set_active(ss, model)
            except Exception as e:
                _show_error(e, "Could not load the demo model")
                st.stop()
        if request is not None or ss.get("source") != sources.DEMO:
            st.caption(f"Still showing: **{model.label}**")

    eval_data = sidebar_eval(model)
    try:
        options, ratio, indices_text = sidebar_options()
        indices = parse_indices(indices_text) if options.criterion == "index" else None
    except Exception as e:
        _show_error(e)
        st.stop()

    an = model.analysis
    frozen_n = len(an.frozen)
    st.caption(
        f"Model: **{model.label}** · {len(an.groups)} prunable groups · "
        f"{sum(int(g.channels) for g in an.groups):,} channels · {frozen_n} frozen layer set(s)"
        + (f" · evaluation data: {eval_data.label} ({eval_data.n} samples)" if eval_data else "")
    )
    ratios, pinned = overrides(model)
    plan_args = {"ratio": ratio, "ratios": ratios, "pinned": pinned,
                 "calibration": calibration_for(eval_data), "indices": indices}
    signature = json.dumps({"model": model.key, "options": options.to_dict(), "ratio": ratio,
                            "ratios": ratios, "pinned": sorted(pinned), "indices": indices,
                            "eval": eval_data.label if eval_data else None}, sort_keys=True)
    plan = None
    if options.criterion == "index" and not indices:
        st.info("Criterion **index**: list the filter indices to remove under “Channel indices "
                "to remove” in the sidebar (one line per layer, e.g. `block1.conv1: 0, 3`). "
                "Layer names are in the Plan tab.", icon="✍️")
    elif options.criterion == "nuclear_norm" and eval_data is None:
        st.error("Criterion nuclear_norm needs calibration data: upload an .npz with an "
                 "array 'x' under “Calibration / evaluation data” in the sidebar.", icon="⚠️")
    else:
        try:
            plan = make_plan(model, options, **plan_args)
        except Exception as e:
            _show_error(e, "Cannot plan with these options")

    tabs = st.tabs(TABS, key="main_tab", on_change="rerun")
    scores_tab, plan_tab, prune_tab, graphs_tab = tabs
    # Lazy tabs: only the open tab's content runs (the Graphs tab exports ONNX on first use).
    if scores_tab.open is not False and plan is not None:
        with scores_tab:
            _guarded(tab_scores, model, plan, options, plan_args)
    if plan_tab.open is not False:
        with plan_tab:
            _guarded(tab_plan, model, plan)
    if prune_tab.open is not False and plan is not None:
        with prune_tab:
            _guarded(tab_prune, model, plan, signature, ratio, eval_data)
    if graphs_tab.open is not False:
        with graphs_tab:
            _guarded(tab_graphs, model)


def _guarded(render, *args) -> None:
    """Run one tab; an unexpected error becomes a one-line message, the rest stays usable."""
    try:
        render(*args)
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        _show_error(e, "Something went wrong in this view")

def _run_page() -> None:
    """The page, with any unexpected error shown as one line instead of a traceback."""
    try:
        main()
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        _show_error(e, "Something went wrong")


_run_page()
