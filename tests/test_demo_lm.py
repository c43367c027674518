"""The second demo, `demo-lm`: a byte-level Llama, its data sets, and pruning it by name."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.demo import (
    ASSETS_DIR,
    DEMO_LM_CALIB_PATH,
    DEMO_LM_EVAL_PATH,
    DEMO_LM_HF_DIR,
    DEMO_LM_META_PATH,
    DEMO_LM_PATH,
)
from tests.helpers import cli

VOCAB = 256


def _meta() -> dict:
    return json.loads(DEMO_LM_META_PATH.read_text())


def _windows(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"x"}
        return data["x"]


def _perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Next-token perplexity written out with numpy (log-softmax by hand)."""
    logits = logits[:, :-1].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = tokens[:, 1:]
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return float(np.exp(-picked.mean()))


@pytest.fixture(scope="module")
def program_module() -> torch.nn.Module:
    """demo_lm.pt2 loaded here with torch.export (not through the engine), once for the file;
    the tests only run it."""
    return torch.export.load(str(DEMO_LM_PATH)).module()


@pytest.fixture(scope="module")
def held_out_logits(program_module) -> tuple[np.ndarray, np.ndarray]:
    x = _windows(DEMO_LM_EVAL_PATH)
    with torch.no_grad():
        logits = program_module(torch.from_numpy(x))
    return x, logits.numpy()


def test_assets_are_small_and_shaped_as_documented() -> None:
    files = [DEMO_LM_PATH, DEMO_LM_CALIB_PATH, DEMO_LM_EVAL_PATH,
             *sorted(DEMO_LM_HF_DIR.iterdir())]
    assert sum(p.stat().st_size for p in files) < 8_000_000
    assert {"config.json", "model.safetensors"} <= {p.name for p in DEMO_LM_HF_DIR.iterdir()}
    for path in (DEMO_LM_CALIB_PATH, DEMO_LM_EVAL_PATH):
        x = _windows(path)
        assert x.dtype == np.int64 and x.ndim == 2 and x.shape[1] == _meta()["seq_len"] == 64
        assert 0 <= x.min() and x.max() < VOCAB


def test_held_out_perplexity_matches_the_recorded_one(held_out_logits) -> None:
    x, logits = held_out_logits
    assert logits.shape == (*x.shape, VOCAB)
    ppl = _perplexity(logits, x)
    assert ppl == pytest.approx(_meta()["perplexity"], rel=1e-3)
    measured = engine.evaluate("demo-lm", "demo-lm")
    assert measured["metric"] == "perplexity"  # token ids and next-token logits: the default
    assert measured["value"] == pytest.approx(ppl, rel=1e-5)
    assert measured["tokens"] == x.shape[0] * (x.shape[1] - 1)


def test_model_is_far_better_than_uniform_and_unigram(held_out_logits) -> None:
    x, logits = held_out_logits
    ppl = _perplexity(logits, x)
    calib = _windows(DEMO_LM_CALIB_PATH)
    # A unigram byte model fitted on the calibration text (add-one smoothing), on held-out text.
    counts = np.bincount(calib.ravel(), minlength=VOCAB) + 1.0
    log_p = np.log(counts / counts.sum())
    unigram = math.exp(-log_p[x[:, 1:]].mean())
    assert ppl < VOCAB / 25  # uniform guessing gives 256
    assert ppl < 0.5 * unigram


def test_calibration_and_evaluation_sets_never_share_a_window() -> None:
    calib, held = _windows(DEMO_LM_CALIB_PATH), _windows(DEMO_LM_EVAL_PATH)
    assert not {r.tobytes() for r in calib} & {r.tobytes() for r in held}
    meta = _meta()
    assert not set(meta["train_documents"]) & set(meta["held_out_documents"])
    assert len(calib) == meta["n_calib"] and len(held) == meta["n_eval"]


def _training_script():
    spec = importlib.util.spec_from_file_location("train_demo_lm",
                                                  ASSETS_DIR / "train_demo_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_preparation_is_deterministic_and_split_by_document() -> None:
    script = _training_script()
    first, second = script.prepare_data(), script.prepare_data()
    np.testing.assert_array_equal(first["calib"], second["calib"])
    np.testing.assert_array_equal(first["eval"], second["eval"])
    # The committed sets are exactly what the script prepares from torch's own sources.
    np.testing.assert_array_equal(first["calib"], _windows(DEMO_LM_CALIB_PATH))
    np.testing.assert_array_equal(first["eval"], _windows(DEMO_LM_EVAL_PATH))
    assert first["held_docs"] == _meta()["held_out_documents"]
    # Every evaluation window is text of a held-out file; training text excludes those files.
    folder = Path(torch.__file__).resolve().parent / "nn" / "modules"
    held_text = b"\n\n".join((folder / Path(n).name).read_bytes() for n in first["held_docs"])
    assert all(bytes(w.astype(np.uint8)) in held_text for w in first["eval"])
    train_sizes = [(folder / Path(n).name).stat().st_size for n in first["train_docs"]]
    assert len(first["train"]) == sum(train_sizes) + 2 * (len(train_sizes) - 1)
    assert not set(first["train_docs"]) & set(first["held_docs"])


def test_hugging_face_folder_is_the_same_model(held_out_logits) -> None:
    from transformers import LlamaForCausalLM

    x, logits = held_out_logits
    model = LlamaForCausalLM.from_pretrained(DEMO_LM_HF_DIR).eval()
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == VOCAB and config.hidden_act == "silu"
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(x[:16]), use_cache=False).logits
    np.testing.assert_allclose(hf.numpy(), logits[:16], rtol=1e-4, atol=1e-4)


def test_program_batch_is_dynamic_and_length_fixed(program_module) -> None:
    module = program_module
    x = torch.from_numpy(_windows(DEMO_LM_EVAL_PATH))
    with torch.no_grad():
        one, many = module(x[:1]), module(x[:5])
    assert one.shape == (1, 64, VOCAB) and many.shape == (5, 64, VOCAB)
    torch.testing.assert_close(one[0], many[0], rtol=1e-4, atol=1e-4)


def test_prune_demo_lm_by_name_reports_perplexity(capfd, tmp_path: Path) -> None:
    rc, out, err = cli(capfd, "prune", "demo-lm", "--ratio", "0.2", "--eval-data", "demo-lm",
                       "--calibration", "demo-lm", "--out", tmp_path, "--no-onnx")
    assert rc == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    quality = report["quality"]
    assert quality["metric"] == "perplexity" and quality["samples"] == _meta()["n_eval"]
    assert quality["original"] == pytest.approx(_meta()["perplexity"], rel=1e-3)
    assert math.isfinite(quality["pruned"]) and quality["pruned"] > 1.0
    assert report["after"]["params"] < report["before"]["params"]
    assert "quality: perplexity original" in out
    # the written model measures the same
    written = engine.evaluate(tmp_path / "model.pt2", "demo-lm")
    assert written["value"] == pytest.approx(quality["pruned"], rel=1e-5)


def test_dashboard_offers_demo_lm_and_shows_perplexity() -> None:
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
    at = AppTest.from_file(app, default_timeout=300).run()
    at.radio(key="source").set_value("Demo language model (demo-lm)").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    model = at.session_state["_ps_models"][at.session_state["_ps_active_model"]]
    assert model.captured.source == "demo-lm"
    at.slider(key="opt_ratio").set_value(0.2).run()
    at.session_state["main_tab"] = "Prune & compare"
    at.run()
    at.button(key="prune").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    fidelity = at.session_state["_ps_result"].fidelity
    assert fidelity["metric"] == "perplexity"
    assert fidelity["perplexity_before"] == pytest.approx(_meta()["perplexity"], rel=1e-3)
    rows = {r["Measure"]: r["Value"] for df in at.dataframe if "Measure" in df.value.columns
            for r in df.value.to_dict("records")}
    after = rows["Perplexity after pruning (before recovery)"]
    assert after == f"{fidelity['perplexity_after']:.4f}"
