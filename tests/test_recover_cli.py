"""`prunescope prune ... --calibration F --recover METHODS`: files, report and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import cli, one_error_line


def test_prune_with_recovery_writes_the_recovered_model(capfd, tmp_path):
    rc, out, err = cli(capfd, "prune", "demo", "--ratio", "0.5", "--calibration", "demo",
                       "--recover", "bias,lsq,bn,norm", "--eval-data", "demo", "--out", tmp_path)
    assert rc == 0, err
    assert "warning" not in err, err  # torch's internal deprecations are not the user's
    report = json.loads((tmp_path / "report.json").read_text())
    recovery = report["recovery"]
    # each method measured on the held-back calibration samples; kept only where it helped
    assert list(recovery["per_method"]) == ["bias", "lsq", "bn", "norm"]
    assert recovery["methods"] == [m for m, v in recovery["per_method"].items() if v["kept"]]
    assert "lsq" in recovery["methods"]
    assert recovery["metric"] == "accuracy"
    assert recovery["metric_after"] > recovery["metric_before"] + 0.3
    assert report["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    assert f"recovery: {', '.join(recovery['methods'])} in" in out
    assert "recovery: norm: accuracy" in out  # a line per method: its numbers and verdict
    quality = report["quality"]  # on the held-out evaluation set, not the calibration set
    assert quality["metric"] == "accuracy"
    assert quality["pruned"] < 0.5 and quality["recovered"] >= 0.9
    # model.pt2 is the recovered model: its accuracy on the held-out set is far above pruning's
    program = torch.export.load(tmp_path / "model.pt2")
    with np.load("assets/demo_eval.npz") as data:
        x, y = torch.from_numpy(data["x"]), data["y"]
    with torch.no_grad():
        accuracy = float((program.module()(x).argmax(1).numpy() == y).mean())
    assert accuracy >= 0.9


def test_distill_steps_with_a_seed_are_reproducible(capfd, tmp_path):
    states = []
    for run in ("a", "b"):
        rc, _, err = cli(capfd, "prune", "demo", "--ratio", "0.5", "--calibration", "demo",
                         "--recover", "distill", "--recover-steps", "6", "--seed", "4",
                         "--no-onnx", "--out", tmp_path / run)
        assert rc == 0, err
        states.append(torch.export.load(tmp_path / run / "model.pt2").state_dict)
        report = json.loads((tmp_path / run / "report.json").read_text())
        assert report["recovery"]["distill"]["steps"] == 6
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.fixture(scope="module")
def wrong_shape(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "wrong.npz"
    np.savez(path, x=np.zeros((6, 1, 7, 7), np.float32))
    return path


@pytest.mark.parametrize(("extra", "text"), [
    (["--calibration", "demo", "--recover", "bn,polish"],
     "unknown recovery method 'polish'; allowed: bias, lsq, bn, norm, distill, auto"),
    (["--recover", "bn"], "--recover needs calibration data: --calibration"),
    (["--calibration", "demo", "--recover", "distill", "--recover-budget", "-5"],
     "--recover-budget '-5' is not allowed; allowed: a positive number of seconds"),
    (["--calibration", "demo", "--recover", "distill", "--recover-budget", "soon"],
     "allowed: a positive number of seconds"),
    (["--calibration", "demo", "--recover", "distill", "--recover-steps", "0"],
     "--recover-steps '0' is not allowed; allowed: a positive integer"),
    (["--calibration", "demo", "--recover", "distill", "--recover-steps", "2.5"],
     "allowed: a positive integer"),
    (["--calibration", "demo", "--recover-steps", "3"], "--recover-steps needs --recover"),
    (["--calibration", "WRONG", "--recover", "bn"],
     "x has shape (6, 1, 7, 7); the model takes (N, 1, 8, 8)"),
])
def test_bad_recovery_flags_are_one_line(capfd, tmp_path, wrong_shape, extra, text):
    extra = [str(wrong_shape) if e == "WRONG" else e for e in extra]
    rc, out, err = cli(capfd, "prune", "demo", "--ratio", "0.5", *extra, "--out", tmp_path)
    assert rc == 2
    assert text in one_error_line(err)
    assert not (tmp_path / "report.json").exists()
