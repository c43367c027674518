"""The Recover step of the Prune & compare tab, driven by streamlit.testing AppTest on the
real demo model and engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import torch
from streamlit.testing.v1 import AppTest

from engine.demo import load_demo_eval
from tests.helpers import app_ok

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def _table(at: AppTest, column: str):
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with column {column!r}")


def test_recover_step_compares_original_pruned_recovered_and_offers_downloads():
    at = AppTest.from_file(APP, default_timeout=600).run()
    app_ok(at)
    at.session_state["main_tab"] = "Prune & compare"
    at.run()
    at.slider(key="opt_ratio").set_value(0.5).run()
    at.button(key="prune").click().run()
    app_ok(at)
    assert at.multiselect(key="recover_methods").value == ["bias", "lsq", "bn", "norm"]
    at.multiselect(key="recover_methods").set_value(["lsq"]).run()
    at.button(key="recover").click().run()
    app_ok(at)
    model = at.session_state["_ps_models"][at.session_state["_ps_active_model"]]
    done = model.cache["_ps_recover"]
    assert done.recovery["methods"] == ["lsq"]
    table = _table(at, "Recovered").set_index("Measure")
    accuracy = {k: float(v.rstrip("%")) / 100 for k, v in table.loc["Accuracy"].items()}
    assert accuracy["Recovered"] >= 0.9 > accuracy["Pruned"]
    # the recovered download is the recovered model: recompute its accuracy independently
    labels = {b.label for b in at.download_button}
    assert {"Download recovered model.pt2", "Download recovered report.json"} <= labels
    x, y = load_demo_eval()
    with torch.no_grad():
        logits = torch.export.load(str(done.files["model.pt2"])).module()(torch.from_numpy(x))
    assert abs(float(np.mean(logits.argmax(1).numpy() == y)) - accuracy["Recovered"]) < 5e-5
    # the recovered model.onnx, made on request, is the recovered model too
    at.button(key="make_dl_recovered_model.onnx").click().run()
    app_ok(at)
    assert "Download recovered model.onnx" in {b.label for b in at.download_button}
    session = onnxruntime.InferenceSession(str(done.files["model.onnx"]),
                                           providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(onnx_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
    assert done.files["model.onnx"].parent == done.files["model.pt2"].parent
