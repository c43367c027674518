"""Running the two tools the same way in every benchmark: ours (engine) and Torch-Pruning."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

import engine
from bench.common import PhaseClock, param_count
from bench.models import BenchModel, tp_fix_attributes


def output_shapes(model: Any, inputs: tuple) -> list[tuple[int, ...]]:
    with torch.no_grad():
        out = model(*inputs)
    return [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@dataclass
class OursRun:
    result: engine.PruneResult
    clock: PhaseClock
    cpu: float  # process CPU seconds (all threads): less sensitive to other load than wall
    reexport: float | None = None  # first access of result.program, outside ``total``

    @property
    def total(self) -> float:
        return self.clock.total

    @property
    def capture(self) -> float:
        return self.clock.phases().get("capturing the model", 0.0)


def run_ours(model: nn.Module, inputs: tuple, ratio: float, *, reexport: bool = False,
             **options: Any) -> OursRun:
    """engine.prune, capture included, with the phase times taken from its progress messages.

    The engine re-exports the pruned program lazily, on the first use of ``result.program``
    (``engine.save`` does it); with ``reexport`` that first use is timed too, separately.
    """
    cpu = time.process_time()
    clock = PhaseClock()
    result = engine.prune(model, inputs, engine.PruningOptions(criterion="l2", **options),
                          ratio=ratio, progress=clock)
    clock.stop()
    run = OursRun(result, clock, time.process_time() - cpu)
    if reexport:
        start = time.perf_counter()
        _ = result.program
        run.reexport = time.perf_counter() - start
    return run


@dataclass
class PeerRun:
    model: nn.Module
    construct: float
    step: float
    cpu: float

    @property
    def total(self) -> float:
        return self.construct + self.step


def run_torch_pruning(bm: BenchModel, model: nn.Module, ratio: float,
                      round_to: int | None = None) -> PeerRun:
    """Torch-Pruning's MetaPruner with MagnitudeImportance(p=2): construction + step().

    ``model`` must be a fresh copy: the ignored layers and head projections are looked up on
    it (modules of another copy would silently be ignored by nothing).
    """
    import torch_pruning as tp

    kwargs = dict(bm.tp_kwargs)
    if "head_pruning_ratio" in kwargs:
        kwargs["head_pruning_ratio"] = ratio
    ignored = bm.tp_ignored(model)
    heads = bm.tp_heads(model)
    cpu = time.process_time()
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, bm.inputs, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, num_heads=heads,
        output_transform=bm.tp_output, round_to=round_to, **kwargs,
    )
    built = time.perf_counter()
    pruner.step()
    done = time.perf_counter()
    cpu = time.process_time() - cpu
    tp_fix_attributes(model)
    return PeerRun(model, built - start, done - built, cpu)


def pruned_fraction(before: int, after: int) -> str:
    return f"{100 * (1 - after / before):.0f}%" if before else "-"


__all__ = ["OursRun", "PeerRun", "output_shapes", "param_count", "pruned_fraction", "run_ours",
           "run_torch_pruning"]
