"""The Prune & compare tab: prune, before/after numbers, fidelity and downloads."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

import engine
from dashboard.common import RESULT_KEY, session_files, short, show_error
from dashboard.page import PageState
from dashboard.prune_run import PruneRun, comparison_rows, run_prune
from dashboard.tabs import recover


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
        "`model.pt2`, `model.onnx` and `report.json`"
        + (" (and `hf/` for a transformers model whose pruned config stays standard)"
           if model.captured.hf is not None else "")
        + ", and compares it with the original"
        + (f" on **{eval_data.source}** ({len(eval_data)} samples)." if eval_data else ".")
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
                status.update(label="Pruned and saved", state="complete", expanded=False)
    run: PruneRun | None = st.session_state.get(RESULT_KEY)
    if run is None or run.model_key != model.key:
        st.info("Press **Prune** to build the pruned model and see before/after numbers.")
        return
    if run.signature != signature:
        st.warning("These results are for earlier options "
                   f"({_options_line(run.options, run.ratio)}). Press Prune to update.")
    show_result(run)
    if run.signature == signature:
        recover.render(model, run, eval_data)


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
    elif "perplexity_after" in fid:
        c[3].metric("Perplexity after", f"{fid['perplexity_after']:.3f}",
                    f"{fid['perplexity_after'] - fid['perplexity_before']:+.3f} "
                    f"(before {fid['perplexity_before']:.3f})", delta_color="inverse",
                    help="exp of the mean next-token negative log-likelihood; lower is better")
    st.dataframe(pd.DataFrame(comparison_rows(run)), hide_index=True, width="stretch")
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
            rows.append({"Measure": "Accuracy after", "Value": f"{fid['accuracy_after']:.2%}"})
        if "perplexity_before" in fid:
            rows.append({"Measure": "Perplexity before",
                         "Value": f"{fid['perplexity_before']:.4f}"})
            rows.append({"Measure": "Perplexity after",
                         "Value": f"{fid['perplexity_after']:.4f}"})
        st.markdown(f"**Fidelity** on {run.fidelity_on}:")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    for note in run.notes:
        st.caption(note)
    report = run.result.report if run.result is not None else {}
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
        path = file_named(run, name)
        if path is None:
            col.caption(f"{name}: not written")
            continue
        col.download_button(
            f"Download {name}", data=lambda p=path: p.read_bytes(), file_name=name, mime=mime,
            key=f"dl_{name.replace('.', '_')}", icon=":material/download:", width="stretch",
            on_click="ignore",
        )
    if has_hf:
        c[3].download_button(
            "Download hf/ (zip)", data=lambda p=hf_dir: zip_folder(p), file_name="hf.zip",
            mime="application/zip", key="dl_hf_zip", icon=":material/download:", width="stretch",
            on_click="ignore", help="The pruned model as a folder transformers loads with "
                                    "from_pretrained (no custom code)",
        )


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

