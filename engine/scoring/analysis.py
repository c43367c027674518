"""Analysis: one captured model, its groups, and raw scores cached per criterion.

Everything a redraw needs is cached here: the graph walk per block mode, and the raw score of
every filter per criterion. Changing the layer norm, policy or ratio only re-plans.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from engine.device import calibration_autocast, device_scope, on_device, to_device
from engine.errors import ModelLoadError, OptionError, PruneScopeError
from engine.graph.capture import Captured, lazy_recompiles, load_model
from engine.graph.dependency import FrozenInfo, GroupInfo, Structure, analyze_graph
from engine.graph.inputs import run_graph, sample_chunks
from engine.io.hf_config import (
    config_constraints,
    count_adjuster,
    keep_to_describe,
    rotary_heads,
)
from engine.options import CRITERIA, CRITERIA_NEEDING_DATA, PruningOptions
from engine.scoring.calibration import DEFAULT_SAMPLES, as_calibration
from engine.scoring.criteria import (
    nuclear_norm_scores,
    random_scores,
    weight_scores_by_dim,
)
from engine.scoring.data_aware import DATA_CRITERIA, DataAwareScorer
from engine.scoring.planning import GroupInput, Plan, make_plan
from engine.scoring.uniform import keep_contiguous, uniform_plan
from engine.threads import TORCH_EXPORT_LOCK, exclusive, one_torch_thread


class Analysis:
    def __init__(self, captured: Captured,
                 weights: Callable[[str], torch.Tensor] | None = None,
                 module: fx.GraphModule | None = None) -> None:
        """`weights`: where the parameters' values come from when the captured model holds
        them on the meta device (a streamed prune reads them from the safetensors shards,
        one at a time, and checks each one for NaN as it is read). `module`: the graph to
        analyse where it is not the captured program's own (a streamed prune repeats the
        layers of a 2-layer capture: engine/graph/repeat.py)."""
        self.captured = captured
        if module is not None:
            self.gm: fx.GraphModule = module
        else:
            # unlifting traces through torch.fx global state
            with TORCH_EXPORT_LOCK, lazy_recompiles():
                self.gm = captured.program.module()
        self.released = False  # True once a prune gave the original weights up (apply)
        self.weights = weights
        if weights is None:
            _check_finite(self.gm)
        self._structures: dict[bool, Structure] = {}
        self._filter_scores: dict[tuple, dict[tuple[str, int], np.ndarray]] = {}
        self.score_computations = 0  # how many times filter scores were computed (tests)

    def check_not_released(self) -> None:
        """Refuse to use an analysis whose original weights an earlier prune gave up."""
        if self.released:
            raise PruneScopeError("this analysis gave its weights up to an earlier prune of a "
                                  "model file; analyse the model again")

    # ------------------------------------------------------------------ structure
    def structure(self, whole_blocks: bool = False) -> Structure:
        if whole_blocks not in self._structures:
            self._structures[whole_blocks] = analyze_graph(self.gm, whole_blocks)
        return self._structures[whole_blocks]

    @property
    def groups(self) -> list[GroupInfo]:
        return [g for g in self.structure(False).groups if g.prunable.any()]

    @property
    def frozen(self) -> list[FrozenInfo]:
        return self.structure(False).frozen

    def prunable_groups(self, whole_blocks: bool) -> list[GroupInfo]:
        return [g for g in self.structure(whole_blocks).groups if g.prunable.any()]

    # --------------------------------------------------------------------- scores
    def filter_scores(
        self, criterion: str, calibration: Any = None, seed: int = 0
    ) -> dict[tuple[str, int], np.ndarray]:
        """Raw score of every filter of every member layer (cached per criterion, seed and
        calibration content). ``calibration``: an array of inputs, or an ``.npz``-like mapping
        with ``x`` (or ``x0``, ``x1``, ...) and optional labels ``y``."""
        if criterion not in CRITERIA:
            raise OptionError(f"criterion {criterion!r} is not allowed; allowed: {CRITERIA}")
        if criterion == "index":
            criterion = "l2"  # index pruning has no score; charts show l2
        data_key = None
        if criterion in CRITERIA_NEEDING_DATA:
            if calibration is None:
                raise OptionError(
                    f"--criterion {criterion} needs --calibration FILE.npz (calibration inputs "
                    "x, optional labels y)"
                )
            calibration = as_calibration(calibration, self.captured)
            # keyed by content, so equal data loaded again (a new array) still hits the cache
            data_key = calibration.fingerprint(DEFAULT_SAMPLES)
        key = (criterion, seed if criterion == "random" else None, data_key)
        if key not in self._filter_scores:
            self.score_computations += 1
            self._filter_scores[key] = self._compute_filter_scores(criterion, calibration, seed)
        return self._filter_scores[key]

    def members(self) -> list:
        """Every scored parameter dimension (a tied weight can be a member twice)."""
        return list(self.structure(False).state.members.values())

    def _compute_filter_scores(
        self, criterion: str, calibration: np.ndarray | None, seed: int
    ) -> dict[tuple[str, int], np.ndarray]:
        return SCORERS[criterion](self, criterion, calibration, seed)

    def param(self, name: str, *, check_finite: bool = True) -> torch.Tensor:
        """The value of parameter `name`. Read from `weights`, it is checked for NaN and
        infinities unless `check_finite` is False (the caller then checks it: see
        `check_weight_finite`)."""
        if self.weights is not None:
            tensor = self.weights(name)
            if check_finite:
                self.check_weight_finite(name, tensor)
            return tensor
        owner, _, attr = name.rpartition(".")
        module = self.gm.get_submodule(owner) if owner else self.gm
        return getattr(module, attr).detach()

    @staticmethod
    def check_weight_finite(name: str, tensor: torch.Tensor) -> None:
        """Refuse a weight with NaN or infinite values (one line naming it)."""
        if tensor.is_floating_point() and tensor.numel() and not _finite(tensor):
            raise ModelLoadError(f"the model has NaN or infinite values in {name}; fix "
                                 "the weights before pruning")

    def raw_scores(
        self,
        criterion: str = "l2",
        calibration: np.ndarray | None = None,
        seed: int = 0,
        indices: Any = None,
        whole_blocks: bool = False,
    ) -> dict[str, dict[str, np.ndarray]]:
        """Per group, per member layer: the raw score of each group channel."""
        filters = self.filter_scores(criterion, calibration, seed)
        out = {}
        for g in self.prunable_groups(whole_blocks):
            out[g.name] = {
                layer: _per_channel(filters[(s.member.param, s.member.dim)], s)
                for layer, s in g.slots.items()
            }
        return out

    def group_inputs(self, options: PruningOptions, calibration=None) -> list[GroupInput]:
        whole = options.prunes_whole_blocks
        raw = self.raw_scores(options.criterion, calibration, options.seed, whole_blocks=whole)
        inputs = []
        for g in self.prunable_groups(whole):
            inputs.append(
                GroupInput(
                    name=g.name,
                    raw=raw[g.name],
                    # a head is one channel here; heads are not subject to the step rule
                    blocks=np.arange(g.channels).reshape(-1, 1) if g.whole_blocks
                    else g.block_index,
                    whole_blocks=g.whole_blocks,
                    prunable=g.prunable.copy(),
                )
            )
        return inputs

    def removals_from_indices(
        self, indices: Mapping[str, Iterable[int]], whole_blocks: bool
    ) -> dict[str, np.ndarray]:
        """Criterion ``index``: layer -> filter indices, mapped onto group channels."""
        layer_groups = {}
        for g in self.prunable_groups(whole_blocks):
            for layer in g.layers:
                layer_groups[layer] = g
        removals: dict[str, set[int]] = {}
        for layer, wanted in indices.items():
            if layer not in layer_groups:
                raise OptionError(
                    f"--indices names layer {layer!r}, which is not a prunable layer; "
                    f"prunable layers include: {', '.join(list(layer_groups)[:8])}"
                )
            g = layer_groups[layer]
            slots = g.slots[layer]
            n = self.param(slots.member.param).shape[slots.member.dim]
            for i in wanted:
                if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
                    raise OptionError(
                        f"--indices: index {i!r} for layer {layer!r} is out of range 0..{n - 1}"
                    )
                channel = slots.channel[slots.slot_index == int(i)]
                removals.setdefault(g.name, set()).update(int(c) for c in channel)
        return {name: np.array(sorted(v), dtype=np.int64) for name, v in removals.items()}


def _check_finite(gm: fx.GraphModule) -> None:
    """A NaN or infinite weight makes every score and every comparison meaningless.

    Buffers are only checked for NaN: some models keep masks of -inf in buffers on purpose.
    """
    bad = [
        name
        for name, tensor in gm.named_parameters()
        if tensor.is_floating_point() and tensor.numel() and not _finite(tensor.detach())
    ] + [
        name
        for name, tensor in gm.named_buffers()
        if tensor.is_floating_point() and tensor.numel() and _has_nan(tensor.detach())
    ]
    if bad:
        raise ModelLoadError(
            f"the model has NaN or infinite values in {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + "; fix the weights before pruning"
        )


def _has_nan(tensor: torch.Tensor) -> bool:
    return bool(torch.isnan(torch.aminmax(tensor).min))


def _finite(tensor: torch.Tensor) -> bool:
    # min/max propagate NaN and show infinities, without a full-size boolean temporary
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _per_channel(filter_scores: np.ndarray, slots) -> np.ndarray:
    """Mean raw score of a member's filters in each group channel."""
    n = int(slots.channel.max()) + 1 if len(slots.channel) else 0
    total = np.bincount(slots.channel, weights=filter_scores[slots.slot_index], minlength=n)
    count = np.bincount(slots.channel, minlength=n)
    return total / np.maximum(count, 1)


def _feature_scores(analysis: Analysis, members, calibration: np.ndarray) -> dict:
    wanted = {m.node: m for m in members}
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.name in wanted and isinstance(result, torch.Tensor):
                captured[n.name].append(result.detach())
            return result

    x = torch.as_tensor(np.asarray(calibration))
    example = analysis.captured.example_inputs[0]
    if tuple(x.shape[1:]) != tuple(example.shape[1:]) or x.dim() != example.dim():
        raise OptionError(
            f"calibration inputs have shape {tuple(x.shape)}, but the model takes inputs of "
            f"shape (N, {', '.join(str(s) for s in example.shape[1:])})"
        )
    if x.dtype != example.dtype:
        x = x.to(example.dtype)
    batch = _batch_size(analysis, x)
    recorder = Recorder(on_device(analysis.gm))
    rest = to_device(tuple(analysis.captured.example_inputs[1:]))
    with torch.inference_mode(), calibration_autocast():
        # the chunks that start within the first 256 samples
        first = x[:math.ceil(min(len(x), 256) / batch) * batch]
        for (chunk,), _real in sample_chunks([first], batch, fixed=not _dynamic_batch(analysis)):
            run_graph(recorder, (to_device(chunk), *rest),
                      to_device(analysis.captured.example_kwargs))
    out = {}
    for node, m in wanted.items():
        if not captured[node]:
            raise OptionError("nuclear_norm: the calibration data produced no feature maps")
        feats = torch.cat(captured[node], dim=0).float().cpu()
        out[(m.param, m.dim)] = nuclear_norm_scores(feats, m.out_dim)
    return out


# ---------------------------------------------------------------- the criteria's scorers
# criterion -> scorer(analysis, criterion, calibration, seed) -> {(param, dim): raw scores};
# one entry per criterion of engine.options.CRITERION_TABLE except "index" (scored as l2)
Scorer = Callable[[Analysis, str, Any, int], dict]


def _weight_scorer(analysis: Analysis, criterion: str, _calibration: Any, _seed: int) -> dict:
    # each weight is read once for all its scored dims (a streamed analysis reads it from disk)
    dims_of: dict[str, list[int]] = {}
    for m in analysis.members():
        dims_of.setdefault(m.param, []).append(m.dim)
    names = list(dims_of)
    # a weights source may say in which order its weights are cheapest to read (a streamed
    # prune reads its shards backwards: engine/stream.py)
    read_order = getattr(analysis.weights, "read_order", None)
    if read_order is not None:
        names = read_order(names)
    def score(name: str) -> dict[tuple[str, int], np.ndarray]:
        dims = dims_of[name]
        # every value of a weight takes part in its scores: where they are all finite, so is
        # the weight (a separate NaN pass over a streamed model's weights costs about as much
        # as the scoring); where one is not, the weight itself is checked
        weight = analysis.param(name, check_finite=False)
        scores = {(name, dim): scores for dim, scores in
                  weight_scores_by_dim(weight, dims, criterion).items()}
        if not all(np.isfinite(s).all() for s in scores.values()):
            analysis.check_weight_finite(name, weight)
        return scores

    out: dict[tuple[str, int], np.ndarray] = {}
    # a weights source may read and score several weights at once (a streamed prune: each
    # thread reads one weight and scores it, `readinto` and torch release the GIL), at most
    # that many in memory; torch is on one thread for all of them (set once, not per thread)
    threads = getattr(analysis.weights, "scoring_threads", 1)
    if threads <= 1:
        for name in names:
            out.update(score(name))
        return out
    with one_torch_thread(), ThreadPoolExecutor(threads,
                                                thread_name_prefix="prunescope-score") as pool:
        running: deque[Future] = deque()
        for name in names:
            running.append(pool.submit(score, name))
            if len(running) >= threads:
                out.update(running.popleft().result())
        while running:
            out.update(running.popleft().result())
    return out


def _random_scorer(analysis: Analysis, _criterion: str, _calibration: Any, seed: int) -> dict:
    return {(m.param, m.dim): random_scores(analysis.param(m.param).shape[m.dim], seed,
                                            f"{m.layer}:{m.dim}")
            for m in analysis.members()}


def _nuclear_norm_scorer(analysis: Analysis, _criterion: str, calibration: Any,
                         _seed: int) -> dict:
    return _feature_scores(analysis, analysis.members(), calibration.inputs[0])


def _data_aware_scorer(analysis: Analysis, criterion: str, calibration: Any,
                       _seed: int) -> dict:
    scorer = DataAwareScorer(analysis.gm, analysis.captured, analysis.structure(False).state,
                             calibration)
    return scorer.scores(criterion)


SCORERS: dict[str, Scorer] = {
    "l2": _weight_scorer,
    "l1": _weight_scorer,
    "gm": _weight_scorer,
    "random": _random_scorer,
    "nuclear_norm": _nuclear_norm_scorer,
    **{name: _data_aware_scorer for name in DATA_CRITERIA},
}


def _dynamic_batch(analysis: Analysis) -> bool:
    for node in analysis.captured.program.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim():
                if isinstance(val.shape[0], torch.SymInt):
                    return True
    return False


def _batch_size(analysis: Analysis, x: torch.Tensor) -> int:
    if _dynamic_batch(analysis):
        return 32
    return int(analysis.captured.example_inputs[0].shape[0])


@exclusive
def analyze(model: Any, example_inputs: tuple | None = None, **load_kwargs) -> Analysis:
    """Capture (if needed) and analyse a model: its groups, frozen layers and score cache."""
    if isinstance(model, Analysis):
        return model
    return Analysis(load_model(model, example_inputs, **load_kwargs))


_DESCRIBE_ROUNDS = 8  # re-plans of --uniform for a transformers config, at most


@exclusive
@device_scope
def plan(
    analysis: Analysis,
    options: PruningOptions | dict | None = None,
    *,
    ratio: float | None = None,
    ratios: Mapping[str, float] | None = None,
    pinned: Iterable[str] = (),
    calibration: np.ndarray | None = None,
    indices: Mapping[str, Iterable[int]] | None = None,
    uniform: bool = False,
    device: str | torch.device | None = None,
    amp: str | None = None,
) -> Plan:
    """Decide what every group loses; fast, reuses cached raw scores. Data-aware criteria
    run their calibration passes on `device`, in `amp` autocast if given (engine.device).

    ``uniform``: every repeated layer of the same kind loses the same number of channels
    (engine/scoring/uniform.py), so a transformers config can describe the result."""
    options = PruningOptions.from_any(options)
    removals = None
    if indices and options.criterion != "index":
        raise OptionError("indices name filters to remove; they need criterion index")
    if options.criterion == "index":
        if not indices:
            raise OptionError("criterion index needs --indices FILE.json (layer -> indices)")
        removals = analysis.removals_from_indices(indices, options.prunes_whole_blocks)
    inputs = analysis.group_inputs(options, calibration)
    if uniform:
        pinned = [pinned] if isinstance(pinned, str) else list(pinned)
        if analysis.captured.hf is None:
            return uniform_plan(inputs, options, ratio=ratio, ratios=ratios, pinned=pinned,
                                removals=removals)
        limits = config_constraints(analysis, options.prunes_whole_blocks)
        pinned += sorted(set(limits.keep) - set(pinned))
        adjust = count_adjuster(analysis, options)
        rotary = None if options.prunes_whole_blocks else rotary_heads(analysis)
        # groups no config describes together with the rest stay whole; plan again
        for _ in range(_DESCRIBE_ROUNDS):
            the_plan = uniform_plan(inputs, options, ratio=ratio, ratios=ratios, pinned=pinned,
                                    removals=removals, adjust=adjust, ties=limits.ties)
            if rotary is not None and rotary.group not in pinned:
                # rotary frequencies a config can give: one contiguous run
                the_plan = keep_contiguous(the_plan, rotary.group, rotary.frequency_channel)
            more = sorted(set(keep_to_describe(analysis, the_plan)) - set(pinned))
            if not more:
                break
            pinned += more
        return the_plan
    return make_plan(inputs, options, ratio=ratio, ratios=ratios, pinned=pinned,
                     removals=removals)
