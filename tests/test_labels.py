"""The union-find and integer unique of engine/graph/labels.py against plain-Python versions."""

from __future__ import annotations

import numpy as np
import pytest

from engine.graph.labels import UnionFind, unique_ints


def _python_roots(size: int, pairs: list[tuple[int, int]]) -> list[int]:
    parent = list(range(size))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the smallest id stays the root
    return [find(i) for i in range(size)]


@pytest.mark.parametrize("seed", range(6))
def test_union_find_roots_are_each_components_smallest_id(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 400))
    uf = UnionFind()
    uf.allocate(size)
    expected_pairs: list[tuple[int, int]] = []
    for _ in range(int(rng.integers(0, 30))):
        n = int(rng.integers(1, 40))
        a = rng.integers(-1, size, n)  # -1: unlabelled, never joined
        b = rng.integers(-1, size, n)
        uf.union_pairs(a, b)
        expected_pairs += [(int(x), int(y)) for x, y in zip(a, b) if x >= 0 and y >= 0]
    assert uf.roots().tolist() == _python_roots(size, expected_pairs)


def test_union_find_long_chain_in_reverse_order() -> None:
    # a chain joined from its far end: the slowest case for label propagation
    size = 5000
    uf = UnionFind()
    uf.allocate(size)
    ids = np.arange(size - 1)[::-1]
    uf.union_pairs(ids + 1, ids)
    assert (uf.roots() == 0).all()


def test_union_find_roots_refresh_after_new_pairs() -> None:
    uf = UnionFind()
    uf.allocate(4)
    uf.union_pairs(np.array([3]), np.array([2]))
    assert uf.roots().tolist() == [0, 1, 2, 2]
    uf.union_pairs(np.array([2]), np.array([1]))
    assert uf.roots().tolist() == [0, 1, 1, 1]


@pytest.mark.parametrize("values", [[], [7], [3, 1, 3, 2, 1, 9, -4], list(range(50, 0, -3)) * 2])
def test_unique_ints_matches_sorted_set(values: list[int]) -> None:
    got = unique_ints(np.array(values, dtype=np.int64))
    assert got.tolist() == sorted(set(values))
    assert got.dtype == np.int64
