"""6. Depth vs width pruning at equal parameter counts: batch-1 CPU latency.

Depth removes half of the residual blocks (attention and MLP sublayers, scored by their
relative branch norm on the example input, ``block_ratio=0.5``); width then removes channels
at the global ratio whose pruned model has the same parameter count (found by bisection,
within 2% of the original's parameters). Both pruned models and the original are the
captured programs' modules, timed in interleaved rounds; the number is the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

import engine
from bench.common import Goal, Section, collect, fmt_count, md_table, one_line
from bench.models import BenchModel, bert_base, llama
from engine.quality.metrics import count_params

NAME = "depth"
TITLE = "6. Depth vs width pruning at equal parameter counts (CPU, batch 1)"


def _latency(modules: dict[str, Any], inputs: tuple, rounds: int, per_round: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in modules}
    with torch.inference_mode():
        for module in modules.values():
            module(*inputs)  # warm-up
        for _ in range(rounds):
            for name, module in modules.items():
                for _ in range(per_round):
                    start = time.perf_counter()
                    module(*inputs)
                    times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _width_at(analysis, target: int, tolerance: int, steps: int = 7):
    """The width-pruned result whose parameter count is closest to `target` (bisection)."""
    low, high = 0.0, 0.9
    best = None
    for _ in range(steps):
        ratio = (low + high) / 2
        result = engine.apply(analysis, engine.plan(analysis, ratio=ratio))
        params = result.report["after"]["params"]
        if best is None or abs(params - target) < abs(best[1] - target):
            best = (result, params, ratio)
        if abs(params - target) <= tolerance:
            break
        if params > target:
            low = ratio
        else:
            high = ratio
    return best


def _compare(bench: BenchModel, rounds: int, per_round: int) -> tuple[list, dict]:
    analysis = engine.analyze(bench.model, bench.inputs)
    original = analysis.gm
    params = count_params(original)
    depth = engine.prune(analysis, block_ratio=0.5)
    depth_params = depth.report["after"]["params"]
    removed = [b["name"] for b in depth.report["blocks"] if b["removed"]]
    width, width_params, ratio = _width_at(analysis, depth_params, params // 50)
    lat = _latency({"original": original, "depth": depth.module, "width": width.module},
                   bench.inputs, rounds, per_round)
    rows = []
    for label, module_params, seconds, what in (
        ("original", params, lat["original"], "-"),
        ("depth", depth_params, lat["depth"],
         f"{len(removed)} of {len(depth.report['blocks'])} blocks"),
        ("width", width_params, lat["width"], f"global ratio {ratio:.3f}"),
    ):
        rows.append((bench.name, label, what, fmt_count(module_params),
                     f"{seconds * 1e3:.1f}", f"{lat['original'] / seconds:.2f}x"))
    return rows, {"depth": lat["original"] / lat["depth"], "width": lat["original"] / lat["width"],
                  "blocks": removed}


def run(quick: bool = False) -> Section:
    if quick:
        models = [lambda: bert_base(length=32),
                  lambda: llama(layers=4, hidden=256, intermediate=688, length=32,
                                name="Llama-style, 4 layers, 256 hidden")]
        rounds, per_round = 3, 2
    else:
        models = [bert_base,
                  lambda: llama(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=1376,
                                vocab=4096, length=64,
                                name="Llama-style, 8 layers, 512 hidden, GQA 8/2")]
        rounds, per_round = 5, 4
    rows, goals, notes = [], [], []
    for build in models:
        bench = build()
        try:
            model_rows, speed = _compare(bench, rounds, per_round)
        except Exception as exc:  # noqa: BLE001 - a failing model is a row, not a crash
            rows.append((bench.name, "error", one_line(exc), "", "", ""))
            continue
        finally:
            collect()
        rows += model_rows
        notes.append(f"{bench.name}: removed blocks {', '.join(speed['blocks'])}")
        goals.append(Goal(NAME, f"{bench.name}: depth vs width speed-up at equal params",
                          f"depth {speed['depth']:.2f}x, width {speed['width']:.2f}x", None))
    table = md_table(["model", "pruning", "what", "params", "latency ms", "speed-up"], rows)
    body = table + "\n\n" + "\n".join(f"- {n}" for n in notes)
    return Section(NAME, TITLE, body, goals)
