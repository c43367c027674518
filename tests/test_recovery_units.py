"""Recovery methods on tiny models, against references worked out here (numpy's polyfit, a
closed form, numbers by hand): each test takes well under a second, so the `recovery`
mutation target (bench/mutation.py) runs every mutant of bias/bn/lsq/norm/distill in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.quality.recovery import distill, lsq, norm
from engine.quality.recovery.bn import batch_stats
from tests.helpers import ridge_reference

GEN_SEED = 5


def _program(model: nn.Module, x: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model.eval(), (x[:4],), dynamic_shapes=({0: batch},))


def _inputs(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(GEN_SEED))


# ------------------------------------------------------------------------------ bn


def test_batch_stats_are_per_channel_population_statistics():
    # channel 0 holds 1, 2, 3, 6 (mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5);
    # channel 1 holds 0, 0, 4, 4 (mean 2, variance 4)
    x = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]], [[[3.0, 6.0]], [[4.0, 4.0]]]])
    mean, var = batch_stats(x)
    assert mean.tolist() == [3.0, 2.0] and var.tolist() == [3.5, 4.0]
    assert mean.dtype == torch.float64


def test_bn_recomputes_only_the_batch_norm_whose_input_changed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)).eval()
    with torch.no_grad():
        for bn_module in (model[1], model[4]):
            bn_module.running_mean.uniform_(-1, 1)
            bn_module.running_var.uniform_(0.5, 2)
    x = _inputs(64, 2, 5, 5)
    result = engine.prune(_program(model, x), options={"criterion": "index"},
                          indices={"0": [1]})
    recovered = engine.recover(result, x.numpy(), "bn", eval_holdout=0)
    assert recovered.report["recovery"]["layers"]["bn"] == ["4"]
    kept = [0, 2, 3]
    with torch.no_grad():  # the pruned network by hand, up to the second batch norm
        h = F.conv2d(x, model[0].weight[kept], model[0].bias[kept], padding=1)
        h = F.batch_norm(h, model[1].running_mean[kept], model[1].running_var[kept],
                         model[1].weight[kept], model[1].bias[kept], eps=model[1].eps)
        h = F.conv2d(h.relu(), model[3].weight[:, kept], model[3].bias, padding=1).double()
    mean = h.mean(dim=(0, 2, 3))
    var = ((h - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    module = recovered.module
    assert torch.allclose(module.get_buffer("4.running_mean").double(), mean, atol=1e-5)
    assert torch.allclose(module.get_buffer("4.running_var").double(), var, rtol=1e-5)
    # the first batch norm saw its kept channels unchanged: its statistics stay
    assert torch.equal(module.get_buffer("1.running_mean"), model[1].running_mean[kept])
    assert torch.equal(module.get_buffer("1.running_var"), model[1].running_var[kept])


# ------------------------------------------------------------------------------ lsq


def test_lsq_solve_recovers_an_exact_linear_map():
    x = _inputs(40, 3)
    w_true = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    b_true = torch.tensor([0.25, -1.0])
    w, b = lsq.solve(x, x @ w_true.T + b_true, torch.zeros(2, 3), torch.zeros(2))
    assert torch.allclose(w, w_true.double(), atol=1e-4)
    assert torch.allclose(b, b_true.double(), atol=1e-4)
    assert w.dtype == torch.float64 and w.shape == (2, 3) and b.shape == (2,)


def test_lsq_solve_with_a_strong_ridge_matches_the_closed_form():
    x = _inputs(30, 4) * torch.tensor([1.0, 3.0, 0.5, 2.0])
    y = _inputs(30, 2) + 2.0
    w0 = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
    b0 = torch.tensor([3.0, -3.0])
    # the last: inputs of 1e-3, whose energy (about 1e-4) is far below 1
    for ridge, scale in ((0.5, 1.0), (3.0, 1.0), (3.0, 1e-3)):
        w, b = lsq.solve(x * scale, y, w0, b0, ridge=ridge)
        w_ref, b_ref = ridge_reference(x * scale, y, w0, b0, ridge)
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-9, atol=1e-9)


def test_lsq_solve_keeps_the_prior_weight_of_an_input_that_is_always_zero():
    x = _inputs(25, 3)
    x[:, 1] = 0.0
    w0 = torch.tensor([[7.0, -4.0, 1.0]])
    w, _ = lsq.solve(x, _inputs(25, 1), w0, torch.zeros(1))
    assert float(w[0, 1]) == pytest.approx(-4.0, abs=1e-9)


def test_lsq_solve_without_inputs_fits_the_mean():
    y = torch.tensor([[1.0], [2.0], [6.0]])
    w, b = lsq.solve(torch.zeros(3, 0), y, torch.zeros(1, 0), torch.zeros(1))
    assert w.shape == (1, 0)
    assert float(b[0]) == pytest.approx(3.0, abs=1e-6)


# ------------------------------------------------------------------------------ norm


def test_fit_affine_by_hand():
    z = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[3.0, 2.0], [5.0, 2.0], [7.0, 5.0]])
    a, c = norm.fit_affine(z, y, with_bias=True)
    # column 0: y = 2 z + 1 exactly; column 1: polyfit of (1, 2, 4) -> (2, 2, 5)
    slope, intercept = np.polyfit([1.0, 2.0, 4.0], [2.0, 2.0, 5.0], 1)
    np.testing.assert_allclose(a.numpy(), [2.0, slope], rtol=1e-12)
    np.testing.assert_allclose(c.numpy(), [1.0, intercept], rtol=1e-12, atol=1e-12)
    a, c = norm.fit_affine(z, y, with_bias=False)
    # through the origin: sum(z y) / sum(z z) = 34 / 14 and 26 / 21
    np.testing.assert_allclose(a.numpy(), [34 / 14, 26 / 21], rtol=1e-12)
    assert c is None
    # small values (sum z^2 = 0.05 < 1): 0.1 * 0.3 + 0.2 * 0.6 = 0.15 over 0.05 = 3
    a, _ = norm.fit_affine(torch.tensor([[0.1], [0.2]], dtype=torch.float64),
                           torch.tensor([[0.3], [0.6]], dtype=torch.float64), with_bias=False)
    assert float(a[0]) == pytest.approx(3.0, rel=1e-12)


def _norm_model(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        if getattr(model[1], "bias", None) is not None:
            model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_refits_the_affine_of_a_normalisation_that_lost_channels(kind):
    layer = nn.LayerNorm(6) if kind == "layer" else nn.RMSNorm(6, eps=1e-3)
    model = _norm_model(layer)
    x = _inputs(300, 4)
    result = engine.prune(_program(model, x), options={"criterion": "index"},
                          indices={"0": [1, 4]})
    recovered = engine.recover(result, x.numpy(), "norm", eval_holdout=0)
    assert recovered.report["recovery"]["layers"]["norm"] == ["1"]
    kept = [0, 2, 3, 5]
    with torch.no_grad():
        h = model[0](x).double()
    if kind == "layer":  # LayerNorm without its affine, over all channels and over the kept
        def unit(v):
            return (v - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False,
                                                                    keepdim=True) + 1e-5)
    else:
        def unit(v):
            return v / torch.sqrt((v * v).mean(1, keepdim=True) + 1e-3)
    z_full, z_kept = unit(h)[:, kept].numpy(), unit(h[:, kept]).numpy()
    w0 = model[1].weight.detach().double()[kept].numpy()
    params = {k: v.detach() for k, v in recovered.module.named_parameters()}
    if kind == "layer":
        fits = [np.polyfit(z_kept[:, j], z_full[:, j], 1) for j in range(len(kept))]
        slope = np.array([f[0] for f in fits])
        shift = np.array([f[1] for f in fits])
        b0 = model[1].bias.detach().double()[kept].numpy()
        np.testing.assert_allclose(params["1.bias"].double().numpy(), b0 + w0 * shift,
                                   rtol=1e-5, atol=1e-6)
    else:
        slope = (z_kept * z_full).sum(0) / (z_kept * z_kept).sum(0)
        assert "1.bias" not in params
    np.testing.assert_allclose(params["1.weight"].double().numpy(), w0 * slope, rtol=1e-5)
    assert not np.allclose(slope, 1.0, atol=1e-3)  # the fit did change something


# ------------------------------------------------------------------------------ distill


def test_distill_loss_by_hand():
    zero = torch.zeros(1, 2)
    # equal outputs: no distillation term; the label adds cross entropy ln 2
    assert float(distill.loss([zero], [zero], torch.tensor([0]))) == pytest.approx(math.log(2))
    assert float(distill.loss([zero], [zero], None)) == 0.0
    # teacher softened to (3/4, 1/4) at temperature 2, student (1/2, 1/2): T^2 KL(t || s)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(distill.loss([zero], [teacher], None)) == pytest.approx(4 * kl, rel=1e-6)
    # outputs without a class dimension (or with one value per row): squared error over the
    # teacher's variance; mse (0.2^2 / 3) / var(0.1, 0.2, 0.3) = (0.04 / 3) / 0.01 = 4 / 3
    s, t = torch.tensor([0.1, 0.2, 0.5]), torch.tensor([0.1, 0.2, 0.3])
    assert float(distill.loss([s], [t], None)) == pytest.approx(4 / 3, rel=1e-5)
    assert float(distill.loss([s[:, None]], [t[:, None]], None)) == pytest.approx(4 / 3, rel=1e-5)
    # integer outputs are skipped, the outputs after them still count; a label only counts
    # on the first output
    ints = torch.ones(3, dtype=torch.long)
    assert float(distill.loss([ints, zero], [ints * 0, teacher], torch.tensor([0]))) == \
        pytest.approx(4 * kl, rel=1e-6)


def test_distill_loss_on_per_token_class_scores():
    # (batch 1, 2 tokens, 3 classes), equal scores: only the labels' cross entropy, ln 3
    zeros = torch.zeros(1, 2, 3)
    got = distill.loss([zeros], [zeros], torch.tensor([[0, 2]]))
    assert float(got) == pytest.approx(math.log(3.0), rel=1e-6)
    # one token (batch 2, 1 token, 2 classes): still class scores, the temperature-softened
    # KL of (3/4, 1/4) against (1/2, 1/2) per row, times T^2 = 4
    teacher = torch.tensor([[[2 * math.log(3.0), 0.0]], [[2 * math.log(3.0), 0.0]]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    got = distill.loss([torch.zeros(2, 1, 2)], [teacher], None)
    assert float(got) == pytest.approx(4 * kl, rel=1e-6)


def test_distill_loss_on_hidden_states():
    t = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # (batch 1, 3 tokens, 2)
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])  # the third token is padding
    # real tokens: s - t = (0, 0, 0, -2): mse 1, over var(1, 0, 0, 2) = 11/12;
    # pooled (mean over real tokens): s (0.5, 0), t (0.5, 1): cos = 0.25 / (0.5 * sqrt(1.25))
    cos = 0.25 / (0.5 * math.sqrt(1.25))
    expected = 1 / (11 / 12) + (1 - cos) * distill.COSINE_WEIGHT
    got = distill.loss([s], [t], None, mask=mask, hidden_states=True)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # a second, pooled (2-D) output is matched whole, without the mask: mse 4 / 2 over var 2
    pooled_s, pooled_t = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, -1.0]])
    both = distill.loss([s, pooled_s], [t, pooled_t], None, mask=mask, hidden_states=True)
    assert float(both) == pytest.approx(expected + ((1 + 9) / 2) / 2, rel=1e-6)
    # without a mask every token counts and there is no cosine term: squares 0 0 0 4 16 16,
    # mse 6, over var(1, 0, 0, 2, 5, 5) = 161 / 30
    unmasked = distill.loss([s], [t], None, hidden_states=True)
    assert float(unmasked) == pytest.approx(6 / (161 / 30), rel=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_lsq_refits_a_bias_free_convolution_to_the_closed_form(groups):
    """conv -> relu -> conv without bias (grouped or not): the second conv's new weights and
    the bias lsq adds are the ridge solution on its unfolded 3x3 input patches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1, groups=groups, bias=False)).eval()
    x = _inputs(48, 2, 5, 5)
    removed = [1, 5] if groups == 2 else [1, 2]  # one channel from each half when grouped
    result = engine.prune(_program(model, x), options={"criterion": "index"},
                          indices={"0": removed})
    recovered = engine.recover(result, x.numpy(), "lsq", eval_holdout=0)
    assert "2" in recovered.report["recovery"]["layers"]["lsq"]
    kept = [c for c in range(8) if c not in removed]
    with torch.no_grad():
        hidden = F.conv2d(x, model[0].weight[kept], model[0].bias[kept], padding=1).relu()
        want = model(x)  # the original's output: what the refit aims at
    w0 = result.module.get_parameter("2.weight").detach()
    params = {k: v.detach() for k, v in recovered.module.named_parameters()}
    per_in, per_out = len(kept) // groups, 4 // groups
    for g in range(groups):
        patches = F.unfold(hidden[:, g * per_in:(g + 1) * per_in], 3, padding=1)
        rows = patches.transpose(1, 2).reshape(-1, per_in * 9)
        out = want[:, g * per_out:(g + 1) * per_out].permute(0, 2, 3, 1).reshape(-1, per_out)
        w_ref, b_ref = ridge_reference(rows, out, w0[g * per_out:(g + 1) * per_out]
                                        .reshape(per_out, -1), np.zeros(per_out), lsq.RIDGE)
        got_w = params["2.weight"][g * per_out:(g + 1) * per_out].reshape(per_out, -1)
        np.testing.assert_allclose(got_w.double().numpy(), w_ref, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(params["2.bias"][g * per_out:(g + 1) * per_out]
                                   .double().numpy(), b_ref, rtol=1e-3, atol=1e-5)
