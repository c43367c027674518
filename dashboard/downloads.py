"""The download buttons of the Prune and Recover steps. model.onnx is converted on demand:
its column holds a "Make model.onnx" button until the file exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

import engine
from dashboard.common import show_error
from dashboard.prune_run import onnx_file, saved_onnx

MAKE_ONNX_HELP = ("Converts the model to ONNX and checks it in ONNX Runtime against the torch "
                  "model (seconds on the demos, minutes on a large model); report.json then "
                  "holds the check. The Graphs tab converts it too.")


def file_download(column: Any, path: Path, label: str, file_name: str, key: str,
                  mime: str = "application/octet-stream") -> None:
    # the bytes are read on click: report.json then includes a later ONNX check
    column.download_button(label, data=lambda p=path: p.read_bytes(), file_name=file_name,
                           mime=mime, key=key, icon=":material/download:", width="stretch",
                           on_click="ignore")


def onnx_download(column: Any, files: dict[str, Path], result: Any, label: str,
                  file_name: str, key: str) -> None:
    """model.onnx's download; until it exists, a button that makes it (and gives way to the
    download in the same place)."""
    path = saved_onnx(files)
    slot = column.empty()
    if path is None:
        if not slot.button("Make model.onnx", key=f"make_{key}", icon=":material/build:",
                           width="stretch", help=MAKE_ONNX_HELP):
            return
        with column:
            try:
                with st.spinner("Converting to ONNX and checking it in ONNX Runtime…"):
                    path = onnx_file(engine, files, result)
            except Exception as e:
                show_error(e, "model.onnx not written")
                return
    file_download(slot, path, label, file_name, key)
