"""Exactness against mask mode: the tolerance every verification uses in float32 (channel
pruning in engine.pipeline, whole experts and blocks here), and the check shared by the
structural removals: the reduced model must equal the original with the removed parts
masked out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
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


def verify_width(masked: list[torch.Tensor], pruned: list[torch.Tensor],
                 exact_by_group: Mapping[str, bool]) -> dict[str, Any]:
    """report["verification"] of a channel prune: `masked` are the outputs of mask mode (the
    original graph, so the original shapes), `pruned` the pruned model's, `exact_by_group`
    whether each pruned group must agree exactly. Raises when the shapes changed, when NaN or
    infinities appear that mask mode does not have, or when exactness is expected and the
    relative difference exceeds the tolerance."""
    shapes_match = len(masked) == len(pruned) and all(
        a.shape == b.shape for a, b in zip(masked, pruned)
    )
    max_abs = 0.0
    max_ref = 0.0
    for m, p in zip(masked, pruned):
        if m.shape == p.shape and m.is_floating_point() and m.numel():
            diff = float((m - p).abs().max())
            # an infinity where mask mode is finite fails too (comparing NaN alone missed it)
            if not np.isfinite(diff) and not torch.equal(m.isfinite(), p.isfinite()):
                # name the side that went non-finite: a NaN only mask mode has is a fault
                # of the reference, not of the pruned model
                which = (("pruned model", "masked original") if (m.isfinite() & ~p.isfinite()).any()
                         else ("masked original", "pruned model"))
                raise PruneScopeError(f"verification failed: the {which[0]} gives NaN or "
                                      f"infinite outputs where the {which[1]} does not")
            max_abs = max(max_abs, diff if np.isfinite(diff) else 0.0)
            max_ref = max(max_ref, float(m.abs().max()))
    relative = max_abs / max_ref if max_ref > 0 else max_abs
    expected_exact = all(exact_by_group.values())
    tolerance = exact_tolerance(t.dtype for t in masked)
    agrees = relative <= tolerance
    if not shapes_match:
        raise PruneScopeError("verification failed: the pruned model's output shapes changed")
    if expected_exact and not agrees:
        raise PruneScopeError(
            f"verification failed: the pruned model differs from the masked original by "
            f"{relative:.3g} (relative), where it must agree exactly"
        )
    return {
        "output_shapes_match": shapes_match,
        "max_abs_diff_vs_masked": max_abs,
        "relative_diff_vs_masked": relative,
        "exact": bool(expected_exact and agrees),
        "tolerance": tolerance,
        "exact_expected": expected_exact,
        "inexact_groups": [n for n, exact in exact_by_group.items() if not exact],
    }
