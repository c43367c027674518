"""engine.transform.apply.take: the weight slicer equals torch's index_select bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.transform import apply
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


@pytest.mark.parametrize("order", ["rows first", "columns first"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slice_tensor_of_rows_and_columns_equals_index_select(monkeypatch, order, dtype):
    """The chunked, threaded cut of a weight's rows and columns (engine/stream.py's writer
    cuts every projection with it): small chunks and parts force several of each."""
    monkeypatch.setattr(apply, "_CHUNK_BYTES", 3 * 37 * 2)  # 3 rows of 37 bf16 per chunk
    monkeypatch.setattr(apply, "_PARALLEL_BYTES", 64)
    monkeypatch.setattr(apply, "_CUT_THREADS", 3)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(29, 37, generator=g).to(dtype)
    rows = np.array([0, 1, 2, 5, 8, 9, 10, 11, 20, 27, 28])
    columns = np.array([1, 3, 4, 5, 17, 30, 36])
    gathers = ((0, rows), (1, columns))
    how = apply.ParamSlice(gathers if order == "rows first" else gathers[::-1])
    want = w.index_select(0, torch.as_tensor(rows)).index_select(1, torch.as_tensor(columns))
    got = apply.slice_tensor(w, how)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, want)
    for dim, index in gathers:  # one dim only, in parts
        one = apply.slice_tensor(w, apply.ParamSlice(((dim - 2, index),)))
        assert torch.equal(one, w.index_select(dim, torch.as_tensor(index)))


def test_a_cut_out_of_range_raises_rather_than_clipping():
    w = torch.zeros(6, 5, dtype=torch.bfloat16)
    with pytest.raises((IndexError, RuntimeError)):
        apply.slice_tensor(w, apply.ParamSlice(((0, np.array([0, 6])), (1, np.array([0, 1])))))
