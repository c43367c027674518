"""Planning: from raw channel scores of every group to the channels each group loses.

This module is pure numpy: the graph side (capture, dependency analysis) hands it one
:class:`GroupInput` per group of connected channels and applies the returned :class:`Plan`.
The semantics follow shared/spec/pruning-options.md; where the spec leaves a choice open the
decision is written down here.

Scores
    :func:`combine` turns the members' raw scores into one score per channel: ``sum`` =
    ``sum_m N(s_m)``, ``average`` = ``mean_m N(s_m)``, ``backward`` = ``N(sum_m s_m)``. The
    layer norm is applied over all ``n`` channels of the member, frozen ones included, so the
    charted scores do not depend on which channels are frozen.

Counts
    ``round_half_up(x)`` = ``floor(x + 0.5)``, tolerant of float noise (``0.7 * 5`` is 3.5,
    not 3.4999..., so it rounds to 4).

    - Per-group ratio ``r`` (``ratios[name]``): the group is asked to lose
      ``round_half_up(r * n)`` channels, ``n`` = all its channels as in the spec, capped at
      the number of prunable (non-frozen) channels. Groups not in ``ratios`` get the global
      ratio when one is given (see below), otherwise ratio 0: nothing removed.
    - Global ratio ``r``: the candidates are the prunable channels of every group that is not
      pinned, has no ratio of its own and no explicit removals. They are ranked together by
      combined score, ties broken stably (group order, then lower channel index first), and
      the lowest ``round_half_up(r * candidates)`` are marked. A group is asked to lose the
      number of its channels that were marked. :attr:`Plan.threshold` is the largest marked
      score (the cut drawn in charts, before the step rule), ``None`` when nothing is marked
      or there is no global ratio.

Step rule (``step_op`` / ``step_size``, off when ``step_op='none'`` or ``step_size=1``)
    The number of channels KEPT is aligned to a multiple of ``step_size`` (``round`` rounds
    half up). If the multiple exceeds ``n`` the largest multiple ``<= n`` is used; the kept
    count never drops below ``max(1, frozen channels, min(step_size, n))``, rounded up to a
    multiple (or ``n`` when that multiple exceeds ``n``). So the kept count is always a
    multiple of ``step_size`` or exactly ``n``. A group that is asked to lose nothing is
    left untouched (alignment alone never removes channels from a group the ratio spared).
    After alignment a group loses its lowest-scoring prunable channels up to the aligned
    count: when alignment keeps more than asked, the highest-scored of the marked channels
    are restored; when it keeps fewer, the next-lowest are removed as well.

Blocks (grouped convolutions, reshape splits), with ``n_cut`` the count asked for above
    - ``whole_blocks`` (reshape_channel_axis -2/0): a block scores the sum (group_policy
      ``sum``) or mean (every other group_policy) of its channels' scores; the lowest
      ``round_half_up(n_cut / B)`` blocks go, never all of them, never one holding a frozen
      channel. The step rule is not applied to block counts.
    - otherwise every block keeps the same number of channels, ``k``:
      ``sum``/``average`` score in-block index ``j`` by ``sum_k``/``mean_k s[k, j]`` and drop
      the same ``round_half_up(n_cut / A)`` indices ``j`` from every block; ``count``: each
      block counts its channels under the cut (marked by the global ranking, or its share
      ``round_half_up(r * B)`` of a per-group ratio) and the smallest count is removed from
      every block, each block its own lowest; ``none``: ``round_half_up(n_cut / A)`` per
      block, each block its own lowest. The step rule aligns the per-block kept count (on
      ``B`` instead of ``n``). With ``sum``/``average`` an index ``j`` that is frozen in any
      block is never dropped; with ``count``/``none`` each block drops prunable channels only.

Pinned groups lose nothing (pinning wins over ``ratios`` and ``removals``). Explicit
``removals`` (criterion ``index``) remove exactly the given channel indices; ratio and step
rule are ignored for those groups, and the indices must be in range, must not be frozen, must
leave at least one channel and must respect the block structure (whole blocks for
``whole_blocks`` groups, the same count from every block otherwise).

Speed: one O(total) ``np.partition`` finds the global cut; per-group work is a handful of
numpy calls (an ``argsort`` only where the step rule or blocks change the marked set).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import OptionError, PruneScopeError
from engine.options import POLICIES, PruningOptions, check_ratio
from engine.scoring.normalize import ScoreError, normalize

__all__ = [
    "GroupInput",
    "GroupPlan",
    "Plan",
    "PlanError",
    "aligned_kept",
    "combine",
    "make_plan",
    "round_half_up",
]

# Layer norms for which N(c * v) == N(v), c > 0: 'backward' may then average instead of sum
# raw scores when the sum would overflow.
_SCALE_INVARIANT = frozenset({"standard_score", "tss_norm", "linear_scaling"})


class PlanError(PruneScopeError, ValueError):
    """A GroupInput is inconsistent (lengths, blocks, prunable mask)."""


@dataclass
class GroupInput:
    """One group of connected channels, as the graph side hands it to the planner.

    ``raw``: member layer path -> raw score per channel, all of length ``n``, insertion order =
    member order. ``blocks``: ``(A, B)`` int array holding each channel index 0..n-1 once, the
    group's channels arranged in ``A`` blocks of ``B``. ``whole_blocks``: remove whole blocks
    (reshape_channel_axis -2/0) instead of the same count from every block (-1/1).
    ``prunable``: bool ``(n,)``; ``False`` marks a frozen channel that is never removed.
    """

    name: str
    raw: dict[str, np.ndarray]
    blocks: np.ndarray | None = None
    whole_blocks: bool = False
    prunable: np.ndarray | None = None


@dataclass
class GroupPlan:
    """What the plan does to one group.

    ``ratio`` is the per-group ratio that applied (``ratios[name]``, or 0.0 for a group with
    no ratio at all); ``None`` for groups in the global ranking, pinned groups and groups with
    explicit removals. ``mode`` says which of those it was: ``'ratio'``, ``'global'``,
    ``'pinned'`` or ``'removals'``. ``requested`` is the number of channels the ratio or the
    global cut asked for before the step rule and block rules (the removal count for
    ``'removals'``, 0 for ``'pinned'``).
    """

    name: str
    layers: list[str]
    normalized: dict[str, np.ndarray]
    scores: np.ndarray
    pruned: np.ndarray
    kept: np.ndarray
    ratio: float | None
    pinned: bool
    mode: str = "ratio"
    requested: int = 0

    @property
    def n(self) -> int:
        return int(self.scores.size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "normalized": {k: v.tolist() for k, v in self.normalized.items()},
            "scores": self.scores.tolist(),
            "pruned": self.pruned.tolist(),
            "kept": self.kept.tolist(),
            "ratio": self.ratio,
            "pinned": self.pinned,
            "mode": self.mode,
            "requested": self.requested,
        }


@dataclass
class Plan:
    options: PruningOptions
    ratio: float | None
    ratios: dict[str, float] | None
    groups: list[GroupPlan]
    threshold: float | None
    _by_name: dict[str, GroupPlan] = field(default_factory=dict, repr=False, compare=False)

    def group(self, name: str) -> GroupPlan:
        if not self._by_name:
            self._by_name = {g.name: g for g in self.groups}
        try:
            return self._by_name[name]
        except KeyError:
            raise OptionError(_unknown("group", name, list(self._by_name))) from None

    @property
    def total_channels(self) -> int:
        return sum(g.n for g in self.groups)

    @property
    def total_pruned(self) -> int:
        return sum(int(g.pruned.size) for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": self.options.to_dict(),
            "ratio": self.ratio,
            "ratios": None if self.ratios is None else dict(self.ratios),
            "threshold": self.threshold,
            "groups": [g.to_dict() for g in self.groups],
        }


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``; the 1e-9 absorbs float noise such as ``0.7 * 5 = 3.4999...``."""
    return int(math.floor(x + 0.5 + 1e-9))


def aligned_kept(target: int, n: int, lower: int, step_size: int, step_op: str) -> int:
    """The kept count after the step rule (see the module docstring).

    ``target``: kept count asked for; ``n``: channels available; ``lower``: the smallest
    kept count allowed without the step rule (>= 1, >= frozen channels).
    """
    lower = max(1, lower)
    if step_op == "none" or step_size <= 1:
        return min(n, max(target, lower))
    s = step_size
    if step_op == "round":
        k = (2 * target + s) // (2 * s) * s
    elif step_op == "round_up":
        k = -(-target // s) * s
    else:
        k = target // s * s
    if k > n:
        k = n // s * s or n
    lo = max(lower, min(s, n))
    if k < lo:
        k = -(-lo // s) * s
        if k > n:
            k = n
    return k


def _unknown(kind: str, name: object, valid: list[str]) -> str:
    shown = ", ".join(repr(v) for v in valid[:5])
    more = f", ... ({len(valid)} in all)" if len(valid) > 5 else ""
    if not valid:
        return f"unknown {kind} {name!r}; there are no groups"
    return f"unknown {kind} {name!r}; valid names include: {shown}{more}"


def combine(
    raw: dict[str, np.ndarray], policy: str, layer_norm: str, *, what: str | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Normalised member scores and the group's combined score under ``policy``.

    Returns ``({member: N(s_m)}, combined)``. ``sum``: ``sum_m N(s_m)``; ``average``:
    ``mean_m N(s_m)``; ``backward``: ``N(sum_m s_m)`` (raw scores added first). The per-member
    ``N(s_m)`` is returned for every policy, ``backward`` included, for charts.
    """
    if policy not in POLICIES:
        raise OptionError(
            f"option policy={policy!r} is not allowed; allowed values: {', '.join(POLICIES)}"
        )
    label = what or "group"
    if not raw:
        raise PlanError(f"{label} has no member layers")
    normalized: dict[str, np.ndarray] = {}
    n: int | None = None
    for member, s in raw.items():
        v = normalize(s, layer_norm, what=member)
        if n is None:
            n = v.size
        elif v.size != n:
            raise PlanError(
                f"{label}: member {member!r} has {v.size} scores, the first member has {n}"
            )
        normalized[member] = v
    vals = list(normalized.values())
    if len(vals) == 1:
        return normalized, vals[0].copy()
    if policy == "sum":
        return normalized, np.sum(vals, axis=0)
    if policy == "average":
        return normalized, np.mean(vals, axis=0)
    rows = [np.asarray(s, dtype=np.float64) for s in raw.values()]
    with np.errstate(over="ignore"):
        total = np.sum(rows, axis=0)
    if not np.all(np.isfinite(total)) and layer_norm in _SCALE_INVARIANT:
        # Dividing each row before adding cannot overflow (np.mean adds first).
        total = np.sum([r / len(rows) for r in rows], axis=0)
    if not np.all(np.isfinite(total)):
        raise ScoreError(
            f"{label}: the sum of the members' raw scores overflows float64 "
            f"(policy backward, layer_norm {layer_norm})"
        )
    return normalized, normalize(total, layer_norm, what=label)


@dataclass
class _Prepared:
    inp: GroupInput
    normalized: dict[str, np.ndarray]
    scores: np.ndarray
    prunable: np.ndarray | None  # None: all prunable
    n_prunable: int
    blocks: np.ndarray | None


def _prepare(g: GroupInput, options: PruningOptions) -> _Prepared:
    normalized, scores = combine(g.raw, options.policy, options.layer_norm, what=g.name)
    n = scores.size
    if n == 0:
        raise PlanError(f"group {g.name!r} has no channels")
    prunable = None
    n_prunable = n
    if g.prunable is not None:
        prunable = np.asarray(g.prunable)
        if prunable.dtype != np.bool_ or prunable.shape != (n,):
            raise PlanError(
                f"group {g.name!r}: prunable must be a bool array of shape ({n},), "
                f"got {prunable.dtype} {prunable.shape}"
            )
        n_prunable = int(np.count_nonzero(prunable))
        if n_prunable == n:
            prunable = None
    blocks = None
    if g.blocks is not None:
        blocks = np.asarray(g.blocks)
        if (
            blocks.ndim != 2
            or blocks.size != n
            or not np.issubdtype(blocks.dtype, np.integer)
            or not np.array_equal(np.sort(blocks, axis=None), np.arange(n))
        ):
            raise PlanError(
                f"group {g.name!r}: blocks must be an int (A, B) array holding each of the "
                f"{n} channel indices once, got {blocks.dtype} {blocks.shape}"
            )
        blocks = blocks.astype(np.int64, copy=False)
    return _Prepared(g, normalized, scores, prunable, n_prunable, blocks)


def _lowest(scores: np.ndarray, candidates: np.ndarray | None, count: int) -> np.ndarray:
    """Indices of the ``count`` lowest scores (stable: lower index first on ties)."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if candidates is None:
        order = np.argsort(scores, kind="stable")
        return order[:count]
    idx = np.flatnonzero(candidates)
    return idx[np.argsort(scores[idx], kind="stable")[:count]]


def _select_flat(
    p: _Prepared, n_cut: int, marked: np.ndarray | None, opts: PruningOptions
) -> np.ndarray:
    """Channels removed from a group without blocks."""
    n = p.scores.size
    frozen = n - p.n_prunable
    kept = aligned_kept(n - n_cut, n, max(1, frozen), opts.step_size, opts.step_op)
    remove = n - kept
    if marked is not None and remove == n_cut:
        return np.flatnonzero(marked)
    return _lowest(p.scores, p.prunable, remove)


def _select_blocks(
    p: _Prepared,
    n_cut: int,
    marked: np.ndarray | None,
    ratio: float | None,
    opts: PruningOptions,
) -> np.ndarray:
    """Channels removed from a group with blocks (see the module docstring)."""
    blocks = p.blocks
    assert blocks is not None
    A, B = blocks.shape
    S = p.scores[blocks]
    frozen = None if p.prunable is None else ~p.prunable[blocks]
    gp = opts.group_policy

    if p.inp.whole_blocks:
        block_score = S.sum(axis=1) if gp == "sum" else S.mean(axis=1)
        eligible = None if frozen is None else ~frozen.any(axis=1)
        n_eligible = A if eligible is None else int(eligible.sum())
        nb = min(round_half_up(n_cut / B), n_eligible, A - 1)
        gone = _lowest(block_score, eligible, nb)
        return blocks[gone].ravel()

    if gp in ("sum", "average"):
        j_score = S.sum(axis=0) if gp == "sum" else S.mean(axis=0)
        eligible = None if frozen is None else ~frozen.any(axis=0)
        n_eligible = B if eligible is None else int(eligible.sum())
        d = min(round_half_up(n_cut / A), n_eligible, B - 1)
        if d <= 0:
            return np.zeros(0, dtype=np.int64)
        k = aligned_kept(B - d, B, B - n_eligible, opts.step_size, opts.step_op)
        js = _lowest(j_score, eligible, B - k)
        return blocks[:, js].ravel()

    # count / none: each block drops its own lowest prunable channels, the same number each.
    if gp == "count":
        if marked is not None:
            d = int(marked[blocks].sum(axis=1).min())
        else:
            d = round_half_up((ratio or 0.0) * B)
    else:
        d = round_half_up(n_cut / A)
    frozen_per_block = 0 if frozen is None else int(frozen.sum(axis=1).max())
    d = min(d, B - frozen_per_block, B - 1)
    if d <= 0:
        return np.zeros(0, dtype=np.int64)
    k = aligned_kept(B - d, B, frozen_per_block, opts.step_size, opts.step_op)
    if k >= B:
        return np.zeros(0, dtype=np.int64)
    S_rank = S if frozen is None else np.where(frozen, np.inf, S)
    order = np.argsort(S_rank, axis=1, kind="stable")[:, : B - k]
    return np.take_along_axis(blocks, order, axis=1).ravel()


def _check_removals(p: _Prepared, value: object) -> np.ndarray:
    name, n = p.inp.name, p.scores.size
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not (
        np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_)
    ):
        raise OptionError(
            f"channel indices to remove from group {name!r} must be a list of integers, "
            f"got {value!r}"[:300]
        )
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise OptionError(
            f"channel index {int(bad[0])} is out of range for group {name!r} with n={n} "
            f"channels (allowed 0..{n - 1})"
        )
    arr = np.unique(arr)
    if arr.size >= n:
        raise OptionError(
            f"cannot remove all n={n} channels of group {name!r}; at least one must remain"
        )
    if p.prunable is not None:
        frozen = arr[~p.prunable[arr]]
        if frozen.size:
            raise OptionError(
                f"channel {int(frozen[0])} of group {name!r} is frozen (it reaches a model "
                f"output or comes from a model input) and cannot be removed"
            )
    if p.blocks is not None:
        A, B = p.blocks.shape
        hit = np.zeros(n, dtype=bool)
        hit[arr] = True
        per_block = hit[p.blocks].sum(axis=1)
        if p.inp.whole_blocks:
            if np.any((per_block != 0) & (per_block != B)):
                raise OptionError(
                    f"group {name!r} is pruned in whole blocks of {B} channels: the indices "
                    f"to remove must cover whole blocks"
                )
        elif np.any(per_block != per_block[0]):
            raise OptionError(
                f"group {name!r} has {A} blocks of {B} channels that must keep the same size: "
                f"remove the same number of indices from every block "
                f"(got {per_block.tolist()[:8]})"
            )
    return arr


def _check_names(kind: str, names: Iterable[str], valid: dict[str, int]) -> None:
    for name in names:
        if name not in valid:
            raise OptionError(_unknown(f"group in {kind}", name, list(valid)))


def make_plan(
    groups: list[GroupInput],
    options: PruningOptions | dict[str, Any] | None,
    *,
    ratio: float | None = None,
    ratios: Mapping[str, float] | None = None,
    pinned: Iterable[str] = (),
    removals: Mapping[str, np.ndarray] | None = None,
) -> Plan:
    """Decide which channels every group loses (full semantics: the module docstring).

    ``ratio``: the global ratio shared by every group without a ratio of its own;
    ``ratios``: per-group ratios (they take the group out of the global ranking);
    ``pinned``: group names that lose nothing; ``removals``: exact channel indices per group
    (criterion ``index``). Every ratio must satisfy ``0 <= r < 1``; an unknown group name, a
    bad ratio or bad removal indices raise :class:`~engine.errors.OptionError` naming the
    group; an inconsistent :class:`GroupInput` raises :class:`PlanError`.
    """
    options = PruningOptions.from_any(options)
    index: dict[str, int] = {}
    for i, g in enumerate(groups):
        if g.name in index:
            raise PlanError(f"duplicate group name {g.name!r}")
        index[g.name] = i

    if ratio is not None:
        ratio = check_ratio(ratio, "ratio")
    ratio_map: dict[str, float] = {}
    if ratios is not None:
        _check_names("ratios", ratios, index)
        for name, r in ratios.items():
            ratio_map[name] = check_ratio(r, f"ratio of group {name!r}")
    pinned_set = set(pinned) if not isinstance(pinned, str) else {pinned}
    _check_names("pinned", pinned_set, index)
    removal_map = dict(removals or {})
    _check_names("removals", removal_map, index)

    prepared = [_prepare(g, options) for g in groups]
    pruned: list[np.ndarray | None] = [None] * len(groups)
    meta: list[tuple[float | None, str, int]] = [(None, "ratio", 0)] * len(groups)

    in_global: list[int] = []
    for i, p in enumerate(prepared):
        name = p.inp.name
        if name in pinned_set:
            pruned[i] = np.zeros(0, dtype=np.int64)
            meta[i] = (None, "pinned", 0)
        elif name in removal_map:
            arr = _check_removals(p, removal_map[name])
            pruned[i] = arr
            meta[i] = (None, "removals", int(arr.size))
        elif name in ratio_map or ratio is None:
            r = ratio_map.get(name, 0.0)
            n = p.scores.size
            n_cut = min(round_half_up(r * n), p.n_prunable)
            meta[i] = (r, "ratio", n_cut)
            if n_cut == 0:
                pruned[i] = np.zeros(0, dtype=np.int64)
            elif p.blocks is None:
                pruned[i] = _select_flat(p, n_cut, None, options)
            else:
                pruned[i] = _select_blocks(p, n_cut, None, r, options)
        else:
            in_global.append(i)

    threshold = None
    if in_global:
        assert ratio is not None
        threshold = _plan_global(prepared, in_global, ratio, options, pruned, meta)

    plans: list[GroupPlan] = []
    for i, p in enumerate(prepared):
        n = p.scores.size
        gone = np.sort(np.asarray(pruned[i], dtype=np.int64))
        keep_mask = np.ones(n, dtype=bool)
        keep_mask[gone] = False
        r, mode, requested = meta[i]
        plans.append(
            GroupPlan(
                name=p.inp.name,
                layers=list(p.inp.raw),
                normalized=p.normalized,
                scores=p.scores,
                pruned=gone,
                kept=np.flatnonzero(keep_mask),
                ratio=r,
                pinned=mode == "pinned",
                mode=mode,
                requested=requested,
            )
        )
    return Plan(
        options=options,
        ratio=ratio,
        ratios=dict(ratio_map) if ratios is not None else None,
        groups=plans,
        threshold=threshold,
    )


def _plan_global(
    prepared: list[_Prepared],
    members: list[int],
    ratio: float,
    options: PruningOptions,
    pruned: list[np.ndarray | None],
    meta: list[tuple[float | None, str, int]],
) -> float | None:
    """Rank the candidates of ``members`` together; fill ``pruned``/``meta``; the cut."""
    sizes = np.array([prepared[i].scores.size for i in members], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    allscores = np.concatenate([prepared[i].scores for i in members])
    n_candidates = sum(prepared[i].n_prunable for i in members)
    if any(prepared[i].prunable is not None for i in members):
        # Frozen channels sort after every finite score, so they are never marked.
        allscores = allscores.copy()
        for pos, i in enumerate(members):
            mask = prepared[i].prunable
            if mask is not None:
                allscores[offsets[pos] : offsets[pos + 1]][~mask] = np.inf
    count = round_half_up(ratio * n_candidates)
    marked_all = np.zeros(allscores.size, dtype=bool)
    threshold: float | None = None
    if count > 0:
        # O(N) selection; ties at the cut are taken in index order, which is exactly what a
        # stable sort over (group order, channel index) would take.
        t = float(np.partition(allscores, count - 1)[count - 1])
        below = allscores < t
        need = count - int(np.count_nonzero(below))
        at = np.flatnonzero(allscores == t)[:need]
        marked_all = below
        marked_all[at] = True
        threshold = t
    counts = np.add.reduceat(marked_all.astype(np.int64), offsets[:-1]) if sizes.size else []
    for pos, i in enumerate(members):
        p = prepared[i]
        n_cut = int(counts[pos])
        meta[i] = (None, "global", n_cut)
        if n_cut == 0:
            pruned[i] = np.zeros(0, dtype=np.int64)
            continue
        marked = marked_all[offsets[pos] : offsets[pos + 1]]
        if p.blocks is None:
            pruned[i] = _select_flat(p, n_cut, marked, options)
        else:
            pruned[i] = _select_blocks(p, n_cut, marked, None, options)
    return threshold
