"""Raw channel scores (criteria), one value per output channel; float64 numpy results.

- ``l2`` / ``l1``: the norm of each filter ``W[c]`` (the slice at index ``c`` of ``out_dim``).
- ``gm``: FPGM redundancy, ``sum_j ||W[c] - W[j]||_2`` over the layer's filters.
- ``nuclear_norm``: from calibration features (see :func:`nuclear_norm_scores`).
- ``random``: a seeded uniform draw, stable across runs and processes.

Weights may be bf16/fp16: every criterion computes in float32 or float64, never in the
storage dtype, and works through large layers in row chunks so an 11008 x 4096 projection
stays within a few hundred MB.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from engine.errors import OptionError
from engine.options import CRITERIA_NEEDING_DATA
from engine.scoring.normalize import ScoreError
from engine.threads import one_torch_thread

__all__ = [
    "CRITERIA_NEEDING_CALIBRATION",
    "WEIGHT_CRITERIA",
    "nuclear_norm_scores",
    "random_scores",
    "weight_scores",
    "weight_scores_by_dim",
]

# nuclear_norm (the spec) and the data-aware criteria (engine.options.CRITERION_TABLE)
CRITERIA_NEEDING_CALIBRATION = set(CRITERIA_NEEDING_DATA)
WEIGHT_CRITERIA = {"l1", "l2", "gm"}

# Elements per chunk: 4M float64 = 32 MB for a norm chunk, and the (rows x n) distance block
# of gm is bounded the same way.
_CHUNK_ELEMENTS = 1 << 22
# l1/l2 convert chunks of this many elements to float64 (512 KB): a chunk that stays in the
# CPU cache makes the float64 pass about 5x faster than 32 MB ones (conversion and reduction
# are memory-bound), so float64 costs little over a float32 norm.
_NORM_CHUNK_ELEMENTS = 1 << 16
# gm keeps the whole (centred) filter matrix in float64 up to this many elements (128 MB);
# bigger layers use float32 for it (the sums are still accumulated in float64).
_GM_FLOAT64_LIMIT = 1 << 24


def _filters(weight: torch.Tensor, out_dim: int) -> torch.Tensor:
    """``weight`` as an ``(n, rest)`` matrix, one row per output channel (storage dtype)."""
    w = _checked(weight, out_dim)
    w = torch.movedim(w, out_dim, 0)
    return w.reshape(w.shape[0], math.prod(w.shape[1:]))


def _checked(weight: torch.Tensor, out_dim: int) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise ScoreError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == 0:
        raise ScoreError("weight is a scalar: it has no channels to score")
    nd = weight.dim()
    if not -nd <= out_dim < nd:
        raise ScoreError(
            f"out_dim={out_dim} is out of range for a weight of shape {tuple(weight.shape)}"
        )
    w = weight.detach()
    if w.is_complex():
        raise ScoreError("complex weights are not supported")
    return w


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, n_cols))


def weight_scores(weight: torch.Tensor, out_dim: int, criterion: str) -> np.ndarray:
    """Score every slice of ``weight`` along ``out_dim`` by ``criterion`` (l2, l1 or gm)."""
    if criterion not in WEIGHT_CRITERIA:
        raise OptionError(
            f"criterion {criterion!r} does not score weights; allowed: "
            f"{', '.join(sorted(WEIGHT_CRITERIA))}"
        )
    w = _checked(weight, out_dim)
    if criterion == "gm":
        return _gm(_filters(w, out_dim))
    with one_torch_thread():
        if out_dim % w.dim() != 0:
            return _norms_across(w, out_dim % w.dim(), criterion)
        w = _filters(w, out_dim)
        n, d = w.shape
        ord_ = 2 if criterion == "l2" else 1
        out = np.empty(n, dtype=np.float64)
        step = max(1, _NORM_CHUNK_ELEMENTS // max(1, d))
        # one buffer for every chunk: a fresh tensor per chunk can be returned to the OS and
        # page-faulted in again each time
        buffer = torch.empty(min(step, n) * d, dtype=torch.float64)
        for start in range(0, n, step):
            rows = min(step, n - start)
            chunk = buffer[: rows * d].view(rows, d).copy_(w[start : start + rows])
            out[start : start + rows] = torch.linalg.vector_norm(chunk, ord=ord_, dim=1).numpy()
        return out


def weight_scores_by_dim(weight: torch.Tensor, dims: list[int],
                         criterion: str) -> dict[int, np.ndarray]:
    """``{dim: weight_scores(weight, dim, criterion)}`` for each of `dims`, with the same
    values bit for bit. Where l1/l2 scores both the first dim and others (a projection
    scored by its outputs and its inputs), one pass over the weight gives all of them: each
    chunk of rows is converted to float64 once, normed by rows, then squared (or made
    absolute) in place and summed into the other dims' totals, in the order
    `_norms_across` sums them (converting once halves the scoring of a streamed 7B model)."""
    w = _checked(weight, dims[0] if dims else 0)
    nd = w.dim()
    firsts = [d for d in dims if d % max(1, nd) == 0]
    others = sorted({d % nd for d in dims if d % max(1, nd) != 0})
    if criterion not in ("l1", "l2") or not firsts or not others or nd < 2:
        return {d: weight_scores(weight, d, criterion) for d in dims}
    ord_ = 2 if criterion == "l2" else 1
    n, d = w.shape[0], math.prod(w.shape[1:])
    rows_out = np.empty(n, dtype=np.float64)
    totals = {o: torch.zeros(w.shape[o], dtype=torch.float64) for o in others}
    sum_over = {o: tuple(k for k in range(nd) if k != o) for o in others}
    step = max(1, _NORM_CHUNK_ELEMENTS // max(1, d))
    with one_torch_thread():
        buffer = torch.empty((min(step, n), *w.shape[1:]), dtype=torch.float64)
        for start in range(0, n, step):
            rows = min(step, n - start)
            chunk = buffer[:rows].copy_(w[start : start + rows])
            rows_out[start : start + rows] = torch.linalg.vector_norm(
                chunk.view(rows, d), ord=ord_, dim=1).numpy()
            chunk = chunk.abs_() if criterion == "l1" else chunk.square_()
            for o in others:
                totals[o] += chunk.sum(dim=sum_over[o])
    out: dict[int, np.ndarray] = {}
    for dim in dims:
        if dim % nd == 0:
            out[dim] = rows_out
        else:
            total = totals[dim % nd]
            out[dim] = (total.sqrt() if criterion == "l2" else total).numpy()
    return out


def _norms_across(w: torch.Tensor, out_dim: int, criterion: str) -> np.ndarray:
    """l1/l2 of the slices along a dim other than the first (an embedding table scored by
    its hidden dim): sums over contiguous chunks of leading rows, so the weight is never
    transposed into a copy (30522 x 768 word embeddings: 0.2 s that way)."""
    other = tuple(d for d in range(w.dim()) if d != out_dim)
    total = torch.zeros(w.shape[out_dim], dtype=torch.float64)
    step = max(1, _NORM_CHUNK_ELEMENTS // max(1, math.prod(w.shape[1:])))
    buffer = torch.empty((min(step, w.shape[0]), *w.shape[1:]), dtype=torch.float64)
    for start in range(0, w.shape[0], step):
        rows = min(step, w.shape[0] - start)
        chunk = buffer[:rows].copy_(w[start : start + rows])  # squared in place
        total += (chunk.abs_() if criterion == "l1" else chunk.square_()).sum(dim=other)
    return (total.sqrt() if criterion == "l2" else total).numpy()


def _gm(w: torch.Tensor) -> np.ndarray:
    n, d = w.shape
    dtype = torch.float64 if n * d <= _GM_FLOAT64_LIMIT else torch.float32
    # Distances do not change under translation; centring keeps |a|^2 + |b|^2 - 2ab from
    # cancelling catastrophically when the filters share a large common offset.
    mean = torch.zeros(d, dtype=torch.float64)
    step = _rows_per_chunk(d)
    for start in range(0, n, step):
        mean += w[start : start + step].to(torch.float64).sum(dim=0)
    mean /= n
    c = torch.empty((n, d), dtype=dtype)
    sq = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, step):
        centred = w[start : start + step].to(torch.float64) - mean
        sq[start : start + step] = (centred * centred).sum(dim=1)
        c[start : start + step] = centred.to(dtype)
    sq_c = sq.to(dtype)
    out = np.empty(n, dtype=np.float64)
    rows = _rows_per_chunk(n)
    for start in range(0, n, rows):
        block = c[start : start + rows]
        d2 = sq_c[start : start + rows, None] + sq_c[None, :] - 2.0 * (block @ c.T)
        d2.clamp_(min=0.0)
        dist = d2.sqrt_()
        # A filter's distance to itself is exactly 0, whatever rounding left in d2.
        idx = torch.arange(start, min(start + rows, n))
        dist[idx - start, idx] = 0.0
        out[start : start + rows] = dist.sum(dim=1, dtype=torch.float64).numpy()
    return out


def random_scores(n: int, seed: int, key: str) -> np.ndarray:
    """``n`` uniform draws in [0, 1), determined by ``seed`` and ``key`` (e.g. the layer path).

    The stream is seeded with ``(seed, crc32(key))``: the same on every run and in every
    process (Python's ``hash()`` is salted per process, so it is never used).
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ScoreError(f"random_scores: n must be an integer >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise OptionError(f"option seed={seed!r} must be an integer >= 0")
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])
    return rng.random(int(n))


def nuclear_norm_scores(features: torch.Tensor, channel_dim: int) -> np.ndarray:
    """Per channel: the nuclear norm of its feature map, averaged over the batch (dim 0).

    A channel's feature map in one sample is what remains after removing the batch and
    channel dims: 2 dims -> nuclear norm (sum of singular values); more than 2 -> reshaped to
    ``(first, rest)`` first; 1 dim -> L2 norm (the nuclear norm of a vector); 0 dims -> abs.
    ``channel_dim`` indexes ``features`` (batch included) and may be negative.
    """
    if not isinstance(features, torch.Tensor):
        raise ScoreError(f"features must be a torch.Tensor, got {type(features).__name__}")
    nd = features.dim()
    if nd < 2:
        raise ScoreError(
            f"features of shape {tuple(features.shape)} need a batch dim and a channel dim"
        )
    if not -nd <= channel_dim < nd or channel_dim % nd == 0:
        raise ScoreError(
            f"channel_dim={channel_dim} must index a non-batch dim of features with shape "
            f"{tuple(features.shape)}"
        )
    if features.shape[0] == 0:
        raise ScoreError("features have an empty batch: no calibration samples")
    f = torch.movedim(features.detach(), channel_dim % nd, 1)
    f = f.to(torch.float64 if f.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(f).all()):
        # Checked up front: the SVD of a NaN matrix may fail to converge instead of
        # returning NaN, which would surface as an obscure linear-algebra error.
        raise ScoreError("non-finite calibration features: NaN or inf in the feature maps")
    batch, n = f.shape[0], f.shape[1]
    rest = tuple(f.shape[2:])
    if len(rest) == 0:
        per = f.abs()
    elif len(rest) == 1:
        per = torch.linalg.vector_norm(f, ord=2, dim=2)
    else:
        mats = f.reshape(batch, n, rest[0], -1)
        per = torch.empty((batch, n), dtype=f.dtype)
        # Chunk over the batch so the SVD workspace stays bounded for large feature maps.
        per_sample = max(1, n * rest[0] * mats.shape[-1])
        step = max(1, _CHUNK_ELEMENTS // per_sample)
        for start in range(0, batch, step):
            per[start : start + step] = torch.linalg.svdvals(mats[start : start + step]).sum(-1)
    scores = per.to(torch.float64).mean(dim=0).numpy()
    if not np.all(np.isfinite(scores)):
        raise ScoreError("the nuclear norm of the calibration features overflows")
    return scores
