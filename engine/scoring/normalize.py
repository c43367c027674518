"""Layer norms: make the raw scores of different layers comparable.

Every function takes a 1-D vector of raw scores and returns a float64 vector of the same
length. None of them can produce NaN or infinity for a finite input: the scale-invariant
norms first divide by the largest magnitude, so values near the float64 limit cannot
overflow, and each undefined case of the spec has its fallback:

- ``standard_score``: ``(v - mean) / std`` with the population std; ``std = 0`` -> zeros.
- ``tss_norm``: ``v / sum(v)``; ``sum(v) = 0`` -> ``1/n`` each. A sum that is zero up to
  rounding (only possible with mixed signs) counts as zero, since dividing by rounding noise
  would give arbitrary, possibly infinite values.
- ``linear_scaling``: ``(v - min) / (max - min)``; ``max = min`` -> ones.
- ``softmax_norm``: ``exp(v - max) / sum(exp(v - max))``.
- ``none``: ``v`` unchanged (as float64).

A non-finite raw score is a bug upstream (a NaN weight, a diverged calibration run): it is
rejected with :class:`ScoreError` naming the layer, never silently normalised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.errors import OptionError, PruneScopeError
from engine.options import LAYER_NORMS

__all__ = [
    "LAYER_NORM_FUNCTIONS",
    "ScoreError",
    "linear_scaling",
    "none_norm",
    "normalize",
    "softmax_norm",
    "standard_score",
    "tss_norm",
]


class ScoreError(PruneScopeError, ValueError):
    """Raw scores that cannot be used (NaN/inf, wrong shape)."""


def _as_vector(v: np.ndarray, what: str | None) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64)
    where = f" in layer {what}" if what else ""
    if arr.ndim != 1:
        raise ScoreError(f"raw scores{where} must be a 1-D vector, got shape {arr.shape}")
    # One reduction is the fast path (re-planning runs on every dashboard redraw); a sum that
    # is not finite may also be a plain overflow, so only then look element by element.
    with np.errstate(over="ignore", invalid="ignore"):
        total = arr.sum()
    if not np.isfinite(total):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ScoreError(
                f"non-finite raw scores{where}: {int(bad.sum())} of {arr.size} values are "
                f"NaN or inf"
            )
    return arr


def _unit_scaled(v: np.ndarray) -> np.ndarray:
    """``v / max|v|`` (or ``v`` when all zero): keeps every later step far from overflow."""
    m = max(-float(v.min()), float(v.max()))
    return v / m if m > 0.0 else v.copy()


def standard_score(v: np.ndarray) -> np.ndarray:
    n = v.size
    if n == 0:
        return np.zeros(0)
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        # Checked exactly: the mean of a constant vector can be off by one ulp, which would
        # otherwise turn rounding noise into z-scores of +-1.
        return np.zeros(n)
    u = v / max(-lo, hi)
    d = u - u.sum() / n
    # Second centring pass removes the rounding error of the first mean.
    d -= d.sum() / n
    var = float((d * d).sum()) / n
    if var > 1e-200:
        return d / np.sqrt(var)
    # Differences so small that their squares lose precision: rescale them to [-1, 1] first;
    # the population std is then >= 1/sqrt(n), so the division is safe.
    dm = float(np.abs(d).max())
    if dm == 0.0:
        return np.zeros(n)
    d /= dm
    return d / np.sqrt(float((d * d).sum()) / n)


def tss_norm(v: np.ndarray) -> np.ndarray:
    n = v.size
    if n == 0:
        return np.zeros(0)
    u = _unit_scaled(v)
    s = float(u.sum())
    total = float(np.abs(u).sum())
    if s == 0.0 or abs(s) <= 4.0 * n * np.finfo(np.float64).eps * total:
        return np.full(n, 1.0 / n)
    return u / s


def linear_scaling(v: np.ndarray) -> np.ndarray:
    if v.size == 0:
        return np.zeros(0)
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return np.ones(v.size)
    u = _unit_scaled(v)
    lo_u, hi_u = float(u.min()), float(u.max())
    span = hi_u - lo_u
    if span == 0.0:
        # hi != lo but scaling merged them (differences below float resolution after /max).
        return np.ones(v.size)
    return np.clip((u - lo_u) / span, 0.0, 1.0)


def softmax_norm(v: np.ndarray) -> np.ndarray:
    if v.size == 0:
        return np.zeros(0)
    with np.errstate(over="ignore", under="ignore"):
        # v - max can overflow to -inf only for hugely negative entries; exp(-inf) = 0 is
        # exactly their weight, and the max entry contributes exp(0) = 1 so the sum is >= 1.
        e = np.exp(v - v.max())
    return e / e.sum()


def none_norm(v: np.ndarray) -> np.ndarray:
    return v.copy()


LAYER_NORM_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "standard_score": standard_score,
    "tss_norm": tss_norm,
    "linear_scaling": linear_scaling,
    "softmax_norm": softmax_norm,
    "none": none_norm,
}
assert set(LAYER_NORM_FUNCTIONS) == set(LAYER_NORMS)


def normalize(v: np.ndarray, layer_norm: str, what: str | None = None) -> np.ndarray:
    """Apply the layer norm ``layer_norm`` to the raw score vector ``v`` (float64 result).

    ``what`` names the layer in error messages. Raises :class:`ScoreError` for non-finite or
    non-1-D input and :class:`~engine.errors.OptionError` for an unknown norm name.
    """
    fn = LAYER_NORM_FUNCTIONS.get(layer_norm)  # type: ignore[arg-type]
    if fn is None:
        raise OptionError(
            f"option layer_norm={layer_norm!r} is not allowed; "
            f"allowed values: {', '.join(LAYER_NORMS)}"
        )
    return fn(_as_vector(v, what))
