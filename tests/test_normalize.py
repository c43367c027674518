"""Layer norms against the spec's figures and plain textbook formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import OptionError, PruneScopeError
from engine.options import LAYER_NORMS
from engine.scoring.normalize import LAYER_NORM_FUNCTIONS, ScoreError, normalize

S_G = np.array([13.0, 22.0, 16.0, 29.0, 17.0])


def test_registry_covers_every_option_value():
    assert set(LAYER_NORM_FUNCTIONS) == set(LAYER_NORMS)


def test_spec_figures_on_s_g():
    np.testing.assert_allclose(
        normalize(S_G, "standard_score"), [-1.1414, 0.4637, -0.6064, 1.7121, -0.4280], atol=5e-5
    )
    np.testing.assert_allclose(
        normalize(S_G, "linear_scaling"), [0, 0.5625, 0.1875, 1, 0.25], atol=1e-12
    )
    np.testing.assert_allclose(
        normalize(S_G, "softmax_norm"), [0, 0.000911, 0.000002, 0.999080, 0.000006], atol=5e-7
    )
    np.testing.assert_allclose(
        normalize(S_G, "tss_norm"), [0.1340, 0.2268, 0.1649, 0.2990, 0.1753], atol=5e-5
    )
    np.testing.assert_array_equal(normalize(S_G, "none"), S_G)


def test_textbook_formulas_on_random_vector():
    rng = np.random.default_rng(3)
    v = rng.normal(2.0, 3.0, size=37)
    # Written independently with Python floats and math, not numpy reductions.
    n = len(v)
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / n)
    np.testing.assert_allclose(normalize(v, "standard_score"), [(x - mean) / std for x in v])
    total = sum(v)
    np.testing.assert_allclose(normalize(v, "tss_norm"), [x / total for x in v])
    lo, hi = min(v), max(v)
    np.testing.assert_allclose(normalize(v, "linear_scaling"), [(x - lo) / (hi - lo) for x in v])
    ex = [math.exp(x) for x in v]
    np.testing.assert_allclose(normalize(v, "softmax_norm"), [e / sum(ex) for e in ex])


def test_undefined_cases_use_spec_fallbacks():
    c = np.full(6, 0.1)  # np.mean of this is not exactly 0.1: must still be zeros
    np.testing.assert_array_equal(normalize(c, "standard_score"), np.zeros(6))
    np.testing.assert_array_equal(normalize(c, "linear_scaling"), np.ones(6))
    np.testing.assert_allclose(normalize(c, "softmax_norm"), np.full(6, 1 / 6))
    np.testing.assert_array_equal(normalize(np.zeros(4), "tss_norm"), np.full(4, 0.25))
    np.testing.assert_array_equal(normalize(np.array([2.0, -2.0]), "tss_norm"), [0.5, 0.5])


def test_output_is_float64_and_input_untouched():
    v = np.array([3, 1, 2], dtype=np.int32)
    for name in LAYER_NORMS:
        out = normalize(v, name)
        assert out.dtype == np.float64
        assert out.shape == (3,)
    np.testing.assert_array_equal(v, [3, 1, 2])
    f = np.array([1.0, 2.0])
    out = normalize(f, "none")
    out[0] = 99.0
    assert f[0] == 1.0


@pytest.mark.parametrize("name", LAYER_NORMS)
@pytest.mark.parametrize(
    "v",
    [
        [1e308, -1e308, 5.0],
        [1.7e308, 1.7e308, 1e308],
        [5e-324, 0.0, 0.0],
        [1.0, -1.0, 5e-324],
        [-1e300, -1e300 * (1 + 1e-15), 3.0],
        [1.0, 1.0 + 2**-52],
    ],
)
def test_extreme_inputs_stay_finite(name, v):
    out = normalize(np.array(v), name)
    assert np.all(np.isfinite(out)), out


def test_extreme_inputs_keep_their_meaning():
    np.testing.assert_allclose(normalize(np.array([1e308, -1e308]), "standard_score"), [1.0, -1.0])
    np.testing.assert_allclose(
        normalize(np.array([1e308, -1e308, 0.0]), "linear_scaling"), [1.0, 0.0, 0.5]
    )
    np.testing.assert_allclose(normalize(np.array([1.0, 1.0 + 2**-52]), "standard_score"), [-1, 1])
    np.testing.assert_allclose(normalize(np.array([1e308, 1e308]), "tss_norm"), [0.5, 0.5])
    np.testing.assert_allclose(normalize(np.array([1000.0, 0.0]), "softmax_norm"), [1.0, 0.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_name_the_layer(bad):
    with pytest.raises(ScoreError, match=r"non-finite raw scores in layer blocks\.0\.conv"):
        normalize(np.array([1.0, bad, 2.0]), "tss_norm", what="blocks.0.conv")
    with pytest.raises(PruneScopeError):
        normalize(np.array([bad]), "none")
    with pytest.raises(ValueError):
        normalize(np.array([bad]), "none")


def test_sum_overflow_alone_is_not_an_error():
    out = normalize(np.array([1.7e308, 1.7e308]), "standard_score")
    np.testing.assert_array_equal(out, [0.0, 0.0])


def test_bad_shape_and_unknown_norm():
    with pytest.raises(ScoreError, match="1-D"):
        normalize(np.ones((2, 2)), "none", what="x")
    with pytest.raises(OptionError, match="standard_score"):
        normalize(np.ones(2), "zscore")


def test_empty_vector():
    for name in LAYER_NORMS:
        assert normalize(np.zeros(0), name).shape == (0,)
