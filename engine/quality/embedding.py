"""Embedding metrics: how much of an encoder's behaviour a pruned (or recovered) copy keeps.

An encoder returns hidden states ``[N, T, H]``; a sentence embedding is their mean over the
real tokens (``mean_pool``, mean pooling over the attention mask, as sentence-transformers
does). The pruned model's embeddings are compared with the original's on the same samples:

- ``embedding_cosine``: mean cosine between each sample's pruned and original embedding;
- ``embedding_spearman``: Spearman rank correlation between the cosine similarities of all
  pairs of samples under the two models (is the similarity structure kept? on a seeded
  subset of ``PAIR_SAMPLES`` samples when there are more);
- ``neighbor_agreement``: share of samples whose nearest neighbour (by cosine, itself
  excluded) is the same under both models (is retrieval kept?).

All take numpy arrays or tensors and return floats; recovery uses them on held-back data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EMBEDDING_METRICS = ("embedding_cosine", "embedding_spearman", "neighbor_agreement")
PAIR_SAMPLES = 2000  # Spearman over at most this many samples' pairs (2M pairs)
ROW_BLOCK = 1024  # rows of the similarity matrix computed at once


def mean_pool(hidden: Any, mask: Any = None) -> np.ndarray:
    """``[N, T, H]`` hidden states -> ``[N, H]``: the mean over the tokens whose mask is 1
    (every token without a mask); ``[N, H]`` passes through."""
    hidden = np.asarray(_numpy(hidden), dtype=np.float64)
    if hidden.ndim == 2:
        return hidden
    if mask is None:
        return hidden.mean(axis=1)
    weights = np.asarray(_numpy(mask), dtype=np.float64)[:, :, None]
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def _normalized(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def embedding_cosine(pruned: Any, original: Any) -> float:
    """Mean cosine between corresponding rows of two ``[N, H]`` embedding arrays."""
    a, b = _normalized(_numpy(pruned)), _normalized(_numpy(original))
    return float(np.mean(np.sum(a * b, axis=1)))


def _pair_similarities(e: np.ndarray) -> np.ndarray:
    n = _normalized(e)
    sims = n @ n.T
    return sims[np.triu_indices(len(n), k=1)]


def _ranks(v: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[np.argsort(v, kind="stable")] = np.arange(len(v), dtype=np.float64)
    return ranks


def embedding_spearman(pruned: Any, original: Any, seed: int = 0) -> float:
    """Spearman correlation of the pairwise cosine similarities under the two models."""
    a, b = np.asarray(_numpy(pruned)), np.asarray(_numpy(original))
    if len(a) < 3:
        return float("nan")
    if len(a) > PAIR_SAMPLES:
        keep = np.sort(np.random.default_rng(seed).choice(len(a), PAIR_SAMPLES, replace=False))
        a, b = a[keep], b[keep]
    ra, rb = _ranks(_pair_similarities(a)), _ranks(_pair_similarities(b))
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator else float("nan")


def nearest_neighbors(embeddings: Any) -> np.ndarray:
    """Each row's nearest other row by cosine similarity."""
    n = _normalized(_numpy(embeddings))
    result = np.empty(len(n), dtype=np.int64)
    for start in range(0, len(n), ROW_BLOCK):
        sims = n[start:start + ROW_BLOCK] @ n.T
        rows = np.arange(sims.shape[0])
        sims[rows, rows + start] = -np.inf
        result[start:start + ROW_BLOCK] = sims.argmax(axis=1)
    return result


def neighbor_agreement(pruned: Any, original: Any) -> float:
    """Share of samples whose nearest neighbour is the same under both models."""
    a, b = _numpy(pruned), _numpy(original)
    if len(a) < 2:
        return float("nan")
    return float(np.mean(nearest_neighbors(a) == nearest_neighbors(b)))


def embedding_metrics(pruned: Any, original: Any) -> dict[str, float]:
    """All three metrics of two ``[N, H]`` embedding arrays."""
    return {"embedding_cosine": embedding_cosine(pruned, original),
            "embedding_spearman": embedding_spearman(pruned, original),
            "neighbor_agreement": neighbor_agreement(pruned, original)}


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().double().numpy()
    return np.asarray(a)
