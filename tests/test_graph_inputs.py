"""engine.graph.inputs: the one place samples are cut into chunks for a model's batch."""

from __future__ import annotations

import torch

from engine.graph.inputs import sample_chunks


def _cut(n: int, size: int, **kw) -> list[tuple[list[int], int]]:
    xs = [torch.arange(n), torch.arange(n) * 10]
    out = []
    for chunk, real in sample_chunks(xs, size, **kw):
        assert torch.equal(chunk[1], chunk[0] * 10)  # every input cut the same way
        out.append((chunk[0].tolist(), real))
    return out


def test_any_batch_keeps_the_short_last_chunk():
    assert _cut(5, 2) == [([0, 1], 2), ([2, 3], 2), ([4], 1)]


def test_fixed_batch_drops_or_fills_the_short_last_chunk():
    assert _cut(5, 2, fixed=True) == [([0, 1], 2), ([2, 3], 2)]
    assert _cut(5, 2, fixed=True, fill=True) == [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]
    assert _cut(4, 2, fixed=True, fill=True) == [([0, 1], 2), ([2, 3], 2)]
