"""report.json's latency (engine/quality/latency.py): original and pruned model timed
alternately on torch (the chosen device) and ONNX Runtime (CPU). No wall-clock asserts:
the tests check what is measured, in which order, and that the figures are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine
from engine.quality import executors
from engine.quality.latency import interleaved_medians, latency_report
from tests.helpers import cli


def test_runs_alternate_and_reverse_each_round_after_the_warmup() -> None:
    order: list[str] = []
    calls = [lambda: order.append("a"), lambda: order.append("b")]
    medians = interleaved_medians(calls, runs=4, warmup=1, budget_s=100)
    assert order == ["a", "b",  # warm-up
                     "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(medians) == 2 and all(m >= 0 for m in medians)
    order.clear()
    interleaved_medians(calls, runs=50, warmup=0, budget_s=0.0)
    assert len(order) == 6  # the budget is spent: stops after the minimum of 3 rounds


def test_cli_reports_latency_beside_the_flops_ratio(capfd, tmp_path: Path) -> None:
    rc, out, err = cli(capfd, "prune", "demo", "--ratio", "0.5", "--latency",
                       "--out", tmp_path)
    assert rc == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    lat = report["latency"]
    assert lat["device"] == "cpu"
    assert lat["flops_ratio"] == pytest.approx(report["before"]["flops"]
                                               / report["after"]["flops"], rel=1e-3)
    for runtime in ("torch", "onnxruntime_cpu"):
        rows = lat[runtime]
        assert [r["batch"] for r in rows] == [1, 8], rows
        for r in rows:
            assert r["original_ms"] > 0 and r["pruned_ms"] > 0
            assert r["speedup"] == pytest.approx(r["original_ms"] / r["pruned_ms"], rel=1e-3)
    assert "latency (torch cpu) batch 1: " in out
    assert "latency (onnxruntime cpu) batch 8: " in out
    rc, out, _ = cli(capfd, "prune", "demo", "--ratio", "0.5", "--no-latency", "--no-onnx",
                     "--out", tmp_path)
    assert rc == 0 and "latency" not in json.loads((tmp_path / "report.json").read_text())
    assert "latency (" not in out


class FixedBatch(torch.nn.Module):
    """A model whose graph holds its batch size (a reshape to a constant shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).reshape(4, 3)


def test_a_fixed_batch_graph_is_timed_at_its_own_batch() -> None:
    model, x = FixedBatch().eval(), torch.randn(4, 6)
    captured = engine.load_model(model, (x,))
    result = engine.prune(captured, ratio=0.5)
    lat = latency_report(captured, result, onnx=False, runs=3)
    assert [r["batch"] for r in lat["torch"]] == [4]
    assert lat["torch"][0]["pruned_ms"] > 0 and "onnxruntime_cpu" not in lat


class WideMLP(torch.nn.Module):
    """Wide enough that removing hidden units takes measurable time off a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 1024)
        self.b = torch.nn.Linear(1024, 1024)
        self.c = torch.nn.Linear(1024, 10)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_target_latency_uses_group_costs_measured_here_and_caches_them(
        capfd, tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    from engine.quality.latency_costs import saved_fraction

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # the sensitivity points run in this process: a pool of two on a two-core machine that
    # `make test` already keeps busy costs more than it saves (the pool has its own tests)
    monkeypatch.setattr(executors.os, "cpu_count", lambda: 1)
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    torch.export.save(torch.export.export(WideMLP().eval(), (x,)), tmp_path / "mlp.pt2")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 64)).astype(np.float32),
             y=rng.integers(0, 10, 64))
    runs = []
    for out in ("o1", "o2"):
        rc, stdout, err = cli(capfd, "prune", tmp_path / "mlp.pt2", "--target-latency", "0.2",
                              "--calibration", tmp_path / "calib.npz", "--no-onnx",
                              "--out", tmp_path / out)
        assert rc == 0, err
        runs.append(json.loads((tmp_path / out / "report.json").read_text()))
        assert "latency measured: " in stdout
    auto, again = runs[0]["auto_ratios"], runs[1]["auto_ratios"]
    assert auto["target"] == {"resource": "latency", "remove": 0.2}
    costs = auto["latency_costs"]
    assert costs["cached"] is False and again["latency_costs"]["cached"] is True
    assert again["latency_costs"]["groups"] == costs["groups"]  # read back, not re-measured
    assert set(costs["groups"]) == {g["name"] for g in runs[0]["groups"]}
    assert all(len(v) == len(costs["ratios"]) for v in costs["groups"].values())
    assert costs["measured"]["original_ms"] > 0 and costs["measured"]["pruned_ms"] > 0
    # the removal the search reached is the measured costs' prediction for the chosen plan
    fractions = {g["name"]: len(g["pruned"]) / g["channels"] for g in runs[0]["groups"]}
    assert auto["removed"] == pytest.approx(saved_fraction(costs, fractions), abs=1e-9)
    assert list((tmp_path / "cache" / "prunescope" / "latency").glob("*.json"))
