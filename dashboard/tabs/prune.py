"""The Prune & compare tab: prune, before/after numbers, fidelity and downloads."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

import engine
from dashboard import state
from dashboard.charts_results import widths_figure
from dashboard.common import RESULT_KEY, session_files, short, show_error
from dashboard.downloads import file_download, onnx_download
from dashboard.frames import history_frame, history_view, widths_frame
from dashboard.guide import glossary_popover
from dashboard.page import PageState
from dashboard.prune_run import (
    LATENCY_RUNS,
    PruneRun,
    comparison_rows,
    history_row,
    latency_rows,
    run_prune,
)
from dashboard.tabs import recover
from engine.options import PruningOptions


def render(page: PageState) -> None:
    model, plan, signature, ratio = page.model, page.plan, page.signature, page.ratio
    eval_data, plan_args, structures = page.eval_data, page.plan_args, page.structures
    total = sum(int(g.scores.size) for g in plan.groups)
    pruned = sum(int(g.pruned.size) for g in plan.groups)
    st.markdown(
        f"The current plan removes **{pruned:,} of {total:,}** prunable channels "
        f"({pruned / max(total, 1):.1%})"
        + (" with the same count in every repeated layer (uniform)"
           if (plan_args or {}).get("uniform") else "")
        + ". Prune builds the smaller model, saves it as "
        "`model.pt2` and `report.json`"
        + (" (and `hf/` for a transformers model whose pruned config stays standard)"
           if model.captured.hf is not None else "")
        + ", and compares it with the original"
        + (f" on **{eval_data.source}** ({len(eval_data)} samples)" if eval_data else "")
        + "; `model.onnx` is converted when you ask for it (Downloads, Graphs tab)."
    )
    whole = structure_line(structures or {})
    if whole:
        args = plan_args or {}
        per_group = (" Own ratios and pins from the Plan tab do not apply then (they name "
                     "the full model's groups): the global ratio does."
                     if args.get("ratios") or args.get("pinned") else "")
        st.info(f"Also removes {whole} (chosen in the Blocks tab) before the channels; the "
                "channel plan is then made again on the smaller model, so its counts can "
                "differ a little from the Plan tab's." + per_group, icon=":material/view_module:")
    ratio_note = ratio_explanation(ratio, pruned / max(total, 1), plan,
                                   bool((plan_args or {}).get("ratios")),
                                   bool((plan_args or {}).get("pinned")),
                                   has_blocks(model))
    if ratio_note:
        st.caption(ratio_note)
    if st.button("Prune", type="primary", key="prune", icon=":material/content_cut:"):
        files = session_files()
        out_dir = files.subdir(f"pruned-{short(model.key)}-{short(signature)}")
        with st.status("Pruning…", expanded=True) as status:
            try:
                run = run_prune(engine, model, plan, out_dir, eval_data, signature, ratio,
                                progress=st.write, plan_args=plan_args,
                                structures=structures)
            except Exception as e:
                status.update(label="Pruning failed", state="error")
                show_error(e, "Pruning failed")
            else:
                st.session_state[RESULT_KEY] = run
                remember(run)
                status.update(label="Pruned and saved", state="complete", expanded=False)
    run: PruneRun | None = st.session_state.get(RESULT_KEY)
    if run is None or run.model_key != model.key:
        st.info("Press **Prune** to build the pruned model and see before/after numbers.")
        return
    if run.signature != signature:
        changed = signature_changes(run.signature, signature)
        st.warning("These results are for earlier settings: "
                   + ("; ".join(changed) if changed else "the settings differ")
                   + ". Press Prune to update.")
    show_result(run)
    if run.signature == signature:
        recover.render(model, run, eval_data)
    show_history()


def structure_line(structures: dict[str, Any]) -> str:
    """"2 whole residual blocks and 25% of the experts", or "" when none are chosen."""
    parts = []
    if structures.get("remove_blocks"):
        n = int(structures["remove_blocks"])
        parts.append(f"**{n} whole residual block{'s' if n != 1 else ''}**")
    if structures.get("expert_ratio"):
        parts.append(f"**{float(structures['expert_ratio']):.0%} of the experts** of every "
                     "router")
    return " and ".join(parts)


SIGNATURE_WORDS = {"ratio": "pruning ratio", "ratios": "own ratios (Plan tab)",
                   "pinned": "pinned groups", "indices": "channel indices",
                   "uniform": "uniform", "eval": "evaluation data",
                   "remove_blocks": "blocks to remove", "expert_ratio": "share of experts",
                   "model": "model"}


def signature_changes(old: str, new: str) -> list[str]:
    """What differs between two page signatures (JSON of the settings), in words:
    "uniform: off → on", "layer_norm: standard_score → tss_norm"."""
    try:
        a, b = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        return []
    flat_a = {**{k: v for k, v in a.items() if k != "options"}, **a.get("options", {})}
    flat_b = {**{k: v for k, v in b.items() if k != "options"}, **b.get("options", {})}
    out = []
    for key in dict.fromkeys([*flat_a, *flat_b]):
        va, vb = flat_a.get(key), flat_b.get(key)
        if va != vb:
            out.append(f"{SIGNATURE_WORDS.get(key, key)}: {_word(va)} → {_word(vb)}")
    return out


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == [] or value == {}:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_word(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_word(v) for v in value)
    return str(value)


def ratio_explanation(ratio: float, share: float, plan: Any, own_ratios: bool,
                      pinned: bool, has_blocks: bool) -> str:
    """Why the share of channels removed differs from the ratio, or "" when it does not."""
    if abs(share - ratio) < 0.005:
        return ""
    reasons = []
    if own_ratios:
        reasons.append("groups with their own ratio (Plan tab) use that instead")
    if pinned:
        reasons.append("pinned groups keep every channel")
    options = plan.options
    if options.step_op != "none" and options.step_size > 1:
        reasons.append(f"the step rule rounds each group's kept count to a multiple of "
                       f"{options.step_size} ({options.step_op})")
    if has_blocks:
        reasons.append("grouped layers and attention heads keep equal blocks (group policy "
                       f"{options.group_policy})")
    reasons.append("frozen channels and each group's last channels always stay")
    return (f"Ratio {ratio:.2f} removes {share:.1%} of the prunable channels, not "
            f"{ratio:.0%}: " + "; ".join(reasons) + ".")


def has_blocks(model: state.LoadedModel) -> bool:
    """Whether some group must keep equal blocks (grouped convolutions, attention heads)."""
    return any(getattr(g, "block_index", None) is not None for g in model.analysis.groups)


HISTORY_KEY = "_ps_history"
RUNS_TABLE_KEY = "ps_runs"  # the container of the runs table (the browser test finds it)


def remember(run: PruneRun) -> None:
    """Add a finished run to this session's history."""
    history: list = st.session_state.setdefault(HISTORY_KEY, [])
    history.append(history_row(run, len(history) + 1))


def show_history() -> None:
    """This session's Prune runs side by side, downloadable as CSV."""
    history = st.session_state.get(HISTORY_KEY) or []
    if not history:
        return
    st.subheader("This session's runs")
    table = history_frame(history)
    st.caption("Every Prune of this session, newest last: the options that differ from the "
               "defaults, the shares of parameters and FLOPs kept, the metric and the "
               "latency side by side. The CSV holds every option and number. Gone when the "
               "browser tab "
               "closes: download it.")
    with st.container(key=RUNS_TABLE_KEY):
        st.dataframe(history_view(table, PruningOptions().to_dict()), hide_index=True,
                     width="stretch")
    st.download_button("Download the runs (CSV)", table.to_csv(index=False),
                       file_name="prunescope-runs.csv", mime="text/csv", key="dl_history",
                       on_click="ignore")


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
        c[3].metric("Accuracy after pruning", f"{fid['accuracy_after']:.1%}",
                    f"{points(fid['accuracy_after'] - fid['accuracy_before'])} "
                    f"(before {fid['accuracy_before']:.1%})",
                    help="Before any recovery. The change is in percentage points: the "
                    "difference of the two accuracies, not a share of the accuracy before.")
    elif "perplexity_after" in fid:
        c[3].metric("Perplexity after pruning", f"{fid['perplexity_after']:.3f}",
                    f"{fid['perplexity_after'] - fid['perplexity_before']:+.3f} "
                    f"(before {fid['perplexity_before']:.3f})", delta_color="inverse",
                    help="Before any recovery. exp of the mean next-token negative "
                    "log-likelihood; lower is better")
    drop = before_recovery_note(fid)
    if drop:
        st.warning(drop, icon=":material/trending_down:")
    st.dataframe(pd.DataFrame(comparison_rows(run)), hide_index=True, width="stretch")
    latency_note(run.before.get("latency_s"), run.after.get("latency_s"))
    report = run.result.report if run.result is not None else {}
    engine_latency = latency_rows(report)
    if engine_latency:
        st.markdown("**Latency** measured by the engine (report.json: \"latency\"):")
        st.dataframe(pd.DataFrame(engine_latency), hide_index=True, width="stretch")
    show_verification(report)
    if report.get("groups"):
        st.markdown("**Channels per group, before and after** (network order):")
        st.plotly_chart(widths_figure(widths_frame(report)), key="chart_widths",
                        width="stretch")
        glossary_popover("widths", ("group", "step rule", "group policy", "frozen"))
    if fid:
        rows = [{"Measure": "Samples", "Value": f"{fid.get('samples', 0):,}"}]
        if "top1_agreement" in fid:
            rows.append({"Measure": "Top-1 agreement with the original",
                         "Value": f"{fid['top1_agreement']:.2%}"})
        if "relative_error" in fid:
            rows.append({"Measure": "Relative output error (‖pruned − original‖ / ‖original‖)",
                         "Value": f"{fid['relative_error']:.4g}"})
        if "accuracy_before" in fid:
            rows.append({"Measure": "Accuracy before", "Value": f"{fid['accuracy_before']:.2%}"})
            rows.append({"Measure": "Accuracy after pruning (before recovery)",
                         "Value": f"{fid['accuracy_after']:.2%}"})
        if "perplexity_before" in fid:
            rows.append({"Measure": "Perplexity before",
                         "Value": f"{fid['perplexity_before']:.4f}"})
            rows.append({"Measure": "Perplexity after pruning (before recovery)",
                         "Value": f"{fid['perplexity_after']:.4f}"})
        st.markdown(f"**Fidelity** on {run.fidelity_on}:")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    for note in run.notes:
        st.caption(note)
    gone = [b["name"] for b in report.get("blocks", []) if b.get("removed")]
    if gone:
        st.caption(f"Removed residual blocks: {', '.join(gone)} (report.json: \"blocks\", "
                   "\"depth\").")
    for router in (report.get("experts") or {}).get("routers", []):
        st.caption(f"Router {router['layer']}: removed experts {router['removed']} of "
                   f"{router['experts']} (report.json: \"experts\").")
    st.subheader("Downloads")
    hf_dir = run.files.get("hf")
    has_hf = hf_dir is not None and hf_dir.is_dir()
    c = st.columns(4 if has_hf else 3)
    mimes = {"model.pt2": "application/octet-stream", "model.onnx": "application/octet-stream",
             "report.json": "application/json"}
    for col, (name, mime) in zip(c, mimes.items()):
        key = f"dl_{name.replace('.', '_')}"
        if name == "model.onnx":
            onnx_download(col, run.files, run.result, f"Download {name}", name, key)
            continue
        path = file_named(run, name)
        if path is None:
            col.caption(f"{name}: not written")
            continue
        file_download(col, path, f"Download {name}", name, key, mime)
    if has_hf:
        c[3].download_button(
            "Download hf/ (zip)", data=lambda p=hf_dir: zip_folder(p), file_name="hf.zip",
            mime="application/zip", key="dl_hf_zip", icon=":material/download:", width="stretch",
            on_click="ignore", help="The pruned model as a folder transformers loads with "
                                    "from_pretrained (no custom code)",
        )


BIG_FALL_POINTS = 5.0  # an accuracy fall (points) the page explains and points past
BIG_RISE = 1.10  # a perplexity rise (factor) the page explains


def before_recovery_note(fid: dict[str, Any]) -> str:
    """What a large fall of the metric right after Prune means and what to do, or "".

    At the default ratio 0.50 the demo falls from 99.3% to 25.3% before recovery: read
    alone, that number looks like a broken tool. It is the state before recovery; Recover,
    further down the tab, is the next step (or a smaller ratio)."""
    if "accuracy_after" in fid and "accuracy_before" in fid:
        before, after = fid["accuracy_before"], fid["accuracy_after"]
        if (before - after) * 100 < BIG_FALL_POINTS:
            return ""
        what = (f"accuracy fell from {before:.1%} to {after:.1%} "
                f"({points(after - before)})")
    elif "perplexity_after" in fid and "perplexity_before" in fid:
        before, after = fid["perplexity_before"], fid["perplexity_after"]
        if after < before * BIG_RISE:
            return ""
        what = f"perplexity rose from {before:.3f} to {after:.3f} ({after / before:.2f}×)"
    else:
        return ""
    return (f"Right after pruning, before any recovery, {what}. Removing channels without "
            "retraining does that; it is not the final number. Next: **Recover**, further "
            "down this tab: its data-light methods refit the remaining layers from a little "
            "calibration data in seconds and often win most of it back. Or take a smaller "
            "pruning ratio: **Compare on accuracy** shows the metric at every ratio.")


def points(change: float) -> str:
    """A difference of two fractions in percentage points: "-54.4 points"."""
    return f"{change * 100:+.1f} points"


def show_verification(report: dict[str, Any]) -> None:
    """report.json's verification, said when the pruned model is not exactly the masked one."""
    check = report.get("verification") or {}
    if not check or check.get("exact", True):
        return
    inexact = check.get("inexact_groups") or []
    st.warning(
        "verification.exact is false: the pruned model's outputs differ from the original "
        "with the same channels zeroed by up to "
        f"{check.get('max_abs_diff_vs_masked', float('nan')):.3g} (relative "
        f"{check.get('relative_diff_vs_masked', float('nan')):.3g})"
        + (f". Expected: {len(inexact)} pruned group(s) pass through an operation where "
           "removing a channel is not the same as zeroing it (e.g. a normalisation over the "
           f"channels): {', '.join(map(str, inexact))}" if inexact else "")
        + ".", icon=":material/warning:")


def zip_folder(folder: Path) -> bytes:
    """`folder` as zip bytes, its files under ``hf/`` (what the user unpacks)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return buffer.getvalue()


def file_named(run: PruneRun, name: str) -> Path | None:
    for key, path in run.files.items():
        if path.name == name or key == name or key == Path(name).stem:
            if path.is_file():
                return path
    return None


def latency_note(before: float | None, after: float | None) -> None:
    """What the CPU latency row measured, and why it can rise (a newcomer read "+80%" on the
    demo as pruning making the model slower)."""
    if not before or not after:
        return
    note = ("CPU latency: the best median of two interleaved rounds of "
            f"{LATENCY_RUNS} calls per model on the example inputs, on this machine as it is "
            "now.")
    if after >= before:
        note += (" It did not fall: on a model this small a call is mostly fixed per-call "
                 "overhead and whatever else the machine is running, not the channels "
                 "removed; the FLOPs and parameters above are the size of the work saved.")
    st.caption(note)
