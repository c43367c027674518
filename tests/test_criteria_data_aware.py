"""Data-aware criteria (activation, wanda, taylor, fluctuation): each one against a hand
computation written here in plain torch on the nn.Module (never the engine's code), the score
cache, the one-line error without calibration data, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
import engine.scoring.analysis
from engine.errors import OptionError
from engine.options import CRITERIA, LAYER_NORMS
from engine.scoring.data_aware import DATA_CRITERIA
from tests.helpers import cli, one_error_line


class ConvNet(nn.Module):
    """conv1 -> relu -> conv2 -> global mean (logits): conv1's channels are conv2's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x))).mean(dim=(2, 3))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class GroupedReader(nn.Module):
    """conv1's 8 channels are read by a grouped convolution (2 groups of 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        return self.out(F.relu(self.grouped(h))).mean(dim=(2, 3))


def _setup(model: nn.Module, shape: tuple[int, ...], classes: int, n: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    model = model.eval()
    for p in model.parameters():  # varied scales so that a wrong formula shows
        p.data.mul_(torch.empty_like(p).uniform_(0.5, 2.0))
    channel_scale = torch.linspace(0.3, 2.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    x = torch.randn(n, *shape) * channel_scale
    y = torch.randint(0, classes, (n,))
    return model, x, y


def _scores(model, x, calibration, criterion):
    analysis = engine.analyze(model, (x[:4],))  # fixed batch of 4: 12 samples = 3 batches
    return analysis.filter_scores(criterion, calibration)


def _input_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each channel (dim 1 for images, the last dim for vectors) over the rest."""
    moved = x.movedim(1, -1) if x.dim() > 2 else x
    return moved.reshape(-1, moved.shape[-1]).double().norm(dim=0)


def _variance(x: torch.Tensor) -> torch.Tensor:
    moved = x.movedim(1, -1) if x.dim() > 2 else x
    return moved.reshape(-1, moved.shape[-1]).double().var(dim=0, unbiased=False)


def _abs_sum_except(t: torch.Tensor, keep: int) -> torch.Tensor:
    return t.double().abs().movedim(keep, 0).reshape(t.shape[keep], -1).sum(1)


# ------------------------------------------------------------------ hand computations
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_activation_is_the_mean_absolute_output_of_each_filter(kind):
    model, x, y = _setup(ConvNet() if kind == "conv" else MLP(), (3, 5, 5) if kind == "conv"
                         else (5,), 4 if kind == "conv" else 3)
    first = model.conv1 if kind == "conv" else model.fc1
    scores = _scores(model, x, x.numpy(), "activation")
    with torch.no_grad():
        out = first(x).double()
    expected = out.abs().movedim(1, -1).reshape(-1, out.shape[1]).mean(0)
    name = "conv1.weight" if kind == "conv" else "fc1.weight"
    np.testing.assert_allclose(scores[(name, 0)], expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_wanda_sums_the_weights_the_channel_removes_times_their_input_norms(kind):
    conv = kind == "conv"
    model, x, y = _setup(ConvNet() if conv else MLP(), (3, 5, 5) if conv else (5,),
                         4 if conv else 3)
    first, second = (model.conv1, model.conv2) if conv else (model.fc1, model.fc2)
    with torch.no_grad():
        hidden = F.relu(first(x))
    w1, w2 = first.weight.detach().double(), second.weight.detach().double()
    n_in, n_hidden = _input_norm(x), _input_norm(hidden)
    # row: |W1[c, j, ...]| * ||x_j||, every kernel tap of input j sharing its norm
    per_input = w1.abs().reshape(w1.shape[0], w1.shape[1], -1).sum(-1)
    row = (per_input * n_in[None, :]).sum(1)
    # column: |W2[i, c, ...]| * ||h_c||
    column = _abs_sum_except(w2, 1) * n_hidden
    scores = _scores(model, x, x.numpy(), "wanda")
    name = "conv1.weight" if conv else "fc1.weight"
    np.testing.assert_allclose(scores[(name, 0)], (row + column).numpy(), rtol=1e-6)


@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_taylor_is_weight_times_gradient_of_the_calibration_loss(kind, labelled):
    conv = kind == "conv"
    model, x, y = _setup(ConvNet() if conv else MLP(), (3, 5, 5) if conv else (5,),
                         4 if conv else 3)
    first, second = (model.conv1, model.conv2) if conv else (model.fc1, model.fc2)
    logits = model(x)
    # without labels: cross-entropy with the model's own top-1 predictions
    target = y if labelled else logits.detach().argmax(1)
    loss = F.cross_entropy(logits, target)  # mean over the 12 calibration samples
    g1, g2 = torch.autograd.grad(loss, [first.weight, second.weight])
    row = _abs_sum_except(first.weight.detach() * g1, 0)
    column = _abs_sum_except(second.weight.detach() * g2, 1)
    calibration = {"x": x.numpy(), "y": y.numpy()} if labelled else x.numpy()
    scores = _scores(model, x, calibration, "taylor")
    name = "conv1.weight" if conv else "fc1.weight"
    np.testing.assert_allclose(scores[(name, 0)], (row + column).numpy(), rtol=1e-4)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_fluctuation_is_input_variance_times_squared_reader_column(kind):
    conv = kind == "conv"
    model, x, y = _setup(ConvNet() if conv else MLP(), (3, 5, 5) if conv else (5,),
                         4 if conv else 3)
    first, second = (model.conv1, model.conv2) if conv else (model.fc1, model.fc2)
    with torch.no_grad():
        hidden = F.relu(first(x))
    w2 = second.weight.detach().double()
    squared_column = (w2 * w2).movedim(1, 0).reshape(w2.shape[1], -1).sum(1)
    expected = _variance(hidden) * squared_column
    scores = _scores(model, x, x.numpy(), "fluctuation")
    name = "conv1.weight" if conv else "fc1.weight"
    np.testing.assert_allclose(scores[(name, 0)], expected.numpy(), rtol=1e-6)


def test_grouped_reader_columns_are_the_blocks_of_the_dense_equivalent():
    model, x, _ = _setup(GroupedReader(), (3, 4, 4), 2)
    with torch.no_grad():
        hidden = F.relu(model.conv1(x))
    # the grouped convolution as an ordinary 8 -> 8 convolution with zero off-diagonal blocks
    w = model.grouped.weight.detach().double()
    dense = torch.zeros(8, 8, 3, 3, dtype=torch.float64)
    dense[:4, :4] = w[:4]
    dense[4:, 4:] = w[4:]
    with torch.no_grad():
        same = F.conv2d(hidden.double(), dense, model.grouped.bias.double(), padding=1)
        np.testing.assert_allclose(same, model.grouped(hidden).double(), atol=1e-5)
    fluctuation = _variance(hidden) * (dense * dense).sum(dim=(0, 2, 3))
    w1 = model.conv1.weight.detach().double()
    wanda = (w1.abs().reshape(8, 3) * _input_norm(x)[None]).sum(1) \
        + dense.abs().sum(dim=(0, 2, 3)) * _input_norm(hidden)
    analysis = engine.analyze(model, (x[:4],))
    key = ("conv1.weight", 0)
    np.testing.assert_allclose(analysis.filter_scores("fluctuation", x.numpy())[key],
                               fluctuation.numpy(), rtol=1e-6)
    np.testing.assert_allclose(analysis.filter_scores("wanda", x.numpy())[key], wanda.numpy(),
                               rtol=1e-6)


def test_only_the_first_256_samples_are_used():
    model, x, _ = _setup(MLP(), (5,), 3, n=300)
    many = _scores(model, x, x.numpy(), "activation")[("fc1.weight", 0)]
    first = _scores(model, x, x[:256].numpy(), "activation")[("fc1.weight", 0)]
    np.testing.assert_array_equal(many, first)
    fewer = _scores(model, x, x[:200].numpy(), "activation")[("fc1.weight", 0)]
    assert not np.allclose(many, fewer)


# ---------------------------------------------------------------------------- caching
def test_scores_are_computed_once_per_criterion_and_calibration(monkeypatch):
    calls = []
    real = engine.scoring.analysis.DataAwareScorer

    class Counting(real):
        def scores(self, criterion):
            calls.append(criterion)
            return super().scores(criterion)

    monkeypatch.setattr(engine.scoring.analysis, "DataAwareScorer", Counting)
    model, x, y = _setup(ConvNet(), (3, 5, 5), 4)
    analysis = engine.analyze(model, (x[:4],))
    calibration = {"x": x.numpy(), "y": y.numpy()}
    for criterion in DATA_CRITERIA:
        first = engine.plan(analysis, {"criterion": criterion}, ratio=0.5,
                            calibration=calibration)
        for norm in LAYER_NORMS:
            for policy in ("sum", "backward"):
                engine.plan(analysis, {"criterion": criterion, "layer_norm": norm,
                                       "policy": policy}, ratio=0.3, calibration=calibration)
        # equal data in new arrays (a reloaded file) is the same calibration
        again = engine.plan(analysis, {"criterion": criterion}, ratio=0.5,
                            calibration={"x": x.numpy().copy(), "y": y.numpy().copy()})
        assert [g.pruned.tolist() for g in again.groups] == \
            [g.pruned.tolist() for g in first.groups]
    assert calls == list(DATA_CRITERIA)
    # other data is another calibration: scored again
    engine.plan(analysis, {"criterion": "wanda"}, ratio=0.5, calibration=x.numpy() * 2)
    assert calls == [*DATA_CRITERIA, "wanda"]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_missing_calibration_is_one_line_naming_the_flag(capfd, tmp_path, criterion):
    assert criterion in CRITERIA
    rc, out, err = cli(capfd, "prune", "demo", "--criterion", criterion, "--ratio", "0.5",
                       "--out", tmp_path)
    assert rc == 2
    line = one_error_line(err)
    assert f"--criterion {criterion} needs --calibration FILE.npz" in line
    assert not any(tmp_path.iterdir())
    with pytest.raises(OptionError, match="needs --calibration"):
        engine.score("demo", None, {"criterion": criterion})


def test_taylor_labels_of_the_wrong_shape_are_one_line(capfd, tmp_path):
    from engine.demo import load_demo_eval

    x, y = load_demo_eval()
    path = tmp_path / "c.npz"
    np.savez(path, x=x[:64], y=np.stack([y[:64], y[:64]], axis=1))
    rc, _, err = cli(capfd, "scores", "demo", "--criterion", "taylor", "--calibration", path)
    assert rc == 2
    assert "labels y have shape (N, 2)" in one_error_line(err)


# ------------------------------------------------------------------------- end to end
def test_prune_demo_with_wanda_writes_a_verified_model(capfd, tmp_path):
    # --calibration demo: the demo's own calibration set (its training split)
    out = tmp_path / "D"
    rc, stdout, err = cli(capfd, "prune", "demo", "--criterion", "wanda", "--calibration",
                          "demo", "--ratio", "0.5", "--out", out)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["criterion"] == "wanda"
    assert report["verification"]["output_shapes_match"]
    assert report["verification"]["relative_diff_vs_masked"] <= 1e-4 or \
        report["verification"]["inexact_groups"]
    assert report["onnx"]["max_abs_diff_vs_torch"] < 1e-3
    assert report["after"]["params"] < report["before"]["params"]
    # wanda removes other channels than l2 does
    l2_out = tmp_path / "l2"
    assert cli(capfd, "prune", "demo", "--ratio", "0.5", "--no-onnx", "--out", l2_out)[0] == 0
    l2_report = json.loads((l2_out / "report.json").read_text())
    assert [g["pruned"] for g in report["groups"]] != [g["pruned"] for g in l2_report["groups"]]
    program = torch.export.load(out / "model.pt2")
    from engine.demo import load_demo_eval

    x, _ = load_demo_eval()
    assert program.module()(torch.from_numpy(x[:5])).shape == (5, 10)


def test_a_residual_channel_sums_every_reader_and_scores_every_member_alike():
    from tests.zoo import ConvBNResidual

    model, x, _ = _setup(ConvBNResidual(), (3, 6, 6), 5)
    for bn in (model.bn_a, model.bn_b):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        a = F.relu(model.bn_a(model.conv_a(x)))
        y = a + model.conv_c(F.relu(model.bn_b(model.conv_b(a))))
        pooled = y.mean(dim=(2, 3))
    wb, wh = model.conv_b.weight.detach().double(), model.head.weight.detach().double()
    expected = _variance(a) * (wb * wb).sum(dim=(0, 2, 3)) + _variance(pooled) * (wh * wh).sum(0)
    scores = _scores(model, x, x.numpy(), "fluctuation")
    np.testing.assert_allclose(scores[("conv_a.weight", 0)], expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(scores[("conv_c.weight", 0)], expected.numpy(), rtol=1e-6)


def test_calibration_by_name_or_path_is_the_same_data_and_the_same_cache_entry(tmp_path):
    from engine.demo import DEMO_CALIB_PATH

    analysis = engine.analyze("demo")
    with np.load(DEMO_CALIB_PATH) as data:
        arrays = {"x": data["x"], "y": data["y"]}
    by_arrays = engine.plan(analysis, {"criterion": "taylor"}, ratio=0.3, calibration=arrays)
    assert analysis.score_computations == 1
    for given in ("demo", DEMO_CALIB_PATH, str(DEMO_CALIB_PATH)):
        plan = engine.plan(analysis, {"criterion": "taylor"}, ratio=0.3, calibration=given)
        assert [g.pruned.tolist() for g in plan.groups] == \
            [g.pruned.tolist() for g in by_arrays.groups]
    assert analysis.score_computations == 1
    # without the labels taylor falls back to the model's own predictions: other scores
    engine.plan(analysis, {"criterion": "taylor"}, ratio=0.3, calibration=arrays["x"])
    assert analysis.score_computations == 2


class TinyLM(nn.Module):
    """token ids -> embedding -> fc1 -> relu -> fc2 -> (N, T, vocab) logits."""

    def __init__(self, vocab: int = 11, dim: int = 6, hidden: int = 9) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.fc2(F.relu(self.fc1(self.embed(ids))))


def test_language_model_scores_next_tokens_and_one_hot_embedding_inputs():
    torch.manual_seed(1)
    model = TinyLM().eval()
    ids = torch.randint(0, 11, (12, 7))
    ids[:, 0] = 3  # a frequent token, so the counts differ
    analysis = engine.analyze(model, (ids[:4],))
    # taylor without labels: next-token cross-entropy, mean over every predicted position
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    g_embed, g1, g2 = torch.autograd.grad(loss, [model.embed.weight, model.fc1.weight,
                                                 model.fc2.weight])
    w_embed, w1, w2 = (p.detach() for p in (model.embed.weight, model.fc1.weight,
                                            model.fc2.weight))
    taylor = analysis.filter_scores("taylor", ids.numpy())
    np.testing.assert_allclose(taylor[("fc1.weight", 0)],
                               (_abs_sum_except(w1 * g1, 0) + _abs_sum_except(w2 * g2, 1)),
                               rtol=1e-4)
    # the embedding's filters are its columns (the hidden size); fc1 reads them
    np.testing.assert_allclose(taylor[("embed.weight", 1)],
                               (_abs_sum_except(w_embed * g_embed, 1)
                                + _abs_sum_except(w1 * g1, 1)), rtol=1e-4)
    # wanda: the embedding row of channel d reads one-hot tokens, ||X_j|| = sqrt(count of j)
    counts = torch.bincount(ids.reshape(-1), minlength=11).double()
    with torch.no_grad():
        embedded = model.embed(ids)
    expected = (w_embed.double().abs() * counts.sqrt()[:, None]).sum(0) \
        + _abs_sum_except(w1, 1) * embedded.reshape(-1, 6).double().norm(dim=0)
    np.testing.assert_allclose(analysis.filter_scores("wanda", ids.numpy())[("embed.weight", 1)],
                               expected.numpy(), rtol=1e-6)
