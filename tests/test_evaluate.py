"""engine.evaluate: every metric against a hand computation, the data format, the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import engine
from engine.demo import DEMO_CALIB_PATH, DEMO_EVAL_PATH
from engine.errors import OptionError
from tests.helpers import cli, one_error_line


class Scaled(nn.Module):
    """Returns its input times a fixed factor: outputs known in advance."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Bigram(nn.Module):
    """A causal 'language model' whose next-token log-probabilities are a fixed table."""

    def __init__(self, probs: np.ndarray) -> None:
        super().__init__()
        self.table = nn.Embedding.from_pretrained(torch.tensor(np.log(probs), dtype=torch.float32))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)  # [N, T, V]


class TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - 2 * b


SCORES = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [2.0, 4.0, 1.0],
                   [0.5, 0.0, 0.2]], dtype=np.float32)
LABELS = np.array([0, 1, 1, 1, 2])  # top-1 of SCORES is 0, 1, 2, 1, 0: 3 of 5 right


def _data(x, y=None, source="test") -> engine.EvalData:
    return engine.EvalData((np.asarray(x),), None if y is None else np.asarray(y), source)


def test_accuracy_is_top1_against_labels() -> None:
    result = engine.evaluate(Scaled(), _data(SCORES, LABELS))
    assert result["metric"] == "accuracy" and result["samples"] == 5
    assert result["value"] == pytest.approx(3 / 5)


def test_accuracy_batches_do_not_change_the_result() -> None:
    one = engine.evaluate(Scaled(), _data(SCORES, LABELS), batch_size=1)
    two = engine.evaluate(Scaled(), _data(SCORES, LABELS), batch_size=2, max_samples=4)
    assert one["value"] == pytest.approx(3 / 5)
    assert two["value"] == pytest.approx(3 / 4) and two["samples"] == 4


def test_perplexity_is_exp_of_mean_next_token_nll() -> None:
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    tokens = np.array([[0, 1, 1, 2], [2, 2, 0, 0]], dtype=np.int64)
    nll = [-math.log(probs[a, b]) for row in tokens for a, b in zip(row[:-1], row[1:])]
    expected = math.exp(sum(nll) / len(nll))
    result = engine.evaluate(Bigram(probs), _data(tokens))  # default for token ids + logits
    assert result["metric"] == "perplexity" and result["tokens"] == 6
    assert result["value"] == pytest.approx(expected, rel=1e-6)


class SwapFirstTwo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, [1, 0, 2]]


def test_agreement_counts_equal_top1_with_the_reference() -> None:
    # top-1 of SCORES: 0, 1, 2, 1, 0; with the first two columns swapped: 1, 0, 2, 0, 1
    result = engine.evaluate(Scaled(), _data(SCORES), reference=SwapFirstTwo())
    assert result["metric"] == "agreement"  # no labels, a reference: the default
    assert result["value"] == pytest.approx(1 / 5)
    arrays = engine.evaluate(Scaled(), _data(SCORES), "agreement",
                             reference=SCORES[:, [1, 0, 2]])
    assert arrays["value"] == pytest.approx(1 / 5)


def test_relative_error_is_the_norm_ratio() -> None:
    result = engine.evaluate(Scaled(1.25), _data(SCORES), "relative_error", reference=Scaled())
    assert result["value"] == pytest.approx(0.25, rel=1e-6)
    x = np.array([[3.0, 4.0]], dtype=np.float32)  # ||(6, 8) - (3, 4)|| / ||(3, 4)|| = 1
    assert engine.evaluate(Scaled(2.0), _data(x), "relative_error",
                           reference=Scaled())["value"] == pytest.approx(1.0)


def test_several_inputs_from_x0_x1(tmp_path: Path) -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    b = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    # a - 2b = [[1, -2], [-2, 1], [2, -2]]: top-1 0, 1, 0
    y = np.array([0, 0, 0])
    np.savez(tmp_path / "two.npz", x0=a, x1=b, y=y)
    data = engine.load_eval_data(tmp_path / "two.npz")
    assert len(data.inputs) == 2
    program = torch.export.export(TwoInputs(), (torch.from_numpy(a), torch.from_numpy(b)))
    assert engine.evaluate(program, data)["value"] == pytest.approx(2 / 3)
    with pytest.raises(OptionError, match="holds 1 input array"):
        engine.evaluate(program, _data(a, y))


def test_static_batch_program_is_fed_padded_chunks() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    y = np.arange(10) % 3
    program = torch.export.export(Scaled(), (torch.from_numpy(x[:4]),))  # batch fixed at 4
    with pytest.raises(Exception):  # noqa: B017 - the program itself refuses other batches
        program.module()(torch.from_numpy(x))
    expected = float(np.mean(x.argmax(1) == y))
    result = engine.evaluate(program, _data(x, y), batch_size=3)
    assert result["value"] == pytest.approx(expected) and result["samples"] == 10


def test_data_is_checked_against_the_model_inputs() -> None:
    program = engine.load_model("demo").program
    x = np.zeros((4, 1, 8, 7), dtype=np.float32)
    with pytest.raises(OptionError, match=r"shape \(4, 1, 8, 7\).*\(N, 1, 8, 8\)"):
        engine.evaluate(program, _data(x))
    with pytest.raises(OptionError, match="floating-point"):
        engine.evaluate(program, _data(np.zeros((4, 1, 8, 8), dtype=np.int64)))


def test_demo_sets_are_disjoint_and_cover_the_digits() -> None:
    calib = engine.load_calibration_data("demo")
    held_out = engine.load_eval_data("demo")
    assert str(DEMO_CALIB_PATH.name) in calib.source and DEMO_EVAL_PATH.name in held_out.source
    rows_c = {r.tobytes() for r in calib.inputs[0]}
    rows_e = {r.tobytes() for r in held_out.inputs[0]}
    digits = load_digits()
    all_x = (digits.data.reshape(-1, 1, 8, 8).astype(np.float32) / 8.0) - 1.0
    # Some digits occur twice in load_digits; no image of the evaluation set is in calibration.
    assert not rows_c & rows_e
    assert len(calib) + len(held_out) == len(all_x)
    by_row = {r.tobytes(): int(t) for r, t in zip(all_x, digits.target)}
    assert all(by_row[r.tobytes()] == t for r, t in zip(calib.inputs[0], calib.labels))
    assert engine.load_calibration("demo")[0].shape == calib.inputs[0].shape


def test_calibration_demo_on_the_command_line(capfd, tmp_path: Path) -> None:
    with np.load(DEMO_CALIB_PATH) as d:
        np.testing.assert_array_equal(engine.load_calibration("demo")[0], d["x"])
    rc, out, err = cli(capfd, "scores", "demo", "--criterion", "nuclear_norm",
                       "--calibration", "demo", "--json", tmp_path / "s.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["options"]["criterion"] == "nuclear_norm"


def test_prune_eval_data_writes_quality_matching_evaluate(capfd, tmp_path: Path) -> None:
    rc, out, err = cli(capfd, "prune", "demo", "--ratio", "0.5", "--eval-data", "demo",
                       "--out", tmp_path, "--no-onnx")
    assert rc == 0, err
    quality = json.loads((tmp_path / "report.json").read_text())["quality"]
    assert quality["metric"] == "accuracy" and quality["samples"] == 450
    assert quality["original"] > 0.95 > quality["pruned"]
    assert f"pruned {quality['pruned']:.4f}" in out
    rc, out, err = cli(capfd, "evaluate", tmp_path / "model.pt2", "--data", DEMO_EVAL_PATH,
                       "--json", tmp_path / "e.json")
    assert rc == 0, err
    first, reason = out.strip().splitlines()
    assert first == f"accuracy {quality['pruned']:.4f} (450 samples)"
    assert reason == f"metric: --data {DEMO_EVAL_PATH} has labels and the model returns class " \
                     "scores"
    assert json.loads((tmp_path / "e.json").read_text())["value"] == quality["pruned"]
    # the original, measured independently of the engine on the same file
    with np.load(DEMO_EVAL_PATH) as d:
        logits = engine.load_model("demo").program.module()(torch.from_numpy(d["x"]))
        assert quality["original"] == pytest.approx(float(
            (logits.argmax(1).numpy() == d["y"]).mean()))


def test_evaluate_agreement_with_a_reference_on_the_command_line(capfd, tmp_path) -> None:
    rc, out, err = cli(capfd, "evaluate", "demo", "--data", "demo", "--metric", "agreement",
                       "--reference", "demo")
    assert rc == 0, err
    assert out.strip().splitlines() == ["agreement 1.0000 (450 samples)",
                                        "metric: chosen by --metric"]


def _write(tmp_path: Path, name: str, **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


X_DEMO = np.zeros((6, 1, 8, 8), dtype=np.float32)
Y_DEMO = np.zeros(6, dtype=np.int64)


@pytest.mark.parametrize("case, arrays, pattern", [
    ("wrong_keys", {"z": X_DEMO}, "allowed arrays: x"),
    ("both", {"x": X_DEMO, "x0": X_DEMO}, "not both"),
    ("gap", {"x0": X_DEMO, "x2": X_DEMO}, "without gaps"),
    ("shape", {"x": np.zeros((6, 1, 8, 9), np.float32)}, r"takes inputs of shape \(N, 1, 8, 8\)"),
    ("dtype", {"x": X_DEMO.astype(np.int64), "y": Y_DEMO}, "takes floating-point inputs"),
    ("labels", {"x": X_DEMO, "y": Y_DEMO[:4]}, "one label per sample"),
    ("float_labels", {"x": X_DEMO, "y": Y_DEMO.astype(np.float32)}, "integer class indices"),
    ("two_inputs", {"x0": X_DEMO, "x1": X_DEMO}, "takes 1"),
    ("empty", {"x": X_DEMO[:0]}, "at least one sample"),
    ("pickle", {"x": np.array([object()], dtype=object)}, "Python objects.*unpickling"),
])
def test_bad_data_is_one_line(capfd, tmp_path: Path, case, arrays, pattern) -> None:
    path = _write(tmp_path, f"{case}.npz", **arrays)
    rc, _, err = cli(capfd, "evaluate", "demo", "--data", path)
    line = one_error_line(err)
    assert rc == 2 and str(path) in line
    assert re.search(pattern, line), line
    rc, _, err = cli(capfd, "prune", "demo", "--ratio", "0.2", "--eval-data", path,
                     "--out", tmp_path / "out")
    assert rc == 2 and str(path) in one_error_line(err)
    assert not (tmp_path / "out" / "report.json").exists()


def test_unlabelled_data_needs_a_reference_or_a_metric(capfd, tmp_path: Path) -> None:
    path = _write(tmp_path, "nolabels.npz", x=X_DEMO)
    rc, _, err = cli(capfd, "evaluate", "demo", "--data", path)
    assert rc == 2 and re.search(r"has no labels y.*--metric perplexity.*--reference",
                                 one_error_line(err))
    # prune compares with the original: agreement by default
    rc, out, err = cli(capfd, "prune", "demo", "--ratio", "0.2", "--eval-data", path,
                       "--out", tmp_path / "out", "--no-onnx")
    assert rc == 0, err
    quality = json.loads((tmp_path / "out" / "report.json").read_text())["quality"]
    assert quality["metric"] == "agreement" and quality["original"] == 1.0


@pytest.mark.parametrize("argv, pattern", [
    (["evaluate", "demo", "--data", "missing.npz"], "--data file missing.npz does not exist"),
    (["evaluate", "demo", "--data", "data.txt"], "data.txt is text, but demo does not take "
                                                 "token ids"),
    (["evaluate", "demo", "--data", "data.xlsx"], "extension '.xlsx'"),
    (["evaluate", "demo", "--data", "demo", "--metric", "f1"],
     "--metric 'f1' is not allowed; allowed: accuracy, perplexity, agreement, relative_error"),
    (["evaluate", "demo", "--data", "demo", "--metric", "perplexity"],
     "perplexity on --data demo .*needs a causal language model"),
    (["evaluate", "demo", "--data", "demo", "--metric", "relative_error"],
     "relative_error compares with a reference"),
    (["prune", "demo", "--ratio", "0.2", "--metric", "accuracy", "--out", "o"],
     "--metric needs --eval-data"),
    (["prune", "demo", "--ratio", "0.2", "--eval-data", "nope.npz", "--out", "o"],
     "--eval-data file nope.npz does not exist.*demo, demo-lm"),
    (["prune", "demo", "--ratio", "0.2", "--calibration", str(DEMO_EVAL_PATH), "--eval-data",
      "demo", "--out", "o"], "--eval-data demo is the --calibration file"),
])
def test_bad_options_are_one_line(capfd, tmp_path, monkeypatch, argv, pattern) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("1 2 3")
    (tmp_path / "data.xlsx").write_text("1 2 3")
    rc, _, err = cli(capfd, *argv)
    assert rc == 2
    assert re.search(pattern, one_error_line(err))


def test_every_form_of_a_model_measures_the_same() -> None:
    from engine.demo import DEMO_META_PATH

    by_name = engine.evaluate("demo", "demo")["value"]
    assert by_name == pytest.approx(json.loads(DEMO_META_PATH.read_text())["accuracy"], abs=1e-4)
    analysis = engine.analyze("demo")
    captured = analysis.captured
    assert engine.evaluate(analysis, "demo")["value"] == by_name
    assert engine.evaluate(captured, "demo")["value"] == by_name
    assert engine.evaluate(captured.program, "demo")["value"] == by_name
    assert engine.evaluate(analysis.gm, "demo",
                           example_inputs=captured.example_inputs)["value"] == by_name
