"""Custom ops ONNX has no function for, rewritten into plain ATen before the ONNX export.

``transformers.grouped_mm_fallback`` (and ``aten._grouped_mm``) multiply each row block of
the input by its expert's matrix, with the blocks given by cumulative offsets. The rewrite
finds every row's expert by comparing the row index with the offsets, gathers the expert
matrices and runs one batched product: the same numbers, in ops ONNX has.
"""

from __future__ import annotations

import torch

from engine.threads import TORCH_EXPORT_LOCK


def _grouped_mm_dense(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, *_: object,
                      **__: object) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device, dtype=torch.int64)
    expert = (rows.unsqueeze(1) >= offs.to(torch.int64).unsqueeze(0)).sum(dim=1)
    expert = expert.clamp(max=w.shape[0] - 1)
    return torch.bmm(x.unsqueeze(1), w[expert]).squeeze(1)


def _targets() -> list:
    found = []
    custom = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    for op in (custom, getattr(torch.ops.aten, "_grouped_mm", None)):
        try:
            if op is not None:
                found.append(op.default)
        except (AttributeError, RuntimeError):
            continue
    return found


def without_custom_ops(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with its grouped products rewritten (unchanged when it has none)."""
    targets = _targets()
    used = {n.target for n in program.graph.nodes if n.op == "call_function"}
    table = {op: _grouped_mm_dense for op in targets if op in used}
    if not table:
        return program
    with TORCH_EXPORT_LOCK:
        return program.run_decompositions(table)
