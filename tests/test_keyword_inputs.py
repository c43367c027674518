"""A model whose forward takes keyword-only inputs (`forward(self, x, *, scale, shift)`),
saved as a .pt2: every way of running its graph (mask mode, verification, block removal,
data-aware scoring, the ONNX check) must pass the keyword inputs by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import engine
from tests.helpers import cli


class KeywordModel(torch.nn.Module):
    """Two residual blocks; `scale` multiplies the first branch, `shift` the second's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, 16)
        self.a1, self.b1 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.a2, self.b2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x, *, scale, shift):
        h = self.inp(x)
        h = h + self.b1(torch.relu(self.a1(h))) * scale
        h = h + self.b2(torch.relu(self.a2(h))) + shift
        return self.out(h)


def _save(tmp_path: Path) -> tuple[Path, torch.Tensor, dict]:
    x = torch.randn(4, 8)
    kwargs = {"scale": torch.tensor(2.0), "shift": torch.full((16,), 0.5)}
    program = torch.export.export(KeywordModel(), (x,), kwargs)
    path = tmp_path / "kw.pt2"
    torch.export.save(program, path)
    return path, x, kwargs


def test_masked_takes_keyword_inputs_in_any_order(tmp_path):
    path, x, kwargs = _save(tmp_path)
    an = engine.analyze(path)
    the_plan = engine.plan(an, {}, ratio=0.5)
    masked = engine.masked(an, the_plan)
    out = masked(x, scale=kwargs["scale"], shift=kwargs["shift"])
    swapped = masked(x, shift=kwargs["shift"], scale=kwargs["scale"])
    torch.testing.assert_close(out, swapped, rtol=0, atol=0)
    result = engine.apply(an, the_plan)
    # the pruned model computes what mask mode computes (the inputs reached their places)
    torch.testing.assert_close(result.module(x, **kwargs), out, rtol=1e-5, atol=1e-5)
    # and the keyword inputs matter: another scale gives another output
    other = masked(x, scale=torch.tensor(-3.0), shift=kwargs["shift"])
    assert not torch.allclose(other, out)


def test_data_aware_scores_and_block_removal_with_keyword_inputs(tmp_path):
    path, _, _ = _save(tmp_path)
    calibration = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    scores = engine.score(path, options={"criterion": "activation"}, calibration=calibration)
    assert scores.to_dict()["groups"]
    result = engine.prune(path, ratio=0.25, remove_blocks=1, calibration=calibration)
    assert sum(b["removed"] for b in result.report["blocks"]) == 1
    assert result.report["verification"]["output_shapes_match"]


def test_cli_prunes_a_pt2_with_keyword_inputs(tmp_path, capfd):
    path, _, _ = _save(tmp_path)
    out = tmp_path / "out"
    # in this process (the CLI's process behaviour has its own tests); --latency as by
    # default: the timed runs pass the keyword inputs too
    rc, _, err = cli(capfd, "prune", path, "--ratio", "0.5", "--latency", "--out", out)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["exact"] is True
    assert report["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    assert report["after"]["params"] < report["before"]["params"]
