"""Criteria against independent computations: explicit loops and numpy.linalg.svd."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.scoring.criteria as criteria
from engine.errors import OptionError, PruneScopeError
from engine.options import CRITERIA
from engine.scoring.criteria import (
    CRITERIA_NEEDING_CALIBRATION,
    WEIGHT_CRITERIA,
    nuclear_norm_scores,
    random_scores,
    weight_scores,
    weight_scores_by_dim,
)

ROOT = Path(__file__).resolve().parents[1]


def loop_norms(w: np.ndarray, out_dim: int, p: int) -> np.ndarray:
    w = np.moveaxis(w, out_dim, 0)
    out = []
    for c in range(w.shape[0]):
        flat = w[c].ravel()
        out.append(sum(abs(x) ** p for x in flat) ** (1.0 / p))
    return np.array(out)


def loop_gm(w: np.ndarray, out_dim: int = 0) -> np.ndarray:
    f = np.moveaxis(w, out_dim, 0).reshape(w.shape[out_dim], -1)
    return np.array(
        [sum(np.sqrt(np.sum((f[c] - f[j]) ** 2)) for j in range(len(f))) for c in range(len(f))]
    )


def test_criterion_sets_are_option_values():
    assert WEIGHT_CRITERIA <= set(CRITERIA)
    assert CRITERIA_NEEDING_CALIBRATION <= set(CRITERIA)


@pytest.mark.parametrize("out_dim", [0, 1, -1])
@pytest.mark.parametrize(("criterion", "p"), [("l2", 2), ("l1", 1)])
def test_l1_l2_match_loops(criterion, p, out_dim):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, 3, 2, generator=g, dtype=torch.float64)
    got = weight_scores(w, out_dim, criterion)
    assert got.dtype == np.float64 and got.shape == (w.shape[out_dim],)
    np.testing.assert_allclose(got, loop_norms(w.numpy(), out_dim, p), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_scored_in_high_precision(dtype):
    # 4096 entries of 1.0 in bf16: a bf16 accumulator would stop counting at 256.
    w = torch.ones(3, 4096, dtype=dtype)
    w[1] *= 2
    np.testing.assert_allclose(weight_scores(w, 0, "l1"), [4096, 8192, 4096])
    np.testing.assert_allclose(weight_scores(w, 0, "l2"), [64, 128, 64])
    r = torch.randn(5, 7).to(dtype)
    ref = r.to(torch.float64).numpy()
    np.testing.assert_allclose(weight_scores(r, 0, "gm"), loop_gm(ref), rtol=1e-6)


def test_the_spec_single_weight_filters():
    # Worked example: 1x1 convs whose filters have one non-zero weight: l1 = l2 = that weight.
    s_x = [11.0, 19.0, 38.0, 25.0, 46.0]
    w = torch.zeros(5, 5, 1, 1)
    for c, v in enumerate(s_x):
        w[c, (c + 2) % 5, 0, 0] = v
    np.testing.assert_allclose(weight_scores(w, 0, "l1"), s_x)
    np.testing.assert_allclose(weight_scores(w, 0, "l2"), s_x)


@pytest.mark.parametrize("out_dim", [0, 1])
def test_gm_matches_double_loop(out_dim):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(9, 5, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(weight_scores(w, out_dim, "gm"), loop_gm(w.numpy(), out_dim))


def test_gm_scores_redundant_filters_low():
    w = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [-5.0, 4.0]])
    s = weight_scores(w, 0, "gm")
    assert s.argmax() == 3  # the outlier is the least redundant
    np.testing.assert_allclose(s, loop_gm(w.numpy().astype(np.float64)), rtol=1e-6)


def test_gm_chunked_float32_path_with_large_offset(monkeypatch):
    # Force the big-layer path (float32 matrix, several row chunks) on a small layer.
    monkeypatch.setattr(criteria, "_GM_FLOAT64_LIMIT", 10)
    monkeypatch.setattr(criteria, "_CHUNK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(3)
    # A large common offset: |a|^2 + |b|^2 - 2ab would cancel badly without centring.
    w = 1000.0 + torch.randn(37, 11, generator=g, dtype=torch.float64)
    got = weight_scores(w.to(torch.float32), 0, "gm")
    ref = loop_gm(w.to(torch.float32).to(torch.float64).numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_l2_chunked(monkeypatch):
    monkeypatch.setattr(criteria, "_NORM_CHUNK_ELEMENTS", 16)
    w = torch.randn(13, 7, dtype=torch.float64)
    np.testing.assert_allclose(weight_scores(w, 0, "l2"), loop_norms(w.numpy(), 0, 2))


@pytest.mark.parametrize(("criterion", "p"), [("l2", 2), ("l1", 1)])
def test_column_norms_chunked_over_rows(monkeypatch, criterion, p):
    # an embedding scored by its columns, worked through a few rows at a time
    monkeypatch.setattr(criteria, "_NORM_CHUNK_ELEMENTS", 10)
    w = torch.randn(11, 5, 3, dtype=torch.float64)
    for out_dim in (1, 2):
        np.testing.assert_allclose(weight_scores(w, out_dim, criterion),
                                   loop_norms(w.numpy(), out_dim, p), rtol=1e-12)
    half = torch.randn(37, 6).to(torch.bfloat16)
    np.testing.assert_allclose(weight_scores(half, 1, criterion),
                               loop_norms(half.double().numpy(), 1, p), rtol=1e-12)


def test_weight_scores_errors():
    with pytest.raises(OptionError, match="random"):
        weight_scores(torch.ones(2, 2), 0, "random")
    with pytest.raises(PruneScopeError, match="out_dim=2"):
        weight_scores(torch.ones(2, 2), 2, "l2")
    with pytest.raises(PruneScopeError, match="scalar"):
        weight_scores(torch.tensor(1.0), 0, "l2")
    with pytest.raises(PruneScopeError, match="Tensor"):
        weight_scores(np.ones((2, 2)), 0, "l2")


def test_random_scores_are_seeded_by_seed_and_key():
    a = random_scores(50, 0, "blocks.0.conv")
    assert a.dtype == np.float64 and a.shape == (50,)
    assert np.all((a >= 0) & (a < 1))
    np.testing.assert_array_equal(a, random_scores(50, 0, "blocks.0.conv"))
    assert not np.array_equal(a, random_scores(50, 1, "blocks.0.conv"))
    assert not np.array_equal(a, random_scores(50, 0, "blocks.1.conv"))
    # The documented derivation: numpy's PCG64 seeded with (seed, crc32(key)).
    ref = np.random.default_rng([7, zlib.crc32(b"head")]).random(5)
    np.testing.assert_array_equal(random_scores(5, 7, "head"), ref)
    assert random_scores(0, 0, "x").shape == (0,)


def test_random_scores_are_the_same_in_another_process():
    code = ("from engine.scoring.criteria import random_scores; "
            "print(random_scores(4, 3, 'k').tolist())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert eval(out.stdout) == random_scores(4, 3, "k").tolist()


def test_random_scores_errors():
    with pytest.raises(PruneScopeError):
        random_scores(-1, 0, "x")
    with pytest.raises(OptionError, match="seed"):
        random_scores(3, -2, "x")


def svd_nuclear(m: np.ndarray) -> float:
    return float(np.linalg.svd(m, compute_uv=False).sum())


def test_nuclear_norm_of_conv_features():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(3, 5, 6, 4, generator=g, dtype=torch.float64)
    x = f.numpy()
    ref = [np.mean([svd_nuclear(x[b, c]) for b in range(3)]) for c in range(5)]
    got = nuclear_norm_scores(f, 1)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_nuclear_norm_channel_last_and_5d():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(2, 4, 3, 6, generator=g, dtype=torch.float64)  # (B, H, W, C)
    x = f.numpy()
    ref = [np.mean([svd_nuclear(x[b, :, :, c]) for b in range(2)]) for c in range(6)]
    np.testing.assert_allclose(nuclear_norm_scores(f, -1), ref, rtol=1e-10)
    f5 = torch.randn(2, 3, 2, 4, 5, generator=g, dtype=torch.float64)  # (B, C, D, H, W)
    x5 = f5.numpy()
    ref5 = [np.mean([svd_nuclear(x5[b, c].reshape(2, 20)) for b in range(2)]) for c in range(3)]
    np.testing.assert_allclose(nuclear_norm_scores(f5, 1), ref5, rtol=1e-10)


def test_nuclear_norm_of_vectors_and_scalars():
    g = torch.Generator().manual_seed(6)
    f = torch.randn(4, 7, 3, generator=g, dtype=torch.float64)  # (B, T, C): map per channel = T
    x = f.numpy()
    ref = [np.mean([np.sqrt(np.sum(x[b, :, c] ** 2)) for b in range(4)]) for c in range(3)]
    np.testing.assert_allclose(nuclear_norm_scores(f, 2), ref, rtol=1e-12)
    # A vector is a 1 x T matrix: its nuclear norm is its L2 norm.
    np.testing.assert_allclose(
        ref[0], np.mean([svd_nuclear(x[b, :, 0][None]) for b in range(4)]), rtol=1e-12
    )
    s = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])  # (B, C)
    np.testing.assert_allclose(nuclear_norm_scores(s, 1), [2.0, 3.0])


def test_nuclear_norm_float32_and_half_inputs():
    f = torch.randn(2, 3, 5, 5)
    ref = [np.mean([svd_nuclear(f[b, c].double().numpy()) for b in range(2)]) for c in range(3)]
    np.testing.assert_allclose(nuclear_norm_scores(f, 1), ref, rtol=1e-5)
    np.testing.assert_allclose(nuclear_norm_scores(f.to(torch.bfloat16), 1), ref, rtol=2e-2)


def test_nuclear_norm_errors():
    with pytest.raises(PruneScopeError, match="channel_dim=0"):
        nuclear_norm_scores(torch.ones(2, 3), 0)
    with pytest.raises(PruneScopeError, match="channel_dim=5"):
        nuclear_norm_scores(torch.ones(2, 3), 5)
    with pytest.raises(PruneScopeError, match="batch"):
        nuclear_norm_scores(torch.ones(3), 0)
    with pytest.raises(PruneScopeError, match="non-finite"):
        nuclear_norm_scores(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(PruneScopeError, match="empty batch"):
        nuclear_norm_scores(torch.ones(0, 3, 2, 2), 1)


@pytest.mark.parametrize("out_dim", [1, 2, -1])
@pytest.mark.parametrize(("criterion", "p"), [("l2", 2), ("l1", 1)])
def test_norms_along_a_later_dim_in_many_chunks(monkeypatch, criterion, p, out_dim):
    # an embedding-like table scored by its hidden dim, summed over chunks of leading rows
    monkeypatch.setattr(criteria, "_NORM_CHUNK_ELEMENTS", 20)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 5, 4, generator=g).to(torch.bfloat16)
    got = weight_scores(w, out_dim, criterion)
    assert got.shape == (w.shape[out_dim],)
    ref = loop_norms(w.to(torch.float64).numpy(), out_dim, p)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_float64_weights_are_not_changed_by_scoring():
    w = torch.randn(4, 6, dtype=torch.float64) - 0.5
    before = w.clone()
    for criterion in ("l1", "l2"):
        for dim in (0, 1):
            weight_scores(w, dim, criterion)
    assert torch.equal(w, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("criterion", ["l1", "l2", "gm"])
def test_scores_of_several_dims_in_one_pass_equal_each_dim_alone(monkeypatch, dtype, criterion):
    """weight_scores_by_dim (what the scoring of a model calls: one float64 pass over a
    projection for its rows and its columns) gives weight_scores' values bit for bit, over
    several chunks of rows."""
    monkeypatch.setattr(criteria, "_NORM_CHUNK_ELEMENTS", 700)
    g = torch.Generator().manual_seed(4)
    for shape, dims in (((300, 70), [0, 1]), ((24, 3, 5, 5), [1, 0, -3]), ((40, 9), [1])):
        w = (torch.randn(*shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1),
                                                             generator=g)).to(dtype)
        got = weight_scores_by_dim(w, dims, criterion)
        assert set(got) == set(dims)
        for dim in dims:
            assert np.array_equal(got[dim], weight_scores(w, dim, criterion)), (shape, dim)
