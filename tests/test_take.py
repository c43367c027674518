"""engine.transform.apply.take: the weight slicer equals torch's index_select bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.transform.apply import take


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.int64, torch.bool])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_take_equals_index_select(dtype: torch.dtype, dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    w = (torch.randn(5, 6, 7, generator=g) * 3).to(dtype)
    index = np.array([0, 2, 3, w.shape[dim] - 1])
    got = take(w, dim, index)
    want = w.index_select(dim, torch.as_tensor(index))
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want)


def test_take_copies_every_bit_and_leaves_the_source_alone() -> None:
    # -0.0, infinities and a NaN with a payload survive as the same bit patterns
    patterns = [[0x8000, 0x7F80, 0xFF80, 0x7FC1], [0x3F80, 0x0001, 0x4000, 0xC000]]
    bits = torch.from_numpy(np.array(patterns, dtype=np.uint16).view(np.int16))
    w = bits.view(torch.bfloat16)
    got = take(w.t(), 1, np.array([1, 0]))  # a non-contiguous source
    assert torch.equal(got.view(torch.int16), bits.t().index_select(1, torch.tensor([1, 0])))
    assert got.data_ptr() != w.data_ptr()
    got.zero_()
    assert torch.equal(w.view(torch.int16), bits)


def test_take_refuses_an_index_out_of_range_like_index_select() -> None:
    w = torch.zeros(3, 4, dtype=torch.bfloat16)
    for bad in ([0, 4], [-1, 0]):
        with pytest.raises((IndexError, RuntimeError)):
            take(w, 1, np.array(bad))
