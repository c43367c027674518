"""Exactness against mask mode: the tolerance every verification uses in float32 (channel
pruning in engine.pipeline, whole experts and blocks here), and the check shared by the
structural removals: the reduced model must equal the original with the removed parts
masked out."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from engine.errors import PruneScopeError

EXACT_TOLERANCE = 1e-4  # relative: max |reduced - masked| / max |masked|
HALF_EPSILONS = 4  # bf16/fp16 outputs: the tolerance is this many machine epsilons


def exact_tolerance(dtypes: Iterable[torch.dtype]) -> float:
    """Relative tolerance of "exact": 1e-4 in float32; for half-precision outputs 4 machine
    epsilons of the coarsest one (float16 3.9e-3, bfloat16 3.1e-2): removing zeroed channels
    changes how a product's sum is blocked, and each rounding to 8 (bf16) or 11 (fp16)
    significant bits can move a result by an epsilon."""
    eps = [torch.finfo(d).eps for d in dtypes if d.is_floating_point]
    return max([EXACT_TOLERANCE, *(HALF_EPSILONS * e for e in eps)])


def compare_exact(expected: list[torch.Tensor], got: list[torch.Tensor], what: str,
                  masked_as: str) -> dict:
    """`expected`: the masked original's outputs; `got`: the reduced model's. `what` names the
    removal (e.g. "depth"), `masked_as` how the original was masked, for the error line."""
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        raise PruneScopeError(f"{what} verification failed: the output shapes changed")
    diff = max((float((a - b).abs().max()) for a, b in zip(expected, got)
                if a.is_floating_point() and a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in expected if a.is_floating_point() and a.numel()),
                default=0.0)
    relative = diff / scale if scale > 0 else diff
    if not relative <= exact_tolerance(t.dtype for t in expected):
        raise PruneScopeError(
            f"{what} verification failed: the reduced model differs from the original "
            f"{masked_as} by {relative:.3g} (relative)"
        )
    return {"max_abs_diff_vs_masked": diff, "relative_diff_vs_masked": relative, "exact": True}
