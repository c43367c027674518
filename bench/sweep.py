"""6. Sweeps, sensitivity and automatic per-group ratios on the demo (accuracy, no recovery).

- The demo's sweep: 5 layer norms x 7 ratios (l2, other options default) on the held-out
  evaluation set, in the local process pool (one worker per core), analysis included.
- Its sensitivity: each of the 4 groups alone at 9 ratios, measured on the calibration split.
- Automatic ratios at 50% of the FLOPs removed (chosen on the calibration split only: a
  measured greedy over channel-count levels, then a pair-frontier refinement; judged on the
  evaluation set) against the uniform global ratio removing at least as much, for every layer
  norm.
"""

from __future__ import annotations

import os
import resource
import time

from bench.common import Goal, Section, md_table
from engine.options import LAYER_NORMS

NAME = "sweep"
TITLE = "8. Sweeps, sensitivity and automatic ratios (demo)"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
TARGET = 0.5


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the pool's workers): what the
    work costs, whatever else the machine is running."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(quick: bool = False) -> Section:
    import engine
    from engine.pipeline import apply
    from engine.quality.evaluate import load_calibration_data, load_eval_data
    from engine.quality.sensitivity import sensitivity
    from engine.quality.sweep import sweep
    from engine.quality.sweep_job import point_quality
    from engine.quality.targets import SCREEN_SAMPLES, ratios_for_target
    from engine.scoring.auto_ratios import uniform_ratio

    ratios = RATIOS[::3] if quick else RATIOS
    workers = os.cpu_count()
    start, cpu = time.perf_counter(), _cpu_s()
    report = sweep("demo", {"layer_norm": "all"}, ratios, eval_data="demo", workers=workers)
    sweep_s, sweep_cpu = time.perf_counter() - start, _cpu_s() - cpu
    table = {}
    for p in report["points"]:
        table.setdefault(p["options"]["layer_norm"], {})[p["ratio"]] = p["metric"]
    body = [f"Sweep: {len(report['points'])} points, {workers} workers, "
            f"**{sweep_s:.1f} s** ({sweep_cpu:.1f} CPU-seconds; original accuracy "
            f"{report['original']:.3f}).",
            md_table(["layer norm", *[f"{r:g}" for r in ratios]],
                     [[n, *[f"{table[n][r]:.3f}" for r in ratios]] for n in table])]

    calib = load_calibration_data("demo")
    start, cpu = time.perf_counter(), _cpu_s()
    sens = sensitivity("demo", {}, (0.3, 0.6, 0.9) if quick else
                       (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                       eval_data=calib, workers=workers)
    sens_s, sens_cpu = time.perf_counter() - start, _cpu_s() - cpu
    body.append(f"Sensitivity: {len(sens['points'])} points ({len(sens['groups'])} groups), "
                f"**{sens_s:.1f} s** ({sens_cpu:.1f} CPU-seconds), accuracy drop on the "
                "calibration split:")
    body.append(md_table(["group", *[f"{r:g}" for r in sens["ratios"]]],
                         [[g["name"], *[f"{c['drop']:.3f}" for c in g["curve"][1:]]]
                          for g in sens["groups"]]))

    analysis = engine.analyze("demo")
    evald = load_eval_data("demo")
    start = time.perf_counter()
    auto = ratios_for_target("demo", {}, target_flops=TARGET, sensitivity_data=calib,
                             eval_data=evald, sensitivity_report=sens, analysis=analysis)
    auto_s = time.perf_counter() - start
    search = auto["search"]
    rows = [["auto ratios (" + ", ".join(f"{k} {v:g}" for k, v in auto["ratios"].items())
             + ")", "", f"{auto['removed']:.1%}", f"{auto['comparison']['auto']:.3f}"]]
    best = 0.0
    total = sens["before"]["flops"]
    for norm in LAYER_NORMS:

        def removed(_ratios, ratio, norm=norm):
            the_plan = engine.plan(analysis, {"layer_norm": norm}, ratio=ratio)
            return 1.0 - apply(analysis, the_plan).after["flops"] / total

        ratio, got = uniform_ratio("flops", TARGET, removed)
        result = apply(analysis, engine.plan(analysis, {"layer_norm": norm}, ratio=ratio))
        value = point_quality(result, evald)["value"]
        best = max(best, value)
        rows.append([f"global ratio, {norm}", f"{ratio:g}", f"{got:.1%}", f"{value:.3f}"])
    gain = auto["comparison"]["auto"] - best
    greedy = ", ".join(f"{k} {v:g}" for k, v in search["greedy_ratios"].items())
    body.append(f"Auto ratios at {TARGET:.0%} of the FLOPs removed ({auto['method']}, "
                f"**{auto_s:.1f} s** after the sensitivity: search {search['seconds']:.1f} s, "
                f"{search['screened']} candidates screened on {SCREEN_SAMPLES} calibration "
                f"samples, {search['measured']} measured on the whole calibration split; "
                f"calibration accuracy {-search['greedy_loss']:.3f} at the greedy's end "
                f"({greedy}), {-search['loss']:.3f} after the pair refinement). Each global "
                "ratio is the smallest that removes at least the target (bisection on the "
                "measured FLOPs, which only move in whole channels), accuracy on the "
                "evaluation set:")
    body.append(md_table(["ratios", "global ratio", "FLOPs removed", "accuracy"], rows))
    goals = [
        Goal(NAME, "demo sweep (5 layer norms x 7 ratios) < 15 s",
             f"{sweep_s:.1f} s ({sweep_cpu:.1f} CPU-s)", None if quick else sweep_s < 15),
        Goal(NAME, "demo sensitivity < 30 s", f"{sens_s:.1f} s ({sens_cpu:.1f} CPU-s)",
             None if quick else sens_s < 30),
        Goal(NAME, "auto ratios beat the best global ratio (5 layer norms) by >= 10 points "
             "at 50% FLOPs", f"{auto['comparison']['auto']:.3f} vs {best:.3f} "
             f"({100 * gain:+.1f} points)", gain >= 0.10),
    ]
    return Section(NAME, TITLE, "\n\n".join(body), goals)
