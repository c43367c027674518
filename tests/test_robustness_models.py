"""Robustness: unusual models (nothing to prune, everything frozen, dynamic shapes, several
inputs and outputs, NaN/inf weights, tied weights, one-channel layers) give either a correct
smaller model or a clear one-line error, never a silent wrong model or NaN in a plan."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
from engine.options import LAYER_NORMS, POLICIES
from tests.helpers import assert_equals_mask_mode, cli
from tests.zoo import build


def leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in leaves(o)]


def run(module, *inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return leaves(module(*inputs))


# ------------------------------------------------------------------ nothing to prune


class NoParameters(nn.Module):
    def forward(self, x):
        return torch.tanh(x * 2.0)


class OnlyHead(nn.Module):
    """The only layer's channels are the model output: nothing may be removed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


class AllFrozen(nn.Module):
    """Every hidden channel runs through an op without a channel rule (cummax, sort over C)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        a = torch.cummax(self.a(x), dim=1).values
        b = torch.sort(self.b(x), dim=1).values
        return self.c(torch.cat([a, b], dim=1)).mean(dim=(2, 3))


@pytest.mark.parametrize(
    ("factory", "shape", "frozen"),
    [
        (NoParameters, (2, 4), {}),
        (OnlyHead, (2, 4), {"fc": "reaches a model output"}),
        (AllFrozen, (2, 3, 4, 4), {"a": "cummax", "b": "sort", "c": "reaches a model output"}),
    ],
    ids=["no_parameters", "only_head", "all_frozen"],
)
def test_nothing_prunable_leaves_the_model_unchanged_and_says_why(factory, shape, frozen) -> None:
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(*shape)
    analysis = engine.analyze(model, (x,))
    assert analysis.groups == []
    reasons = {layer: f.reason for f in analysis.frozen for layer in f.layers}
    assert set(reasons) == set(frozen)
    for layer, words in frozen.items():
        assert words in reasons[layer]
    result = engine.prune(model, (x,), None, ratio=0.9)
    assert all(len(g["pruned"]) == 0 for g in result.report["groups"])
    assert result.after == result.before
    for got, want in zip(run(result.module, x), run(model, x), strict=True):
        assert torch.equal(got, want)


def test_nothing_prunable_cli_names_the_frozen_layers(capfd, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    torch.export.save(torch.export.export(AllFrozen().eval(), (x,)), tmp_path / "m.pt2")
    rc, out, err = cli(capfd, "prune", tmp_path / "m.pt2", "--ratio", "0.5",
                       "--out", tmp_path / "out", "--no-onnx")
    assert rc == 0, err
    frozen = [ln for ln in err.splitlines() if ln.startswith("frozen: ")]
    assert any("cummax" in ln and " a" in ln for ln in frozen), err
    assert any("sort" in ln and " b" in ln for ln in frozen), err


# ------------------------------------------------------------------- dynamic shapes


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu(self.bn(self.a(x)))
        return self.c(F.relu(self.b(h)) + h).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Small().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 1.5)
    batch = torch.export.Dim("batch", min=1, max=64)
    side = torch.export.Dim("side", min=2, max=32)
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),),
                                  dynamic_shapes=({0: batch, 2: side, 3: side},))
    path = tmp_path_factory.mktemp("dynamic") / "dynamic.pt2"
    torch.export.save(program, path)
    return path


def test_dynamic_shapes_survive_pruning(dynamic_pt2: Path, tmp_path: Path) -> None:
    analysis = engine.analyze(dynamic_pt2)
    the_plan = engine.plan(analysis, None, ratio=0.5)
    assert the_plan.total_pruned > 0
    result = engine.apply(analysis, the_plan)
    engine.save(result, tmp_path, onnx=False)
    reloaded = torch.export.load(tmp_path / "model.pt2").module()
    masked = engine.masked(analysis, the_plan)
    torch.manual_seed(1)
    for shape in [(1, 3, 8, 8), (5, 3, 8, 8), (3, 3, 16, 16), (2, 3, 5, 5)]:
        x = torch.randn(*shape)
        want = run(masked, x)
        for module in (result.module, reloaded):
            got = run(module, x)
            assert [g.shape for g in got] == [w.shape for w in want]
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- several inputs and outputs


class TwoInThreeOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)
        self.b = nn.Linear(5, 12)
        self.d = nn.Linear(12, 6)
        self.e = nn.Linear(12, 2)

    def forward(self, image, vector):
        pooled = self.c(F.relu(self.a(image))).mean(dim=(2, 3))
        v = F.relu(self.b(vector))
        return {"pooled": pooled, "pair": (self.d(v), self.e(v))}


def two_in_three_out():
    torch.manual_seed(0)
    return TwoInThreeOut().eval(), (torch.randn(2, 3, 6, 6), torch.randn(2, 5))


def test_several_inputs_and_outputs() -> None:
    model, inputs = two_in_three_out()
    analysis = engine.analyze(model, inputs)
    assert {g.name for g in analysis.groups} == {"a", "b"}
    the_plan = engine.plan(analysis, None, ratios={"a": 0.5, "b": 0.5})
    result = engine.apply(analysis, the_plan)
    assert {g.name: len(g.pruned) for g in the_plan.groups} == {"a": 4, "b": 6}
    torch.manual_seed(1)
    fresh = (torch.randn(2, 3, 6, 6), torch.randn(2, 5))
    want = run(engine.masked(analysis, the_plan), *fresh)
    got = run(result.module, *fresh)
    shapes = [w.shape for w in run(model, *fresh)]
    assert [g.shape for g in got] == [w.shape for w in want] == shapes
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_several_inputs_cli(capfd, tmp_path: Path) -> None:
    model, inputs = two_in_three_out()
    torch.export.save(torch.export.export(model, inputs), tmp_path / "two.pt2")
    rc, _, err = cli(capfd, "prune", tmp_path / "two.pt2", "--ratio", "0.5",
                     "--out", tmp_path / "out", "--no-onnx")
    assert rc == 0, err
    pruned = torch.export.load(tmp_path / "out" / "model.pt2").module()
    assert [o.shape for o in run(pruned, *inputs)] == [o.shape for o in run(model, *inputs)]


# ---------------------------------------------------------------- NaN and infinity


def poisoned(where: str, value: float):
    model, inputs = build("conv_bn_residual")
    with torch.no_grad():
        if where == "weight":
            model.conv_b.weight[3] = value
        elif where == "bias":
            model.conv_b.bias[3] = value
        else:
            model.bn_b.running_var[3] = value
    return model, inputs


@pytest.mark.parametrize("criterion", ["l2", "l1", "gm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_is_an_error_naming_the_layer(criterion: str, value: float) -> None:
    model, inputs = poisoned("weight", value)
    with pytest.raises(engine.PruneScopeError, match="conv_b") as info:
        engine.prune(model, inputs, {"criterion": criterion}, ratio=0.5)
    assert "\n" not in str(info.value)


def test_non_finite_weight_cli_error_names_the_layer(capfd, tmp_path: Path) -> None:
    model, inputs = poisoned("weight", float("nan"))
    torch.export.save(torch.export.export(model, inputs), tmp_path / "nan.pt2")
    rc, out, err = cli(capfd, "scores", tmp_path / "nan.pt2")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunescope: error: ") and "conv_b" in lines[0]


def test_nan_weights_are_refused_before_any_score() -> None:
    """Whatever the criterion (random reads no weight), a NaN weight is named up front."""
    model, inputs = poisoned("weight", float("nan"))
    with pytest.raises(engine.ModelLoadError, match=r"conv_b\.weight"):
        engine.analyze(model, inputs)


@pytest.mark.parametrize(
    ("where", "criterion"),
    [("bias", "l2"), ("running_var", "l2"), ("weight", "random")],
)
def test_non_finite_parameter_is_reported_whatever_the_criterion(where: str,
                                                                 criterion: str) -> None:
    model, inputs = poisoned(where, float("nan"))
    with torch.no_grad():
        assert not torch.isfinite(model(*inputs)).all()  # the model itself is broken
    with pytest.raises(engine.PruneScopeError, match="conv_b|bn_b"):
        engine.prune(model, inputs, {"criterion": criterion}, ratio=0.5)


@pytest.mark.parametrize("scale", [3e38, 1e30, 1e-30, 0.0])
def test_extreme_finite_weights_give_finite_plans(scale: float) -> None:
    model, inputs = build("conv_bn_residual")
    with torch.no_grad():
        model.conv_b.weight.mul_(scale)
        model.conv_a.weight[:4] = scale
    analysis = engine.analyze(model, inputs)
    for criterion, layer_norm, policy in itertools.product(("l2", "l1", "gm"), LAYER_NORMS,
                                                           POLICIES):
        options = {"criterion": criterion, "layer_norm": layer_norm, "policy": policy}
        the_plan = engine.plan(analysis, options, ratio=0.5)
        for g in the_plan.groups:
            assert np.all(np.isfinite(g.scores)), (criterion, layer_norm, policy, g.name)
            assert 1 <= len(g.kept) and len(g.kept) + len(g.pruned) == g.n


# ---------------------------------------------------------------------- tied weights


def test_tied_weights_are_pruned_consistently() -> None:
    model, inputs = build("tied_embedding")
    analysis = engine.analyze(model, inputs)
    the_plan = engine.plan(analysis, None, ratio=0.5)
    result = engine.apply(analysis, the_plan)
    hidden = next(g for g in the_plan.groups if g.n == 24)  # the tied dimension
    assert len(hidden.pruned) > 0
    ids = torch.randint(0, 50, (2, 7))  # the captured shape: nn.Modules export static shapes
    got, want = run(result.module, ids), run(engine.masked(analysis, the_plan), ids)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[0].shape == (2, 7, 50)


def test_tied_weights_stay_tied_after_pruning() -> None:
    model, inputs = build("tied_embedding")
    result = engine.prune(model, inputs, None, ratio=0.5)
    params = dict(result.module.named_parameters(remove_duplicate=False))
    assert params["wte.weight"].shape == params["lm_head.weight"].shape
    assert params["wte.weight"].data_ptr() == params["lm_head.weight"].data_ptr()
    used = {id(p): p.numel() for p in params.values()}
    assert result.after["params"] == sum(used.values())


# -------------------------------------------------------------- one-channel layers


class OneChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 1, 1)
        self.b = nn.Conv2d(1, 5, 1)
        self.c = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x))))).flatten(1)


@pytest.mark.parametrize(
    "how",
    [{"ratio": 0.99}, {"ratios": {"a": 0.99, "b": 0.99}}],
    ids=["global", "per_group"],
)
@pytest.mark.parametrize("step", [("round", 2), ("round_up", 4), ("round_down", 4), ("none", 1)])
def test_one_channel_layer_is_never_emptied(how: dict, step: tuple[str, int]) -> None:
    torch.manual_seed(0)
    model, x = OneChannel().eval(), torch.randn(2, 3, 4, 4)
    options = {"step_op": step[0], "step_size": step[1]}
    result = engine.prune(model, (x,), options, **how)
    kept = {g["name"]: len(g["kept"]) for g in result.report["groups"]}
    assert kept["a"] == 1
    assert 1 <= kept["b"] <= 5
    assert run(result.module, x)[0].shape == (2, 2 * 16)


def test_one_channel_layer_cannot_lose_its_channel_by_index() -> None:
    torch.manual_seed(0)
    model, x = OneChannel().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(engine.OptionError, match="at least one"):
        engine.prune(model, (x,), {"criterion": "index"}, indices={"a": [0]})


def test_an_infinite_mask_buffer_is_not_mistaken_for_broken_weights() -> None:
    """Causal masks of -inf kept in a buffer are data, not a broken model."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 4)
            self.register_buffer("mask", torch.triu(torch.full((3, 3), float("-inf")), 1))

        def forward(self, x):
            weights = (x @ x.transpose(1, 2) + self.mask).softmax(-1)
            return self.b(torch.relu(self.a(weights @ x)))

    torch.manual_seed(0)
    model, inputs = Masked().eval(), (torch.randn(2, 3, 4),)
    result = engine.prune(model, inputs, ratio=0.5)
    assert result.report["after"]["params"] < result.report["before"]["params"]
    assert result.report["verification"]["exact"]
    assert_equals_mask_mode(result)
