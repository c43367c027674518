"""The Recover step of the Prune & compare tab: choose methods and a budget, recover the
pruned model from calibration data, see original / pruned / recovered side by side, and
download the recovered model."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

import engine
from dashboard import sources, state
from dashboard.common import session_files, short, show_error
from dashboard.downloads import file_download, onnx_download
from dashboard.long_run import LongRun, wait_for_stopped_run
from dashboard.prune_run import PruneRun
from dashboard.recover_run import (
    DEFAULT_METHODS,
    METHOD_CHOICES,
    RecoverRun,
    comparison_rows,
    run_recover,
)
from engine.demo import BUILTIN_NAMES, builtin_data_path
from engine.io.data import DataSet

RECOVER_KEY = "_ps_recover"
METHOD_HELP = (
    "bias: fold the removed channels' mean contribution into the next layer's bias · "
    "lsq: least-squares refit of each layer to the original's outputs · "
    "bn: recompute BatchNorm statistics · norm: refit LayerNorm/RMSNorm/GroupNorm affines · "
    "distill: train against the original for the budget"
)


def _calibration(model: state.LoadedModel) -> Any:
    """A built-in model's own calibration set (its training split), or an uploaded file."""
    builtin = builtin_name(model)
    if builtin is not None:
        st.caption(f"Calibration data: {builtin}'s own training split "
                   f"(`{builtin_data_path(builtin, 'calibration').name}`); the comparison "
                   "below uses its held-out evaluation set.")
        return builtin
    up = st.file_uploader("Calibration data for recovery (.npz with x, optional y; or text)",
                          type=sources.upload_types(), key="upload_calib",
                          help="Never the evaluation data: quality is measured on that. Text "
                               "(.txt, .jsonl, .json, .csv, .tsv, .parquet) is tokenized with "
                               "the model's tokenizer.")
    if up is None:
        return None
    try:
        return sources.load_upload(up.getvalue(), up.name, flag="calibration data",
                                   model=model.captured)
    except Exception as e:
        show_error(e, "Calibration data")
        return None


def builtin_name(model: state.LoadedModel) -> str | None:
    """"demo" / "demo-lm" for the built-in models (the engine knows their data), else None."""
    name = model.key.split(":", 1)[0]
    return name if name in BUILTIN_NAMES else None


def recover_blocker(methods: list[str], calibration: Any) -> str | None:
    """Why the Recover button is disabled (None when it is not): said next to it."""
    if not methods:
        return "Choose at least one method."
    if calibration is None:
        return "Upload calibration data above (an .npz with x, optional labels y)."
    return None


def render(model: state.LoadedModel, run: PruneRun,
           eval_data: DataSet | None) -> None:
    st.subheader("Recover")
    if run.result is None:
        st.info("Press **Prune** again to recover this model.")
        return
    st.markdown("Get accuracy back from a little calibration data. The data-light methods "
                "need one pass and no training; `distill` trains for the budget.")
    c = st.columns([3, 1])
    methods = c[0].multiselect("Methods", METHOD_CHOICES, default=list(DEFAULT_METHODS),
                               key="recover_methods", help=METHOD_HELP)
    budget = 30
    if "distill" in methods:  # the budget is distillation's training time, nothing else's
        budget = c[1].number_input("Budget (s)", min_value=1, max_value=600, value=30, step=5,
                                   key="recover_budget", help="Training time for distill")
    calibration = _calibration(model)
    blocker = recover_blocker(methods, calibration)
    clicked = st.button("Recover", key="recover", icon=":material/healing:",
                        disabled=blocker is not None, help=blocker)
    if blocker is not None:
        st.caption(f"Recover is disabled: {blocker}")
    if clicked:
        files = session_files()
        out_dir = files.subdir(f"recovered-{short(model.key)}-{short(run.signature)}")
        work = LongRun("Recovery", "recover")

        def keep(done: RecoverRun) -> None:
            model.cache[RECOVER_KEY] = done

        try:
            work.run(lambda: run_recover(engine, run.result, _original(model), calibration,
                                         methods, float(budget), out_dir, eval_data,
                                         run.signature,
                                         lambda m, f: work.update(f, 1.0, message=m), work.stop,
                                         cache=model.cache),
                     keep)
        except Exception as e:
            show_error(e, "Recovery failed")
    wait_for_stopped_run("recover")
    done: RecoverRun | None = model.cache.get(RECOVER_KEY)
    if done is None or done.prune_signature != run.signature:
        return
    show_recovery(done)


def _original(model: state.LoadedModel):
    module = model.cache.get("original_module")
    if module is None:
        module = model.cache["original_module"] = model.captured.program.module()
    return module


def show_recovery(done: RecoverRun) -> None:
    info = done.recovery
    st.markdown(f"Applied **{', '.join(info['methods']) or 'nothing'}** in "
                f"{info['seconds']:.1f} s" + (f"; compared on {done.scored_on}."
                                               if done.scored_on else "."))
    if info.get("stopped"):
        st.caption("Stopped early: what was done before the stop is kept"
                   + (f" (distillation ran {info['distill']['steps']} steps)."
                      if info.get("distill") else "."))
    st.dataframe(pd.DataFrame(comparison_rows(done)), hide_index=True, width="stretch")
    for method, reason in info["skipped"].items():
        st.caption(f"skipped {method}: {reason}")
    st.markdown("**Downloads** (the recovered model)")
    c = st.columns(3)
    for col, name in zip(c, ("model.pt2", "model.onnx", "report.json")):
        label, file_name, key = f"Download recovered {name}", f"recovered_{name}", \
            f"dl_recovered_{name}"
        if name == "model.onnx":
            onnx_download(col, done.files, done.result, label, file_name, key)
            continue
        path = done.files.get(name)
        if path is None or not path.is_file():
            col.caption(f"{name}: not written")
            continue
        file_download(col, path, label, file_name, key)
