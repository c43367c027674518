"""1. End to end against Torch-Pruning: ResNet-50, ViT-B/16 and BERT-base at ratio 0.5.

Ours: ``engine.prune(model, inputs, PruningOptions(criterion="l2"), ratio=0.5)``, capture
and verification included (the re-export, lazy in the engine, is timed apart).
Torch-Pruning: ``MetaPruner`` with ``MagnitudeImportance(p=2)`` at pruning_ratio 0.5,
construction + ``step()``, the classifier ignored and ``num_heads`` given for the attention
projections. Runs alternate in one process
(the order flips every repetition); every run gets a fresh deepcopy of a model built once,
copied outside the timed region. Also measured in the same run: ``torch.export`` alone and
one plain copy of all the model's weights (the floor for work that must read every weight).
"""

from __future__ import annotations

import copy

import torch

from bench.common import (
    Goal,
    Section,
    collect,
    copy_weights_seconds,
    fmt_count,
    fmt_s,
    md_table,
    median,
    one_line,
    profile,
    profile_tables,
    timed,
)
from bench.models import BenchModel, bert_base, resnet50, vit_base, zoo
from bench.peers import output_shapes, param_count, run_ours, run_torch_pruning

NAME = "e2e"
TITLE = "1. End to end against Torch-Pruning (ratio 0.5, l2 / MagnitudeImportance(p=2))"
RATIO = 0.5
SPEEDUP_GOAL = 2.0
FLOOR_GOAL = 3.0
LABELS = {
    "capturing the model": "capture",
    "analysing channel dependencies and scoring": "analyse + score + plan",
    "running the masked original": "masked reference",
    "removing channels": "rewrite",
    "verifying": "verify",
    "re-exporting": "re-export",
    "measuring": "metrics",
}


def _phase_names(runs: list[dict[str, float]]) -> list[str]:
    """The engine's progress messages in the order they came (whatever this version says)."""
    names = dict.fromkeys(n for r in runs for n in r if not n.startswith("("))
    return list(names)


def _warm_up() -> None:
    """First calls pay one-off imports and lazy initialisation in both tools; a small zoo
    model takes those costs outside the measured runs."""
    for name in ("conv_bn_residual", "attention_sdpa"):
        bm = zoo()[name]()
        run_ours(copy.deepcopy(bm.model), bm.inputs, RATIO)
        run_torch_pruning(bm, copy.deepcopy(bm.model), RATIO)


def _measure(bm: BenchModel, reps: int) -> dict:
    ref = output_shapes(bm.model, bm.inputs)
    data: dict = {key: [] for key in ("ours", "capture", "phases", "tp", "tp_construct",
                                      "tp_step", "ours_cpu", "tp_cpu", "copy", "export",
                                      "reexport")}
    data.update({key: None for key in ("ours_params", "tp_params", "verification",
                                       "tp_shapes_ok", "ours_error", "tp_error")})
    for rep in range(reps):
        order = ("ours", "tp") if rep % 2 == 0 else ("tp", "ours")
        for who in order:
            model = copy.deepcopy(bm.model)
            collect()
            try:
                if who == "ours":
                    run = run_ours(model, bm.inputs, RATIO, reexport=True)
                    data["ours"].append(run.total)
                    data["reexport"].append(run.reexport)
                    data["ours_cpu"].append(run.cpu)
                    data["capture"].append(run.capture)
                    data["phases"].append(run.clock.phases())
                    data["ours_params"] = run.result.report["after"]["params"]
                    data["verification"] = run.result.report["verification"]
                else:
                    run = run_torch_pruning(bm, model, RATIO)
                    data["tp"].append(run.total)
                    data["tp_cpu"].append(run.cpu)
                    data["tp_construct"].append(run.construct)
                    data["tp_step"].append(run.step)
                    data["tp_params"] = param_count(model)
                    try:
                        data["tp_shapes_ok"] = output_shapes(model, bm.inputs) == ref
                    except Exception as exc:  # noqa: BLE001 - a broken pruned model is a result
                        data["tp_shapes_ok"] = False
                        data["tp_error"] = f"pruned model fails: {one_line(exc)}"
            except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking
                data[f"{who}_error"] = one_line(exc)
            del model
            collect()
        data["copy"].append(copy_weights_seconds(bm.model))
        _, export_s = timed(lambda: torch.export.export(bm.model, bm.inputs, strict=False))
        data["export"].append(export_s)
        collect()
    return data


def run(quick: bool = False) -> Section:
    reps = 1 if quick else 3
    factories = [resnet50] if quick else [resnet50, vit_base, bert_base]
    _warm_up()
    rows, phase_rows, size_rows, raw_rows, goals, profiles = [], [], [], [], [], []
    phases: list[str] = []
    for factory in factories:
        bm = factory()
        params = param_count(bm.model)
        d = _measure(bm, reps)
        ours, tp_t = median(d["ours"]), median(d["tp"])
        capture = median(d["capture"])
        after = median([t - c for t, c in zip(d["ours"], d["capture"])])
        copy_s = median(d["copy"])
        speedup = tp_t / ours if ours and tp_t else None
        floor = after / copy_s if after and copy_s else None
        rows.append((
            bm.name, fmt_count(params), fmt_s(ours), fmt_s(capture), fmt_s(after),
            fmt_s(tp_t), f"{speedup:.2f}x" if speedup else "-", fmt_s(median(d["export"])),
            fmt_s(copy_s), f"{floor:.0f}x" if floor else "-", fmt_s(median(d["reexport"])),
        ))
        phases = _phase_names(d["phases"])
        phase_rows.append((bm.name, *[fmt_s(median([p.get(k, 0.0) for p in d["phases"]]))
                                      for k in phases],
                           fmt_s(median(d["tp_construct"])), fmt_s(median(d["tp_step"]))))
        v = d["verification"] or {}
        size_rows.append((
            bm.name, fmt_count(params),
            fmt_count(d["ours_params"]) if d["ours_params"] else d["ours_error"] or "-",
            "yes" if v.get("output_shapes_match") else "no",
            "exact" if v.get("exact") else (f"{v.get('relative_diff_vs_masked', 0):.2g}"
                                            if v else "-"),
            fmt_count(d["tp_params"]) if d["tp_params"] else d["tp_error"] or "-",
            {True: "yes", False: "no", None: "-"}[d["tp_shapes_ok"]],
        ))
        raw_rows.append((bm.name, ", ".join(f"{t:.2f}" for t in d["ours"]),
                         ", ".join(f"{t:.2f}" for t in d["tp"]),
                         f"{fmt_s(median(d['ours_cpu']))} / {fmt_s(median(d['tp_cpu']))}",
                         ", ".join(f"{t * 1000:.0f}" for t in d["copy"])))
        met_speed = speedup is not None and speedup >= SPEEDUP_GOAL
        met_floor = floor is not None and floor <= FLOOR_GOAL
        goals.append(Goal(NAME, f"{bm.name}: ours >= {SPEEDUP_GOAL:g}x faster than Torch-Pruning",
                          f"{fmt_s(ours)} vs {fmt_s(tp_t)} ({speedup:.2f}x)" if speedup
                          else d["ours_error"] or "-", met_speed))
        goals.append(Goal(NAME, f"{bm.name}: work after capture <= {FLOOR_GOAL:g}x one weight copy",
                          f"{fmt_s(after)} = {floor:.0f}x {fmt_s(copy_s)}" if floor else "-",
                          met_floor))
        if not quick and not (met_speed and met_floor) and not d["ours_error"]:
            model = copy.deepcopy(bm.model)
            _, stats, total = profile(lambda m=model, b=bm: run_ours(m, b.inputs, RATIO))
            profiles.append(f"#### Profile: ours on {bm.name}\n\n{profile_tables(stats, total)}")
            del model
        del bm
        collect()

    body = [
        f"Median of {reps} run(s) per tool, alternating in one process. Ours = `engine.prune` "
        "as called: capture, analysis, scoring, plan, rewrite, verification and metrics; the "
        "engine re-exports the pruned program lazily (on the first use of `result.program`, "
        "e.g. by `engine.save`), timed apart in the last column. \"After capture\" = ours minus "
        "the capture phase; Torch-Pruning = `MetaPruner` construction + `step()` (local pruning, "
        "the default; no verification or export). Floor = one `clone()` of every parameter "
        "and buffer.",
        md_table(["model", "params", "ours", "capture", "after capture", "Torch-Pruning",
                  "TP / ours", "torch.export alone", "weight copy", "after capture / copy",
                  "lazy re-export (not in ours)"], rows),
        "Where ours spends its time (medians, from the engine's progress messages):",
        md_table(["model", *[LABELS.get(n, n) for n in phases], "TP construct", "TP step"],
                 phase_rows),
        "What each tool produced:",
        md_table(["model", "params before", "ours: params after", "ours: shapes kept",
                  "ours: verification", "TP: params after", "TP: shapes kept"], size_rows),
        "Every run (wall seconds; copy in ms) and the median process CPU time (all threads; "
        "less sensitive than wall time to other load on the machine):",
        md_table(["model", "ours", "Torch-Pruning", "CPU: ours / TP", "weight copy (ms)"],
                 raw_rows),
        *profiles,
    ]
    return Section(NAME, TITLE, "\n\n".join(body), goals)
