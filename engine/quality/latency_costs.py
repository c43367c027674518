"""Per-group latency costs measured on this machine, for `--target-latency F`.

FLOPs do not predict latency, so each prunable group is pruned alone at a few ratios and the
pruned model is timed against the original (interleaved runs, torch on the current device):
the fraction of the latency each group saves at each ratio. The table is cached per model,
options, device and thread count (``$XDG_CACHE_HOME/prunescope/latency``, default
``~/.cache``), so a second run on the same model starts at once. Savings of several groups are
taken to add up; the chosen ratios are then timed for real and the measured saving reported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.device import current, on_device, to_device
from engine.io.export import write_json
from engine.options import PruningOptions
from engine.pipeline import prune_unverified
from engine.quality.latency import interleaved_medians
from engine.scoring.analysis import Analysis, plan

RATIOS = (0.25, 0.5, 0.75)
RUNS = 5


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prunescope" / "latency"


def _fingerprint(analysis: Analysis, options: PruningOptions, ratios: tuple) -> str:
    h = hashlib.sha256()
    h.update(analysis.gm.code.encode())
    for name, p in sorted(analysis.gm.state_dict().items()):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if p.is_floating_point() and p.numel():
            h.update(np.float64(p.detach().double().sum()).tobytes())
    for x in analysis.captured.example_inputs:
        if isinstance(x, torch.Tensor):
            h.update(f"{tuple(x.shape)}{x.dtype}".encode())
    h.update(json.dumps([options.to_dict(), list(ratios), str(current()),
                         torch.get_num_threads(), torch.__version__]).encode())
    return h.hexdigest()[:24]


def _forward(module: torch.nn.Module, inputs: tuple, kwargs: dict):
    def run() -> Any:
        with torch.inference_mode():
            return module(*inputs, **kwargs)
    return run


def group_latency(analysis: Analysis, options: PruningOptions | dict | None = None, *,
                  calibration: Any = None, ratios: tuple = RATIOS, runs: int = RUNS,
                  use_cache: bool = True) -> dict[str, Any]:
    """``{"device", "original_s", "ratios", "groups": {name: [saved fraction per ratio]},
    "cached"}``: each group pruned alone at each ratio, timed against the original."""
    options = PruningOptions.from_any(options)
    path = cache_dir() / f"{_fingerprint(analysis, options, ratios)}.json"
    if use_cache and path.is_file():
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
        except (OSError, ValueError):
            pass  # a damaged cache entry is measured again
    inputs = to_device(tuple(analysis.captured.example_inputs))
    kwargs = to_device(dict(analysis.captured.example_kwargs or {}))
    original = _forward(on_device(analysis.gm), inputs, kwargs)
    originals: list[float] = []
    groups: dict[str, list[float]] = {}
    for group in analysis.prunable_groups(options.prunes_whole_blocks):
        saved = []
        for r in ratios:
            the_plan = plan(analysis, options, ratios={group.name: r}, calibration=calibration)
            gm, _ = prune_unverified(analysis, the_plan)
            t_original, t_pruned = interleaved_medians(
                [original, _forward(on_device(gm), inputs, kwargs)], runs=runs, warmup=1)
            originals.append(t_original)
            saved.append(round(1.0 - t_pruned / t_original, 5))
        groups[group.name] = saved
    table = {"device": str(current()), "original_s": float(np.median(originals or [0.0])),
             "ratios": list(ratios), "groups": groups}
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, table)
    return {**table, "cached": False}


def saved_fraction(costs: Mapping[str, Any], fractions: Mapping[str, float]) -> float:
    """The predicted latency saving of removing `fractions` (group -> pruned fraction) of the
    groups' channels: each group's measured saving interpolated, summed over groups."""
    grid = [0.0, *costs["ratios"]]
    total = 0.0
    for name, fraction in fractions.items():
        saved = costs["groups"].get(name)
        if saved is not None and fraction > 0:
            total += float(np.interp(fraction, grid, [0.0, *saved]))
    return total


def add_latency(sensitivity_report: dict, costs: Mapping[str, Any]) -> None:
    """Give the sensitivity curves a ``latency`` figure (seconds, predicted from the measured
    costs) beside params and FLOPs, so the ratio search can aim at it."""
    total = costs["original_s"]
    sensitivity_report["before"]["latency"] = total
    for g in sensitivity_report["groups"]:
        for point in g["curve"]:
            point["latency"] = total * (1.0 - saved_fraction(costs, {g["name"]: point["ratio"]}))
    for point in sensitivity_report.get("points", []):
        if "ratios" in point:
            point["latency"] = total * (1.0 - saved_fraction(costs, point["ratios"]))


def measured_saving(analysis: Analysis, the_plan: Any, runs: int = RUNS) -> dict[str, float]:
    """The chosen plan's real latency against the original's (interleaved medians)."""
    inputs = to_device(tuple(analysis.captured.example_inputs))
    kwargs = to_device(dict(analysis.captured.example_kwargs or {}))
    gm, _ = prune_unverified(analysis, the_plan)
    t_original, t_pruned = interleaved_medians(
        [_forward(on_device(analysis.gm), inputs, kwargs),
         _forward(on_device(gm), inputs, kwargs)], runs=runs)
    return {"original_ms": round(t_original * 1e3, 4), "pruned_ms": round(t_pruned * 1e3, 4),
            "removed": round(1.0 - t_pruned / t_original, 4)}
