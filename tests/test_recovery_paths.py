"""The recovery code paths the demo never takes, on tiny models (each test well under 2 s):
transformers' written-out RMSNorm, GroupNorm, LayerNorm over two dims or without a bias,
bias-free linear layers and convolutions for `bias` and `lsq`, distillation's schedule
(learning rate, seeded batches, check interval, fixed-batch rounding, stop), a fixed-batch
student, the time budget (on a deterministic clock), a text model's padding rows (an
attention mask) and a parameter policy that refuses new parameters (what a transformers
folder imposes, without building one). Every expected
value is worked out here: normalisations written by hand, numpy's polyfit and least squares,
the training loop written out with torch's AdamW. Part of the `recovery` mutation target
(bench/mutation.py).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.quality.recovery import bias, distill, lsq, norm
from engine.quality.recovery.data import CalibrationSet
from engine.quality.recovery.lockstep import Context, Layout
from engine.transform.apply import pruned_roots
from tests.helpers import ridge_reference


def _program(model: nn.Module, x: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model.eval(), (x[:4],), dynamic_shapes=({0: batch},))


def _inputs(*shape: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _three_linears() -> nn.Sequential:
    """4 -> 8 -> 6 -> 3 with ReLUs, seeded: the middle layer can lose inputs and outputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                         nn.Linear(6, 3)).eval()


def _params(module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in module.named_parameters()}


def _prune_and_recover(model, x, removed: dict, method: str):
    result = engine.prune(_program(model, x), options={"criterion": "index"}, indices=removed)
    return result, engine.recover(result, x.numpy(), method, eval_holdout=0)


# ------------------------------------------------------------------ norm: written-out RMSNorm


def _rms_factor(h: torch.Tensor, kept: list[int], eps: float) -> np.ndarray:
    """Per kept channel: the through-origin least-squares factor from the value normalised
    over the kept channels only to the value normalised over all of them."""
    h = h.double()
    z_full = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))[..., kept]
    hk = h[..., kept]
    z_kept = hk * torch.rsqrt(hk.pow(2).mean(-1, keepdim=True) + eps)
    z_full, z_kept = z_full.reshape(-1, len(kept)), z_kept.reshape(-1, len(kept))
    return ((z_kept * z_full).sum(0) / (z_kept * z_kept).sum(0)).numpy()


@pytest.mark.parametrize("eps", [1e-2, 1e-9])
def test_norm_rescales_transformers_written_out_rms_norm(eps):
    """LlamaRMSNorm (pow, mean, add eps, rsqrt, mul, casts, weight * ...) on hidden 16 with
    token positions: the weight times the hand-computed factor. eps 1e-2 matters next to the
    mean square (the formula with eps); at 1e-9 it is lost in rounding (the one without)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), LlamaRMSNorm(16, eps=eps), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.3)  # mean square about 0.05: eps 1e-2 changes the scale
        model[1].weight.uniform_(0.5, 1.5)
    x = _inputs(40, 5, 4)  # (samples, tokens, features)
    removed = [1, 4, 9, 10, 15]
    _, recovered = _prune_and_recover(model, x, {"0": removed}, "norm")
    assert recovered.report["recovery"]["layers"]["norm"] == ["1"]
    kept = [c for c in range(16) if c not in removed]
    with torch.no_grad():
        factor = _rms_factor(model[0](x), kept, eps)
    assert not np.allclose(factor, 1.0, atol=1e-3)  # the fit does change something
    w0 = model[1].weight.detach().double().numpy()[kept]
    np.testing.assert_allclose(_params(recovered.module)["1.weight"], w0 * factor, rtol=1e-5)


class _WrittenRMS(nn.Module):
    """RMSNorm written out by hand in several ways transformers models do (or do not)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.style == "weight last, eps 1e-2":
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-2)) * self.weight
        if self.style == "rsqrt first, no eps":
            return self.weight * (torch.rsqrt(h.pow(2).mean(-1, keepdim=True)) * h)
        if self.style == "cube":  # not a mean square: no RMSNorm
            return self.weight * (h * torch.rsqrt(h.pow(3).abs().mean(-1, keepdim=True) + 1))
        if self.style == "unsqueezed":  # mean without keepdim, unsqueezed: not recognised
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1).unsqueeze(-1) + 1e-2))
        if self.style == "eps a tensor":  # eps not a number: not recognised
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)
                                                  + self.weight[:1]))
        if self.style == "no rsqrt":  # times the mean square: no RMSNorm
            return self.weight * (h * (h.pow(2).mean(-1, keepdim=True) + 1e-2))
        if self.style == "sqrt":  # divided by sqrt: not the rsqrt pattern
            return self.weight * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-2))
        if self.style == "scale only":  # no normalisation at all
            return self.weight * (h * 2.0)
        raise AssertionError(self.style)


def _rms_chain(style: str) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), _WrittenRMS(style), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.3)
    return model


@pytest.mark.parametrize(("style", "eps"), [("weight last, eps 1e-2", 1e-2),
                                            ("rsqrt first, no eps", 0.0)])
def test_norm_finds_written_out_rms_norm_in_either_operand_order(style, eps):
    model = _rms_chain(style)
    x = _inputs(30, 3, 4)
    removed = [2, 5, 6]
    _, recovered = _prune_and_recover(model, x, {"0": removed}, "norm")
    assert recovered.report["recovery"]["layers"]["norm"] == ["1"]
    kept = [c for c in range(8) if c not in removed]
    with torch.no_grad():
        factor = _rms_factor(model[0](x), kept, eps)
    assert not np.allclose(factor, 1.0, atol=1e-3)
    w0 = model[1].weight.detach().double().numpy()[kept]
    np.testing.assert_allclose(_params(recovered.module)["1.weight"], w0 * factor, rtol=1e-5)


@pytest.mark.parametrize("style", ["cube", "unsqueezed", "eps a tensor", "no rsqrt", "sqrt",
                                   "scale only"])
def test_norm_leaves_products_that_are_not_rms_norm_alone(style):
    model = _rms_chain(style)
    x = _inputs(30, 3, 4)
    result, recovered = _prune_and_recover(model, x, {"0": [2, 5, 6]}, "norm")
    assert "norm" not in recovered.report["recovery"]["layers"]
    assert "norm" in recovered.report["recovery"]["skipped"]
    np.testing.assert_array_equal(_params(recovered.module)["1.weight"],
                                  _params(result.module)["1.weight"])


@pytest.mark.parametrize("style", ["cube", "unsqueezed", "eps a tensor", "no rsqrt", "sqrt",
                                   "scale only"])
def test_norm_leaves_products_that_are_not_rms_norm_alone_next_to_a_real_one(style):
    """The same products in a graph that also holds a real written-out RMSNorm (whose
    channels are all kept), so an rsqrt is present and the pattern matcher itself must refuse
    them: a product with the mean square and no rsqrt (`x * (ms + eps)`) is no RMSNorm."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), _WrittenRMS(style), nn.Linear(8, 8),
                          _WrittenRMS("weight last, eps 1e-2"), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.3)
    x = _inputs(30, 3, 4)
    result, recovered = _prune_and_recover(model, x, {"0": [2, 5, 6]}, "norm")
    assert "norm" not in recovered.report["recovery"]["layers"]
    assert "norm" in recovered.report["recovery"]["skipped"]
    for name in ("1.weight", "3.weight"):
        np.testing.assert_array_equal(_params(recovered.module)[name],
                                      _params(result.module)[name])


def test_norm_leaves_a_rms_norm_whose_channels_were_all_kept():
    """Pruning the layer after the norm: the norm's channels are whole, nothing to fit."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), _WrittenRMS("weight last, eps 1e-2"),
                          nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = _inputs(30, 3, 4)
    result, recovered = _prune_and_recover(model, x, {"2": [0, 3]}, "norm")
    assert "norm" not in recovered.report["recovery"]["layers"]
    np.testing.assert_array_equal(_params(recovered.module)["1.weight"],
                                  model[1].weight.detach().double().numpy())


# ------------------------------------------------------------------ norm: GroupNorm, LayerNorm


def _group_norm_by_hand(h: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    n, c = h.shape[:2]
    g = h.reshape(n, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps)).reshape(h.shape)


def _affine_fits(z_kept: np.ndarray, z_full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's polyfit per column: slope and shift from z_kept to z_full."""
    fits = [np.polyfit(z_kept[:, j], z_full[:, j], 1) for j in range(z_kept.shape[1])]
    return np.array([f[0] for f in fits]), np.array([f[1] for f in fits])


def test_norm_refits_a_group_norm_per_channel():
    """GroupNorm(2 groups of 4) loses one channel per group: each kept channel's weight and
    bias absorb the polyfit of its value over 3 channels against its value over 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8, eps=0.5),
                          nn.Conv2d(8, 3, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # variance near eps: eps 0.5 counts
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = _inputs(24, 2, 5, 5)
    removed = [1, 5]
    _, recovered = _prune_and_recover(model, x, {"0": removed}, "norm")
    assert recovered.report["recovery"]["layers"]["norm"] == ["1"]
    kept = [c for c in range(8) if c not in removed]
    with torch.no_grad():
        h = model[0](x).double()
    z_full = _group_norm_by_hand(h, 2, 0.5)[:, kept]
    z_kept = _group_norm_by_hand(h[:, kept], 2, 0.5)

    def rows(z):  # (samples * positions, channels)
        return z.transpose(0, 1).reshape(len(kept), -1).T.numpy()

    slope, shift = _affine_fits(rows(z_kept), rows(z_full))
    assert not np.allclose(slope, 1.0, atol=1e-3)
    w0 = model[1].weight.detach().double().numpy()[kept]
    b0 = model[1].bias.detach().double().numpy()[kept]
    got = _params(recovered.module)
    np.testing.assert_allclose(got["1.weight"], w0 * slope, rtol=1e-5)
    np.testing.assert_allclose(got["1.bias"], b0 + w0 * shift, rtol=1e-5, atol=1e-7)


def _layer_norm_by_hand(h: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    mean = h.mean(dims, keepdim=True)
    var = ((h - mean) ** 2).mean(dims, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps)


def _normed_kept(h: torch.Tensor, kept: list[int], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(z_kept, z_full): the kept features of (samples, tokens, features) normalised over the
    kept features only, and over all of them (what the pruned and the original norm see)."""
    z_full = _layer_norm_by_hand(h, (2,), eps)[..., kept].reshape(-1, len(kept)).numpy()
    z_kept = _layer_norm_by_hand(h[..., kept], (2,), eps).reshape(-1, len(kept)).numpy()
    return z_kept, z_full


def test_norm_refits_a_layer_norm_with_its_own_eps_on_token_rows():
    """LayerNorm(6, eps 0.1) over the features of (samples, tokens, features), activations
    small enough for eps to count: one fit per kept feature over every token's row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, eps=0.1),
                          nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.4)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = _inputs(80, 3, 4)
    removed = [0, 4]
    _, recovered = _prune_and_recover(model, x, {"0": removed}, "norm")
    assert recovered.report["recovery"]["layers"]["norm"] == ["1"]
    kept = [1, 2, 3, 5]
    with torch.no_grad():
        h = model[0](x).double()
    z_kept, z_full = _normed_kept(h, kept, 0.1)
    slope, shift = _affine_fits(z_kept, z_full)
    w0 = model[1].weight.detach().double().numpy()[kept]
    b0 = model[1].bias.detach().double().numpy()[kept]
    got = _params(recovered.module)
    np.testing.assert_allclose(got["1.weight"], w0 * slope, rtol=1e-5)
    np.testing.assert_allclose(got["1.bias"], b0 + w0 * shift, rtol=1e-5, atol=1e-7)


def test_norm_adds_the_bias_a_layer_norm_without_one_needs():
    """LayerNorm(bias=False) over the features of (samples, tokens, features): a bias is
    added holding weight x shift (the fit's intercept)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, bias=False), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = _inputs(50, 4, 4)
    removed = [2, 3]
    _, recovered = _prune_and_recover(model, x, {"0": removed}, "norm")
    assert recovered.report["recovery"]["layers"]["norm"] == ["1"]
    kept = [0, 1, 4, 5]
    with torch.no_grad():
        h = model[0](x).double()
    z_kept, z_full = _normed_kept(h, kept, 1e-5)
    slope, shift = _affine_fits(z_kept, z_full)
    assert not np.allclose(shift, 0.0, atol=1e-3)
    w0 = model[1].weight.detach().double().numpy()[kept]
    got = _params(recovered.module)
    np.testing.assert_allclose(got["1.weight"], w0 * slope, rtol=1e-5)
    bias = next(v for k, v in got.items() if k.startswith("1.") and "bias" in k)
    np.testing.assert_allclose(bias, w0 * shift, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # and the model runs with it: the kept LayerNorm's output
        out = recovered.module(x)
    assert out.shape == (50, 4, 2)


def test_norm_leaves_a_layer_norm_without_affine_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=False),
                          nn.Linear(6, 2)).eval()
    x = _inputs(50, 4)
    _, recovered = _prune_and_recover(model, x, {"0": [2, 3]}, "norm")
    assert "norm" not in recovered.report["recovery"]["layers"]


# ------------------------------------------------------------------ bias


def test_bias_adds_the_removed_channels_mean_to_a_bias_free_convolution():
    """FLAP on a convolution: the added bias is the mean over samples and positions of what
    the removed input channels gave (padding borders included), computed here with conv2d
    on the removed channels alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1, bias=False)).eval()
    x = _inputs(32, 2, 5, 5)
    removed = [0, 3]
    _, recovered = _prune_and_recover(model, x, {"0": removed}, "bias")
    assert recovered.report["recovery"]["layers"]["bias"] == ["2"]
    with torch.no_grad():
        hidden = model[1](model[0](x))
        lost = F.conv2d(hidden[:, removed], model[2].weight[:, removed], padding=1)
    expected = lost.double().mean((0, 2, 3)).numpy()
    got = _params(recovered.module)
    bias = next(v for k, v in got.items() if k.startswith("2.") and "bias" in k)
    np.testing.assert_allclose(bias, expected, rtol=1e-5, atol=1e-6)


def test_bias_corrects_only_the_layer_that_lost_inputs_on_token_rows():
    """(samples, tokens, features): the middle layer loses outputs, so only the last one
    lost inputs; its bias moves by W[:, removed] @ mean over samples and tokens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                          nn.Linear(5, 3)).eval()
    x = _inputs(30, 7, 4)
    removed = [1, 2]
    result, recovered = _prune_and_recover(model, x, {"2": removed}, "bias")
    assert recovered.report["recovery"]["layers"]["bias"] == ["4"]
    with torch.no_grad():
        hidden = model[3](model[2](model[1](model[0](x))))
        shift = (model[4].weight[:, removed].double()
                 @ hidden[..., removed].double().mean((0, 1))).numpy()
    got, before = _params(recovered.module), _params(result.module)
    np.testing.assert_allclose(got["4.bias"], model[4].bias.detach().double().numpy() + shift,
                               rtol=1e-5, atol=1e-6)
    for name in ("0.bias", "2.bias", "0.weight", "2.weight", "4.weight"):
        np.testing.assert_array_equal(got[name], before[name])


# ------------------------------------------------------------------ lsq


def test_lsq_refits_a_bias_free_linear_layer_on_token_rows():
    """(samples, tokens, features) through a bias-free last layer: its new weight and added
    bias are the ridge solution (numpy) on every token's row; the first layer, whose kept
    outputs are unchanged, is left as it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)).eval()
    x = _inputs(40, 6, 4)
    removed = [0, 5, 6]
    result, recovered = _prune_and_recover(model, x, {"0": removed}, "lsq")
    assert recovered.report["recovery"]["layers"]["lsq"] == ["2"]
    kept = [c for c in range(8) if c not in removed]
    with torch.no_grad():
        hidden = model[1](model[0](x))[..., kept].reshape(-1, len(kept))
        want = model(x).reshape(-1, 3)
    w0 = result.module.get_parameter("2.weight").detach()
    w_ref, b_ref = ridge_reference(hidden, want, w0, np.zeros(3), 1e-6)
    got, before = _params(recovered.module), _params(result.module)
    np.testing.assert_allclose(got["2.weight"], w_ref, rtol=1e-4, atol=1e-6)
    bias = next(v for k, v in got.items() if k.startswith("2.") and "bias" in k)
    np.testing.assert_allclose(bias, b_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got["0.weight"], before["0.weight"])
    np.testing.assert_array_equal(got["0.bias"], before["0.bias"])


def test_lsq_refits_a_layer_that_lost_inputs_and_outputs_to_its_kept_outputs():
    """The middle layer of three loses inputs and outputs: it is fitted (numpy) to the
    original's outputs on the channels it keeps, from the pruned inputs."""
    model = _three_linears()
    x = _inputs(200, 4)
    result, recovered = _prune_and_recover(model, x, {"0": [1, 6], "2": [0, 4]}, "lsq")
    assert recovered.report["recovery"]["layers"]["lsq"] == ["2", "4"]
    kept_in, kept_out = [0, 2, 3, 4, 5, 7], [1, 2, 3, 5]
    with torch.no_grad():
        hidden = model[1](model[0](x))
        want = model[2](hidden)[:, kept_out]
    w0 = result.module.get_parameter("2.weight").detach()
    b0 = result.module.get_parameter("2.bias").detach()
    w_ref, b_ref = ridge_reference(hidden[:, kept_in], want, w0, b0, 1e-6)
    got = _params(recovered.module)
    np.testing.assert_allclose(got["2.weight"], w_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["2.bias"], b_ref, rtol=1e-4, atol=1e-6)


def test_lsq_refits_a_strided_convolution_with_bias():
    """Conv2d with stride 2 and padding 1 after a pruned one: the ridge solution (numpy) on
    the 3x3 patches its output positions read (unfold), bias refitted in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, stride=2, padding=1)).eval()
    x = _inputs(40, 2, 6, 6)
    removed = [2, 4]
    result, recovered = _prune_and_recover(model, x, {"0": removed}, "lsq")
    assert recovered.report["recovery"]["layers"]["lsq"] == ["2"]
    kept = [0, 1, 3, 5]
    with torch.no_grad():
        hidden = model[1](model[0](x))[:, kept]
        want = model(x)
    rows = F.unfold(hidden, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 4 * 9)
    out = want.permute(0, 2, 3, 1).reshape(-1, 4)
    w0 = result.module.get_parameter("2.weight").detach().reshape(4, -1)
    b0 = result.module.get_parameter("2.bias").detach()
    w_ref, b_ref = ridge_reference(rows, out, w0, b0, 1e-6)
    got = _params(recovered.module)
    np.testing.assert_allclose(got["2.weight"].reshape(4, -1), w_ref, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["2.bias"], b_ref, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------ distill: the schedule


class _Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def _by_hand(student, x, teacher, y, *, steps, batch, rate, seed, hidden_states=False,
             mask=None):
    """The training distill.run documents, written out: AdamW (no weight decay), the rate
    on a half cosine over the steps, seeded shuffles, a new shuffle when an epoch's next
    batch would run past the end."""
    student = copy.deepcopy(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    n = len(x)
    order, position = torch.randperm(n, generator=generator), 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = rate * (1 + math.cos(math.pi * step / steps)) / 2
        if position + batch > n:
            order, position = torch.randperm(n, generator=generator), 0
        index = order[position:position + batch]
        position += batch
        out = student(x[index]) if mask is None else student(x[index], mask[index])
        value = distill.loss([out], [teacher[index]], None if y is None else y[index],
                             None if mask is None else mask[index] > 0, hidden_states)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return student


def _run(student, fit, teacher, **kwargs):
    calls = []
    details = distill.run(student, fit, [teacher], None, None, seed=kwargs.pop("seed", 4),
                          progress=lambda msg, f: calls.append((msg, round(f, 9))),
                          **{"seconds": None, **kwargs})
    return details, calls


@pytest.mark.parametrize("hidden_states", [False, True])
def test_distill_run_is_the_seeded_cosine_schedule_written_out(hidden_states):
    """24 samples in batches of 8: three per epoch, a reshuffle when one ends (exactly:
    not one batch early); checks every 3 steps (the epoch); without held-back samples the
    last state is kept. Class scores with labels at rate 5e-3, hidden states at 1e-4."""
    x = _inputs(24, 3)
    teacher = _inputs(24, 2, seed=6) * 2
    y = None if hidden_states else torch.tensor([0, 1] * 12)
    student = _Student()
    fit = CalibrationSet([x], y)
    details, calls = _run(student, fit, teacher, steps=7, batch=8, hidden_states=hidden_states)
    assert details["steps"] == 7 and details["best_step"] == 7
    assert math.isnan(details["holdout_loss"]) and "stopped" not in details
    assert "minibatch" not in details
    assert calls == [("distilling: step 3", round(2 / 7, 9)),
                     ("distilling: step 6", round(5 / 7, 9))]
    rate = 1e-4 if hidden_states else 5e-3
    want = _by_hand(_Student(), x, teacher, y, steps=7, batch=8, rate=rate, seed=4,
                    hidden_states=hidden_states)
    for name, value in want.state_dict().items():
        assert torch.allclose(student.state_dict()[name], value, rtol=1e-5, atol=1e-7), name
    assert not torch.allclose(student.fc.weight, _Student().fc.weight, atol=rate / 2)
    assert not any(p.requires_grad for p in student.parameters())


def test_distill_run_first_step_moves_each_weight_by_the_full_rate():
    """Adam's first step is the rate times the gradient's sign: every weight moves by
    exactly 5e-3 (the cosine starts at its top)."""
    student = _Student()
    start = student.fc.weight.detach().clone()
    _run(student, CalibrationSet([_inputs(16, 3)]), _inputs(16, 2, seed=6), steps=1)
    moved = (student.fc.weight.detach() - start).abs()
    assert torch.allclose(moved, torch.full_like(moved, 5e-3), rtol=1e-4)


def test_distill_run_checks_every_fifty_steps_at_most():
    """240 samples in batches of 4 make 60 per epoch; the held-back check (and progress)
    comes every 50 steps."""
    student = _Student()
    _, calls = _run(student, CalibrationSet([_inputs(240, 3)]), _inputs(240, 2, seed=6),
                    steps=101, batch=4)
    assert [msg for msg, _ in calls] == ["distilling: step 50", "distilling: step 100"]
    assert [f for _, f in calls] == [round(49 / 101, 9), round(99 / 101, 9)]


@pytest.mark.parametrize(("batch", "expected"), [(20, 16), (5, 8), (64, 24)])
def test_distill_run_rounds_the_batch_to_whole_fixed_batches(batch, expected):
    """A fixed-batch graph of 8 and 30 samples: the batch goes down to a multiple of 8 (not
    below 8; the default 64 is first cut to the 30 samples); the training is the one
    written out with that batch."""
    x, teacher = _inputs(30, 3), _inputs(30, 2, seed=6)
    student = _Student()
    details, calls = _run(student, CalibrationSet([x], None, 8), teacher, steps=5,
                          **({} if batch == 64 else {"batch": batch}))
    assert details["minibatch"] == expected and details["steps"] == 5
    per_epoch = 30 // expected
    assert [msg for msg, _ in calls] == [f"distilling: step {s}" for s in range(1, 6)
                                         if s % per_epoch == 0]
    want = _by_hand(_Student(), x, teacher, None, steps=5, batch=expected, rate=5e-3, seed=4)
    assert torch.allclose(student.fc.weight, want.fc.weight, rtol=1e-5, atol=1e-7)


def test_distill_run_batch_is_cut_to_the_samples():
    """12 samples and the default batch of 64: every step sees all 12 (one per epoch)."""
    x, teacher = _inputs(12, 3), _inputs(12, 2, seed=6)
    student = _Student()
    details, calls = _run(student, CalibrationSet([x]), teacher, steps=3)
    assert len(calls) == 3
    want = _by_hand(_Student(), x, teacher, None, steps=3, batch=12, rate=5e-3, seed=4)
    assert torch.allclose(student.fc.weight, want.fc.weight, rtol=1e-5, atol=1e-7)


def test_distill_run_stop_ends_it_and_keeps_the_best_state():
    x, teacher = _inputs(40, 3), _inputs(40, 2, seed=6)
    held = CalibrationSet([_inputs(10, 3, seed=7)])
    student = _Student()
    start = copy.deepcopy(student.state_dict())
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 3  # three steps run, then stop

    with torch.no_grad():
        held_teacher = [student(held.xs[0])]  # the start is perfect on the held-back set
    details = distill.run(student, CalibrationSet([x]), [teacher], held, held_teacher,
                          seconds=None, steps=100, seed=0, progress=lambda *_: None,
                          batch=8, stop=stop)
    assert details["stopped"] is True and details["steps"] == 3
    assert details["best_step"] == 0 and details["holdout_loss"] == pytest.approx(0, abs=1e-12)
    for name, value in student.state_dict().items():
        assert torch.equal(value, start[name])
    # no held-back samples (an empty set): the last state is kept
    empty = CalibrationSet([x[:0]])
    details = distill.run(student, CalibrationSet([x]), [teacher], empty, [teacher[:0]],
                          seconds=None, steps=2, seed=0, progress=lambda *_: None, batch=8)
    assert math.isnan(details["holdout_loss"]) and details["best_step"] == 2
    assert not torch.equal(student.fc.weight, start["fc.weight"])


# ------------------------------------------------------------------ nested layer names


def test_each_method_names_the_nested_layers_it_changed():
    """Layers inside a block are named by their full path (`0.3`, not `0`): conv (pruned),
    GroupNorm, ReLU, bias-free conv, BatchNorm, all in block 0."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    model = nn.Sequential(block, nn.ReLU()).eval()
    x = _inputs(24, 2, 5, 5)
    result = engine.prune(_program(model, x), options={"criterion": "index"},
                          indices={"0.0": [1, 4]})
    recovered = engine.recover(result, x.numpy(), "bias,lsq,bn,norm", eval_holdout=0)
    assert recovered.report["recovery"]["layers"] == {
        "bias": ["0.3"], "lsq": ["0.3"], "bn": ["0.4"], "norm": ["0.1"]}
    names = {k for k, _ in recovered.module.named_parameters()}
    assert "0.3.bias" in names  # the bias `bias` added lives in its own layer


def test_norm_nested_layer_norm_without_bias_and_written_out_rms_get_their_own_names():
    """Inside block 0: the LayerNorm's added bias is `0.1.bias` and the model uses it; the
    written-out RMSNorm is reported as `0.3`."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, bias=False), nn.Linear(8, 8),
                          _WrittenRMS("weight last, eps 1e-2"), nn.Linear(8, 3))
    model = nn.Sequential(block).eval()
    x = _inputs(40, 4)
    result = engine.prune(_program(model, x), options={"criterion": "index"},
                          indices={"0.0": [1, 2], "0.2": [3, 5]})
    recovered = engine.recover(result, x.numpy(), "norm", eval_holdout=0)
    assert recovered.report["recovery"]["layers"]["norm"] == ["0.1", "0.3"]
    module = recovered.module
    assert "0.1.bias" in dict(module.named_parameters())
    with torch.no_grad():
        with_bias = module(x)
        module.get_parameter("0.1.bias").zero_()
        assert not torch.allclose(module(x), with_bias, atol=1e-4)  # the bias is used


def test_norm_refits_only_the_layer_norm_that_lost_channels():
    """The first LayerNorm loses channels, the second keeps all of its own: only the first
    is refitted (and listed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 5), nn.LayerNorm(5),
                          nn.Linear(5, 3)).eval()
    x = _inputs(40, 4)
    result, recovered = _prune_and_recover(model, x, {"0": [0, 3]}, "norm")
    assert recovered.report["recovery"]["layers"]["norm"] == ["1"]
    for name in ("3.weight", "3.bias"):
        np.testing.assert_array_equal(_params(recovered.module)[name],
                                      _params(result.module)[name])


def test_bias_corrects_a_layer_that_lost_inputs_and_outputs():
    """The middle layer loses inputs and outputs: its kept outputs' bias moves by
    W[kept, removed] @ mean(h[removed])."""
    model = _three_linears()
    x = _inputs(100, 4)
    _, recovered = _prune_and_recover(model, x, {"0": [1, 6], "2": [0, 4]}, "bias")
    assert recovered.report["recovery"]["layers"]["bias"] == ["2", "4"]
    kept_out, removed = [1, 2, 3, 5], [1, 6]
    with torch.no_grad():
        h = model[1](model[0](x)).double()
        w = model[2].weight.double()
        want = model[2].bias.double()[kept_out] + w[kept_out][:, removed] @ h[:, removed].mean(0)
    np.testing.assert_allclose(_params(recovered.module)["2.bias"], want.numpy(), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------ distill: held-back loss


class _Tokens(nn.Module):
    """(samples, tokens, 2) features and a 0/1 attention mask in; hidden states out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(2, 2)

    def forward(self, x, mask):
        return self.fc(x)


def test_distill_run_measures_the_held_back_loss_with_labels():
    """Stopped before any step: the held-back loss is the start's. Teacher = student, so
    only the labels count: cross entropy (torch's, not distill.loss)."""
    student = _Student()
    x = _inputs(10, 3, seed=7)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    with torch.no_grad():
        out = student(x)
    details = distill.run(student, CalibrationSet([x]), [out], CalibrationSet([x], y), [out],
                          seconds=None, steps=5, seed=0, progress=lambda *_: None,
                          stop=lambda: True)
    assert details["steps"] == 0
    assert details["holdout_loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-6)


def test_distill_run_measures_hidden_states_over_real_tokens_only():
    """Hidden states with a mask: the teacher equals the student on real tokens and is far
    off on padding, so the held-back loss is 0 (to rounding; counting padding would make it
    large), and the training is the one written out with the mask."""
    student = _Tokens()
    x = _inputs(12, 4, 2, seed=8)
    mask = torch.ones(12, 4, dtype=torch.long)
    mask[:, 3] = 0  # the last token is padding
    with torch.no_grad():
        teacher = student(x, mask)
        teacher[:, 3] += 5.0
    data = CalibrationSet([x, mask], None, None, 1)
    details = distill.run(student, data, [teacher], data, [teacher], seconds=None, steps=3,
                          seed=0, progress=lambda *_: None, hidden_states=True, batch=4)
    assert details["holdout_loss"] == pytest.approx(0.0, abs=1e-5)
    want = _by_hand(_Tokens(), x, teacher, None, steps=3, batch=4, rate=1e-4, seed=0,
                    hidden_states=True, mask=mask)
    assert torch.allclose(student.fc.weight, want.fc.weight, rtol=1e-6, atol=1e-8)


def test_distill_run_matches_hidden_states_by_squared_error_not_class_scores():
    """hidden_states: the held-back teacher is the student's output plus 1, so the loss is
    mse 1 over the teacher's variance (numpy, ddof 1); as class scores it would be 0."""
    student = _Student()
    x = _inputs(10, 3, seed=7)
    with torch.no_grad():
        teacher = student(x) + 1.0
    details = distill.run(student, CalibrationSet([x]), [teacher], CalibrationSet([x]),
                          [teacher], seconds=None, steps=5, seed=0, progress=lambda *_: None,
                          hidden_states=True, stop=lambda: True)
    assert details["holdout_loss"] == pytest.approx(1.0 / np.var(teacher.numpy(), ddof=1),
                                                    rel=1e-5)


def test_distill_run_keeps_the_first_of_equal_held_back_losses():
    """Held-back inputs of zero through a bias-free layer: every state gives the same
    held-back loss, so the start is kept although training moved the weights."""
    torch.manual_seed(4)
    student = nn.Linear(3, 2, bias=False)
    start = copy.deepcopy(student.state_dict())
    x, held = _inputs(16, 3), torch.zeros(4, 3)
    details = distill.run(student, CalibrationSet([x]), [_inputs(16, 2, seed=6)],
                          CalibrationSet([held]), [torch.zeros(4, 2)], seconds=None, steps=4,
                          seed=0, progress=lambda *_: None)
    assert details["best_step"] == 0
    assert torch.equal(student.weight, start["weight"])


def test_distill_run_returns_the_state_of_its_best_check_in_the_middle():
    """The training teacher is 1 away from the start in every weight; the held-back teacher
    0.05 away: the held-back loss falls, then rises again. The state that comes back is the
    one seen at the check with the least held-back loss (each loss recomputed by numpy)."""
    student = nn.Linear(3, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[0.5, -0.5, 0.25]]))
        student.bias.zero_()
    x, held = _inputs(8, 3), _inputs(6, 3, seed=9)
    w_far, w_near = student.weight + 1.0, student.weight + 0.05

    def line(inputs, w):
        return (inputs @ w.T).detach()

    seen = []
    details = distill.run(student, CalibrationSet([x]), [line(x, w_far)],
                          CalibrationSet([held]), [line(held, w_near)], seconds=None,
                          steps=40, seed=0, batch=8,
                          progress=lambda *_: seen.append(copy.deepcopy(student.state_dict())))
    target = line(held, w_near).numpy()

    def held_loss(state):
        out = held.numpy() @ state["weight"].numpy().T + state["bias"].numpy()
        return float(np.mean((out - target) ** 2) / np.var(target, ddof=1))

    losses = [held_loss(s) for s in seen]  # one check per step (8 samples, batch 8)
    best = int(np.argmin(losses))
    assert 0 < best < len(losses) - 1 and details["best_step"] == best + 1
    for name, value in student.state_dict().items():
        assert torch.equal(value, seen[best][name]), name


# ------------------------------------------------------------------ fixed batch, time budget


class _FixedBatchStudent(_Student):
    """A student that runs exactly 8 samples at a time, like a graph captured with a fixed
    batch (any other batch is refused)."""

    def forward(self, x):
        if x.shape[0] != 8:
            raise ValueError(f"this graph runs 8 samples at a time, not {x.shape[0]}")
        return self.fc(x)


def test_distill_run_feeds_a_fixed_batch_model_whole_batches_in_training_and_held_back():
    """Batches of 16 over a graph of 8 run as two chunks; 10 held-back samples as 8 + 8
    (the second filled with copies, their outputs dropped). The weights are the training
    written out with batches of 16; the held-back loss the softened KL divergence over the
    10 real samples, by hand."""
    x, held_x, mix = _inputs(32, 3), _inputs(10, 3, seed=7), _inputs(3, 2, seed=8) * 3
    teacher, held_teacher = x @ mix, held_x @ mix  # the training gets closer on both
    student = _FixedBatchStudent()
    details = distill.run(student, CalibrationSet([x], None, 8), [teacher],
                          CalibrationSet([held_x], None, 8), [held_teacher], seconds=None,
                          steps=2, seed=4, progress=lambda *_: None, batch=16)
    assert details["minibatch"] == 16 and details["steps"] == 2
    assert details["best_step"] == 2
    want = _by_hand(_Student(), x, teacher, None, steps=2, batch=16, rate=5e-3, seed=4)
    assert torch.allclose(student.fc.weight, want.fc.weight, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        out = student.fc(held_x).double()
    log_s, log_t = (torch.log_softmax(v / 2, -1) for v in (out, held_teacher.double()))
    by_hand = float((log_t.exp() * (log_t - log_s)).sum() / 10 * 2**2)  # KL at T = 2
    assert details["holdout_loss"] == pytest.approx(by_hand, rel=1e-5)


class _Clock:
    """A deterministic clock for distill's `time.monotonic`: 1/8 s later at every reading."""

    def __init__(self) -> None:
        self.ticks = -1

    def monotonic(self) -> float:
        self.ticks += 1
        return self.ticks / 8


def test_distill_run_time_budget_stops_when_the_seconds_are_spent(monkeypatch):
    """A 2 s budget on a clock read once at the start and once before each step, 1/8 s
    apart: step k starts at (k + 1) / 8 s, so 15 steps run and the 16th finds 2 s spent.
    Progress (every epoch of 3 steps) reports the elapsed share of the budget."""
    clock = _Clock()
    monkeypatch.setattr(distill, "time", clock)
    student = _Student()
    details, calls = _run(student, CalibrationSet([_inputs(24, 3)]), _inputs(24, 2, seed=6),
                          seconds=2.0, steps=None, batch=8)
    assert details["steps"] == 15 and details["best_step"] == 15
    assert calls == [(f"distilling: step {s}", round(s / 16, 9)) for s in (3, 6, 9, 12, 15)]


# ------------------------------------------------------------------ padding rows, refusals


class _TextModel(nn.Module):
    """Token ids and an attention mask: embeddings zeroed at padding, two linear layers
    inside a block (`blk.0`, `blk.2`)."""

    def __init__(self, last_bias: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(11, 4)
        self.blk = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, bias=last_bias))
        with torch.no_grad():
            self.blk[0].bias.uniform_(0.5, 1.5)  # padding rows: relu(bias), far from the mean

    def forward(self, input_ids, attention_mask):
        return self.blk(self.emb(input_ids) * attention_mask[..., None].to(torch.float32))


def _text_batch():
    generator = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 11, (24, 7), generator=generator)
    lengths = torch.randint(2, 8, (24,), generator=generator)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    assert 0.2 < 1 - mask.float().mean() < 0.6  # a good share of padding
    return ids, mask


def _light_pass_by_hand(model, xs, removed: dict, method, token_mask=None, may_add=None):
    """One data-light method over `xs` on the pruned model, as recover() runs it, with the
    given token mask and parameter policy; the pruned result, the context, the layers
    changed."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), tuple(x[:4] for x in xs),
                                  dynamic_shapes=tuple({0: batch} for _ in xs))
    result = engine.prune(program, options={"criterion": "index"}, indices=removed)
    structure = result.analysis.structure(result.plan.options.prunes_whole_blocks)
    layout = Layout(structure, pruned_roots(structure, result.plan))
    ctx = Context(result.analysis.gm, copy.deepcopy(result.module), layout, token_mask,
                  may_add=may_add)
    changed: list = []
    ctx.run(tuple(xs), lambda node, step: changed.append(method.correct(ctx, node, step)))
    return result, ctx, [c for c in changed if c is not None]


def _bias_of(module: nn.Module, layer: str) -> np.ndarray:
    """The bias of `layer` (added by recovery or not; zeros where there is none)."""
    params = _params(module)
    found = [v for k, v in params.items() if k.startswith(layer + ".") and "bias" in k]
    return found[0] if found else np.zeros(len(params[layer + ".weight"]))


@pytest.mark.parametrize("last_bias", [True, False])
def test_bias_averages_over_real_tokens_only_with_an_attention_mask(last_bias):
    """FLAP with a token mask: the bias moves by W[:, removed] @ the mean of the removed
    channels over the real tokens' rows only (padding rows hold relu(bias), far off)."""
    model, (ids, mask) = _TextModel(last_bias), _text_batch()
    removed = [1, 4]
    _, ctx, changed = _light_pass_by_hand(model, [ids, mask], {"blk.0": removed}, bias,
                                          token_mask=mask > 0)
    assert changed == ["blk.2"]
    with torch.no_grad():
        hidden = model.blk[1](model.blk[0](model.emb(ids) * mask[..., None]))
    w_removed = model.blk[2].weight[:, removed].detach().double()
    shift = (w_removed @ hidden[mask > 0][:, removed].double().mean(0)).numpy()
    shift_all = (w_removed @ hidden[..., removed].double().mean((0, 1))).numpy()
    assert not np.allclose(shift, shift_all, atol=1e-2)  # the padding rows would count
    np.testing.assert_allclose(_bias_of(ctx.pruned, "blk.2"),
                               _bias_of(model, "blk.2") + shift, rtol=1e-5, atol=1e-6)


def test_lsq_fits_real_tokens_only_with_an_attention_mask():
    """lsq with a token mask: the ridge solution (numpy) on the real tokens' rows only."""
    model, (ids, mask) = _TextModel(False), _text_batch()
    removed = [0, 3, 5]
    result, ctx, changed = _light_pass_by_hand(model, [ids, mask], {"blk.0": removed}, lsq,
                                               token_mask=mask > 0)
    assert changed == ["blk.2"]
    kept = [c for c in range(6) if c not in removed]
    real = mask > 0
    with torch.no_grad():
        hidden = model.blk[1](model.blk[0](model.emb(ids) * mask[..., None]))[..., kept]
        want = model(ids, mask)
    w0 = result.module.get_parameter("blk.2.weight").detach()
    w_ref, b_ref = ridge_reference(hidden[real], want[real], w0, np.zeros(3), 1e-6)
    w_all, _ = ridge_reference(hidden.reshape(-1, 3), want.reshape(-1, 3), w0, np.zeros(3), 1e-6)
    assert not np.allclose(w_ref, w_all, atol=1e-3)  # the padding rows would count
    np.testing.assert_allclose(_params(ctx.pruned)["blk.2.weight"], w_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_bias_of(ctx.pruned, "blk.2"), b_ref, rtol=1e-4, atol=1e-6)


class _Refusals:
    """A transformers-like parameter policy: no new parameter may be added (the folder must
    stay loadable); records every name it was asked about."""

    WHY = "this architecture has no place for it"

    def __init__(self) -> None:
        self.asked: list = []

    def __call__(self, name):
        self.asked.append(name)
        return self.WHY


def _nested_chain() -> nn.Module:
    """blk.0 -> relu -> blk.2 (no bias) -> relu -> blk.4 (with a bias): nested names."""
    torch.manual_seed(4)
    model = nn.Module()
    model.blk = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5, bias=False),
                              nn.ReLU(), nn.Linear(5, 3))
    model.forward = model.blk.forward
    return model


def _chain_by_hand(params: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned chain from its (pruned) parameters: the input of blk.4 and the output."""
    x = x.double()
    h = torch.relu(x @ torch.from_numpy(params["blk.0.weight"]).T
                   + torch.from_numpy(params["blk.0.bias"]))
    h = torch.relu(h @ torch.from_numpy(params["blk.2.weight"]).T)
    return h, h @ torch.from_numpy(params["blk.4.weight"]).T + torch.from_numpy(
        params["blk.4.bias"])


@pytest.mark.parametrize("method", ["bias", "lsq"])
def test_a_layer_that_may_not_get_a_bias_is_skipped_and_one_that_has_one_corrected(method):
    """Under a policy that refuses every new parameter, the bias-free `blk.2` (lost inputs
    and outputs) is left alone and recorded under its own name (asked about exactly
    `blk.2.bias`); `blk.4`, which has its bias, is corrected as usual: its bias moves by the
    mean output difference (bias) or it gets the ridge solution on its pruned inputs (lsq)."""
    model = _nested_chain()
    x = _inputs(48, 4)
    refusals = _Refusals()
    module = bias if method == "bias" else lsq
    result, ctx, changed = _light_pass_by_hand(model, [x], {"blk.0": [1, 4], "blk.2": [0, 3]},
                                               module, may_add=refusals)
    assert changed == ["blk.4"]
    assert refusals.asked == ["blk.2.bias"]
    assert ctx.skipped == {"blk.2": _Refusals.WHY}
    before, got = _params(result.module), _params(ctx.pruned)
    assert sorted(got) == sorted(before)  # no parameter added
    np.testing.assert_array_equal(got["blk.2.weight"], before["blk.2.weight"])
    hidden, out = _chain_by_hand(before, x)
    with torch.no_grad():
        want = model(x).double()
    if method == "bias":
        shift = (want.mean(0) - out.mean(0)).numpy()
        np.testing.assert_allclose(got["blk.4.bias"], before["blk.4.bias"] + shift,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["blk.4.weight"], before["blk.4.weight"])
    else:
        w_ref, b_ref = ridge_reference(hidden, want, before["blk.4.weight"],
                                       before["blk.4.bias"], 1e-6)
        np.testing.assert_allclose(got["blk.4.weight"], w_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["blk.4.bias"], b_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("has_bias", [False, True])
def test_norm_refits_scale_only_where_no_bias_may_be_added(has_bias):
    """A nested LayerNorm that lost channels under a policy refusing new parameters: without
    a bias it gets the through-origin least-squares factor per channel and no bias (asked
    about exactly `blk.1.bias`, recorded under `blk.1`); with its own bias it gets the
    polyfit slope and shift as usual and nothing is asked."""
    torch.manual_seed(0)
    model = nn.Module()
    model.blk = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, bias=has_bias), nn.Linear(6, 2))
    model.forward = model.blk.forward
    with torch.no_grad():
        model.blk[1].weight.uniform_(0.5, 1.5)
        if has_bias:
            model.blk[1].bias.uniform_(-0.5, 0.5)
    x = _inputs(50, 4, 4)
    removed = [2, 3]
    refusals = _Refusals()
    result, ctx, changed = _light_pass_by_hand(model, [x], {"blk.0": removed}, norm,
                                               may_add=refusals)
    assert changed == ["blk.1"]
    kept = [0, 1, 4, 5]
    with torch.no_grad():
        h = model.blk[0](x).double()
    z_kept, z_full = _normed_kept(h, kept, 1e-5)
    w0 = model.blk[1].weight.detach().double().numpy()[kept]
    got = _params(ctx.pruned)
    if has_bias:
        slope, shift = _affine_fits(z_kept, z_full)
        assert refusals.asked == [] and ctx.skipped == {}
        b0 = model.blk[1].bias.detach().double().numpy()[kept]
        np.testing.assert_allclose(got["blk.1.weight"], w0 * slope, rtol=1e-5)
        np.testing.assert_allclose(got["blk.1.bias"], b0 + w0 * shift, rtol=1e-5, atol=1e-7)
    else:
        factor = (z_kept * z_full).sum(0) / (z_kept * z_kept).sum(0)
        assert not np.allclose(factor, _affine_fits(z_kept, z_full)[0], atol=1e-4)
        assert refusals.asked == ["blk.1.bias"] and ctx.skipped == {"blk.1": _Refusals.WHY}
        assert sorted(got) == sorted(_params(result.module))  # no bias added
        np.testing.assert_allclose(got["blk.1.weight"], w0 * factor, rtol=1e-5)
