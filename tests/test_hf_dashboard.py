"""The dashboard on a Hugging Face folder: the local-path source takes the folder, and a
pruned transformers model offers hf/ as a zip that transformers loads."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from dashboard.tabs.prune import zip_folder
from tests.helpers import app_ok

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def _vit_folder(path: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, image_size=32, patch_size=8)
    tf.ViTForImageClassification(config).eval().save_pretrained(path)
    return path


def test_local_folder_is_pruned_and_hf_offered_as_zip(tmp_path):
    import transformers as tf

    folder = _vit_folder(tmp_path / "vit")
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.radio(key="source").set_value("Local file path").run()
    at.text_input(key="local_path").set_value(str(folder)).run()
    app_ok(at)
    model = at.session_state["_ps_models"][at.session_state["_ps_active_model"]]
    assert model.captured.hf is not None and model.captured.hf.model_class == \
        "ViTForImageClassification"
    at.selectbox(key="opt_reshape_channel_axis").set_value(-2).run()  # whole heads
    at.session_state["main_tab"] = "Prune & compare"
    at.run()
    at.button(key="prune").click().run()
    app_ok(at)
    run = at.session_state["_ps_result"]
    assert "Download hf/ (zip)" in [b.label for b in at.download_button]
    archive = zipfile.ZipFile(io.BytesIO(zip_folder(run.files["hf"])))
    assert {"hf/config.json", "hf/model.safetensors"} <= set(archive.namelist())
    archive.extractall(tmp_path / "unzipped")
    loaded = tf.AutoModelForImageClassification.from_pretrained(
        tmp_path / "unzipped" / "hf", local_files_only=True).eval()
    pt2 = torch.export.load(str(run.files["model.pt2"]))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = pt2.module()(x)[0]
        got = loaded(pixel_values=x).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert loaded.config.num_attention_heads < 4 or loaded.config.intermediate_size < 128


def test_local_folder_without_config_is_one_line(tmp_path):
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.radio(key="source").set_value("Local file path").run()
    at.text_input(key="local_path").set_value(str(folder)).run()
    assert not at.exception
    assert len(at.error) == 1 and "config.json" in at.error[0].value
    assert "\n" not in at.error[0].value
