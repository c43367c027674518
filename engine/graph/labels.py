"""Channel labels: which channel element every position of a tensor belongs to.

A label array has the tensor's rank; each dimension is either the tensor's size (the labels
vary along it) or 1 (constant along it). An entry is a channel element id, or -1 for data that
carries no prunable channel (model inputs, constants, attention scores, ...). Element ids come
from parameter dimensions ("slots"); a union-find joins ids that must be pruned together.
"""

from __future__ import annotations

import numpy as np

NO_LABEL = -1


class UnionFind:
    """Disjoint sets over integer ids, built from recorded pairs.

    The analysis only adds ids and pairs; components are needed once at the end, so pairs
    are collected and resolved in one vectorised pass (root hooking with pointer jumping)
    instead of a Python-level find per pair.
    """

    def __init__(self) -> None:
        self.size = 0
        self._pairs: list[np.ndarray] = []
        self._roots: np.ndarray | None = None

    def allocate(self, n: int) -> np.ndarray:
        start = self.size
        self.size += n
        self._roots = None
        return np.arange(start, start + n, dtype=np.int64)

    def __len__(self) -> int:
        return self.size

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join a[k] with b[k] for every k where both are labelled."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            self._pairs.append(np.stack([a[keep], b[keep]]))
            self._roots = None

    def roots(self) -> np.ndarray:
        """The smallest id of each id's component."""
        if self._roots is not None:
            return self._roots
        labels = np.arange(self.size, dtype=np.int64)
        if self._pairs:
            pairs = np.concatenate(self._pairs, axis=1)
            self._pairs = [pairs]
            left, right = pairs[0], pairs[1]
            # Hook roots onto roots, then pointer-jump: every label stays <= its id and in
            # its component, so the component's smallest id ends as its only root. Pairs
            # already joined drop out; a few rounds suffice even on long chains.
            while len(left):
                a, b = labels[left], labels[right]
                apart = a != b
                if not apart.any():
                    break
                left, right, a, b = left[apart], right[apart], a[apart], b[apart]
                np.minimum.at(labels, np.maximum(a, b), np.minimum(a, b))
                while True:  # pointer jumping: every id points at its label's label
                    jumped = labels[labels]
                    if np.array_equal(jumped, labels):
                        break
                    labels = jumped
        self._roots = labels
        return labels


def unique_ints(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of integers by sorting: NumPy 2.3+ takes a hash-based path for a plain
    ``np.unique``, about 10x slower than a sort on the 10^5-id arrays of a ResNet-50."""
    values = np.sort(np.asarray(values).ravel())
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def compress(ids: np.ndarray) -> np.ndarray:
    """Shrink every dimension along which the labels are constant to size 1."""
    for dim in range(ids.ndim):
        if ids.shape[dim] > 1:
            first = np.take(ids, [0], axis=dim)
            if np.array_equal(np.broadcast_to(first, ids.shape), ids):
                ids = first
    return ids


def is_labelled(ids: np.ndarray | None) -> bool:
    return ids is not None and bool((ids >= 0).any())


def along(ids: np.ndarray, dim: int) -> np.ndarray | None:
    """The 1-D labels along `dim` when the labels vary along no other dimension."""
    dim = dim % ids.ndim
    others = [d for d in range(ids.ndim) if d != dim and ids.shape[d] > 1]
    if others:
        return None
    return ids.reshape(-1) if ids.shape[dim] > 1 else ids.reshape(1)


def match_positions(reference: np.ndarray, new: np.ndarray) -> np.ndarray:
    """For each entry of `new`, its position in `reference`.

    Equal ids are matched in order of occurrence (the k-th 5 in `new` is the k-th 5 in
    `reference`), which is how repeated labels (a flattened feature map) keep their order.
    """
    reference = np.asarray(reference, dtype=np.int64).ravel()
    new = np.asarray(new, dtype=np.int64).ravel()
    order = np.argsort(reference, kind="stable")
    sorted_ref = reference[order]
    new_order = np.argsort(new, kind="stable")
    sorted_new = new[new_order]
    first = np.searchsorted(sorted_new, sorted_new, side="left")
    rank = np.empty(len(new), dtype=np.int64)
    rank[new_order] = np.arange(len(new)) - first
    pos = np.searchsorted(sorted_ref, new, side="left") + rank
    if len(new) and (pos.max() >= len(sorted_ref) or not np.array_equal(sorted_ref[pos], new)):
        raise ValueError("pruned labels do not match the original channel layout")
    return order[pos]


def surviving(ids: np.ndarray, roots: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The keep-mask of a plan, shaped like `ids`: True where a position's channel survives
    (`removed` is indexed by the union-find root of its id); unlabelled positions always do.
    The tracer's apply pass, mask mode and recovery's lockstep all read it from here."""
    ids = np.asarray(ids)
    keep = np.ones(ids.shape, dtype=bool)
    labelled = ids >= 0
    keep[labelled] = ~removed[roots[ids[labelled]]]
    return keep
