"""The Graphs tab: the original and the pruned graph in a local Netron."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import engine.io.export
from dashboard import netron_server, state
from dashboard.common import RESULT_KEY, session_files, short, show_error
from dashboard.page import PageState
from dashboard.prune_run import PruneRun, onnx_file, saved_onnx


def render(page: PageState) -> None:
    model = page.model
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
            show_error(e, "Cannot show the original graph")
    with right:
        st.markdown("**Pruned**")
        run: PruneRun | None = st.session_state.get(RESULT_KEY)
        if run is None or run.model_key != model.key:
            st.info("Prune the model (Prune & compare tab) to see its graph here.")
            return
        try:
            path = _pruned_graph_file(run)
            server = netron_server.serve(path)
            st.iframe(server.url, height=720)
            st.caption(f"{path.name} · {server.url}")
        except Exception as e:
            show_error(e, "Cannot show the pruned graph")


def _original_graph_file(model: state.LoadedModel) -> Path:
    """ONNX of the original (Netron reads it best), exported once per model."""
    cached = model.cache.get("original_onnx")
    if cached is not None and Path(cached).is_file():
        return Path(cached)
    files = session_files()
    out = files.subdir(f"original-{short(model.key)}") / "original.onnx"
    with st.spinner("Exporting the original model to ONNX for Netron…"):
        engine.io.export.export_onnx(model.captured.program, out)
    model.cache["original_onnx"] = out
    return out


def _pruned_graph_file(run: PruneRun) -> Path:
    """The pruned model's ONNX, converted on the first visit after a Prune."""
    path = saved_onnx(run.files)
    if path is not None:
        return path
    with st.spinner("Converting the pruned model to ONNX for Netron…"):
        return onnx_file(engine, run.files, run.result)
