"""One "Prune" click: engine.apply, engine.save, latency and fidelity, as plain data.
model.onnx is made on demand (`onnx_file`), not on every click.

Kept apart from the page so it can be driven by a progress callback (the page's st.status)
and tested without Streamlit. Pruning itself is the engine's; this only orchestrates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dashboard.evaluate import evaluate_pair
from dashboard.sources import one_line
from engine.io.data import DataSet

LATENCY_RUNS = 10
PER_GROUP_DROPPED = ("The Plan tab's own ratios and pins were not applied: they name groups of "
                     "the full model, and removing whole blocks or experts re-captures it with "
                     "other groups; the global ratio was used.")


@dataclass
class PruneRun:
    model_key: str
    signature: str  # what the plan was made from, to tell a stale result
    options: dict[str, Any]
    ratio: float
    files: dict[str, Path]
    before: dict[str, Any]
    after: dict[str, Any]
    fidelity: dict[str, Any] = field(default_factory=dict)
    fidelity_on: str = ""
    channels_pruned: int = 0
    channels_total: int = 0
    notes: list[str] = field(default_factory=list)
    model_label: str = ""
    result: Any = field(default=None, repr=False)  # the engine's PruneResult (for recovery)


def saved_onnx(files: dict[str, Path]) -> Path | None:
    """The saved result's model.onnx if it has been converted, else None."""
    path = files.get("model.onnx")
    return path if path is not None and path.is_file() else None


def onnx_file(engine: Any, files: dict[str, Path], result: Any) -> Path:
    """The saved result's model.onnx, converted and checked on first request
    (engine.save_onnx, which also rewrites report.json); `files` gains its paths.

    Converting costs seconds on the demos and minutes on a large model, and most Prune and
    Recover clicks are steps towards settings, not a download, so a click writes model.pt2
    and report.json only; the Graphs tab and the model.onnx download ask for this."""
    path = saved_onnx(files)
    if path is not None:
        return path
    saved = engine.save_onnx(result, files["model.pt2"].parent)
    files.update({name: Path(p) for name, p in saved.items()})
    return files["model.onnx"]


def _original_module(model: Any):
    """The original as a runnable module, built once per model (cached with the model)."""
    module = model.cache.get("original_module")
    if module is None:
        module = model.cache["original_module"] = model.captured.program.module()
    return module


def _latencies(engine: Any, original: Any, pruned: Any, example: tuple) -> tuple[float, float]:
    """Median CPU latency of both models, measured interleaved after a warm-up of each.

    The first calls of a freshly built module pay one-off costs (kernel selection, caches);
    interleaving two rounds and keeping each model's best median keeps that and background
    load out of the comparison.
    """
    measure = engine.quality.metrics.measure_latency
    rounds: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(2):
        rounds["before"].append(measure(original, example, warmup=3, runs=LATENCY_RUNS))
        rounds["after"].append(measure(pruned, example, warmup=3, runs=LATENCY_RUNS))
    return min(rounds["before"]), min(rounds["after"])


def run_prune(engine: Any, model: Any, plan: Any, out_dir: Path, eval_data: DataSet | None,
              signature: str, ratio: float,
              progress: Callable[[str], None] = lambda _msg: None,
              plan_args: dict[str, Any] | None = None,
              structures: dict[str, Any] | None = None) -> PruneRun:
    """Prune ``model`` as planned, save the artefacts, and measure before/after.

    With ``plan_args`` (what made ``plan``: ratio, ratios, pinned, calibration, indices,
    uniform) the whole run is ``engine.prune`` on the page's analysis, which also removes the
    ``structures`` (``remove_blocks`` / ``expert_ratio``) before width pruning and writes
    their report sections; the width plan is then made again on the smaller model. Without
    them, ``engine.apply`` applies ``plan`` as shown.
    """
    wanted = {k: v for k, v in (structures or {}).items() if v}
    dropped = ""
    if plan_args is not None:
        progress("Removing the planned blocks, experts and channels (engine.prune)…"
                 if wanted else "Removing the planned channels (engine.prune)…")
        args = dict(plan_args)
        args["ratios"] = args.get("ratios") or None
        args["pinned"] = tuple(args.get("pinned") or ())
        if wanted and (args["ratios"] or args["pinned"]):
            # they name the full model's groups; the re-captured smaller model has others
            args["ratios"], args["pinned"] = None, ()
            dropped = PER_GROUP_DROPPED
        result = engine.prune(model.analysis, options=plan.options, **args, **wanted,
                              progress=lambda m: progress(f"· {m}"))
    else:
        progress("Removing the planned channels (engine.apply)…")
        result = engine.apply(model.analysis, plan, progress=lambda m: progress(f"· {m}"))
    plan = result.plan
    example = tuple(model.captured.example_inputs)
    before = dict(result.before)
    after = dict(result.after)
    notes: list[str] = [dropped] if dropped else []
    original = _original_module(model)
    engine_latency = result.report.get("latency")
    if not engine_latency:
        progress("Timing both models on the CPU (short run)…")
        try:
            before["latency_s"], after["latency_s"] = _latencies(engine, original,
                                                                 result.module, example)
        except Exception as e:  # latency is informative only
            notes.append(f"latency not measured: {e}")

    fid: dict[str, Any] = {}
    fid_on = ""
    progress("Comparing outputs on the evaluation data…")
    try:
        if eval_data is not None and len(example) == 1:
            fid = evaluate_pair(original, result.module, eval_data, example,
                                cache=model.cache, remember=True)
            fid_on = eval_data.source
        else:
            x = example[0].detach().cpu().numpy() if len(example) == 1 else None
            if x is not None:
                examples = DataSet((x,), None, "the example inputs", "evaluation data")
                fid = evaluate_pair(original, result.module, examples, example)
                fid_on = "the example inputs (no evaluation data given)"
            else:
                notes.append("fidelity needs a single-input model or evaluation data")
    except Exception as e:
        notes.append(f"fidelity not measured: {one_line(e)}")
    if fid:
        # report.json carries what the page shows (as `prune --eval-data` writes it)
        result.report["quality"] = quality_section(fid, fid_on)

    progress("Writing model.pt2 and report.json (engine.save)…")
    with warnings.catch_warnings():  # the hf/ reason is shown as a note below
        warnings.filterwarnings("ignore", message="hf/ not written")
        saved = engine.save(result, out_dir, onnx=False, progress=lambda m: progress(f"· {m}"))
    files = {name: Path(p) for name, p in saved.items()}
    hf = result.report.get("hf")
    if hf and not hf["written"]:
        notes.append(f"hf/ not written: {hf['reason']}")

    total = int(sum(np.asarray(g.scores).size for g in plan.groups))
    pruned = int(sum(np.asarray(g.pruned).size for g in plan.groups))
    return PruneRun(
        model_key=model.key,
        signature=signature,
        options=plan.options.to_dict() if hasattr(plan, "options") else {},
        ratio=ratio,
        files=files,
        before=before,
        after=after,
        fidelity=fid,
        fidelity_on=fid_on,
        channels_pruned=pruned,
        channels_total=total,
        notes=notes,
        model_label=getattr(model, "label", ""),
        result=result,
    )


def quality_section(fid: dict[str, Any], data: str) -> dict[str, Any]:
    """report.json's ``quality`` from the page's fidelity numbers: ``{"metric", "original",
    "pruned", "samples", "data"}`` (the CLI's fields), plus agreement and relative error."""
    metric = fid.get("metric")
    if metric is not None:
        section = {"metric": metric, "original": fid[f"{metric}_before"],
                   "pruned": fid[f"{metric}_after"]}
    elif "top1_agreement" in fid:
        section = {"metric": "agreement", "original": 1.0, "pruned": fid["top1_agreement"]}
    else:
        section = {"metric": "relative_error", "original": 0.0,
                   "pruned": fid["relative_error"]}
    section.update(samples=int(fid.get("samples", 0)), data=data)
    for key in ("top1_agreement", "relative_error"):
        if key in fid:
            section[key] = fid[key]
    return section


def latency_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """The engine's measured latency (``report["latency"]``, when the engine measured it) as
    rows: every number it holds, seconds shown in ms and a speedup as ×."""
    latency = report.get("latency")
    if not isinstance(latency, dict):
        return []
    rows = []

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix} {k}".strip(), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if "speedup" in prefix:
                text = f"{value:.2f}×"
            elif prefix.endswith(("_s", " s", "seconds")) or "latency" in prefix:
                text = f"{value * 1000:.3g} ms"
            elif prefix.endswith("_ms"):
                text = f"{value:.3g} ms"
            else:
                text = f"{value:g}"
            rows.append({"Measure": prefix.replace("_", " "), "Value": text})
        elif isinstance(value, str):
            rows.append({"Measure": prefix.replace("_", " "), "Value": value})

    add("", latency)
    return rows


def history_row(run: PruneRun, number: int) -> dict[str, Any]:
    """One line of the session's run history: options, size, metric, latency."""
    fid = run.fidelity
    metric = fid.get("metric")
    quality = quality_section(fid, run.fidelity_on) if fid else {}
    row: dict[str, Any] = {"run": number, "model": run.model_label or run.model_key,
                           **{k: v for k, v in run.options.items() if k != "seed"},
                           "ratio": round(run.ratio, 4),
                           "channels pruned": f"{run.channels_pruned}/{run.channels_total}"}
    for key in ("params", "flops", "size_bytes"):
        if run.after.get(key) is not None:
            row[f"{key} after"] = run.after[key]
            if run.before.get(key):
                row[f"{key} kept"] = round(run.after[key] / run.before[key], 4)
    if quality:
        row["metric"] = metric or quality["metric"]
        row["metric before"] = quality["original"]
        row["metric after"] = quality["pruned"]
        row["measured on"] = run.fidelity_on
    if run.before.get("latency_s") and run.after.get("latency_s"):
        row["latency before (ms)"] = round(run.before["latency_s"] * 1000, 4)
        row["latency after (ms)"] = round(run.after["latency_s"] * 1000, 4)
    return row


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def _human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def comparison_rows(run: PruneRun) -> list[dict[str, str]]:
    """Before/after table rows: metric, before, after, change."""
    rows = []
    specs = (
        ("Parameters", "params", _human_count),
        ("FLOPs", "flops", _human_count),
        ("Size", "size_bytes", _human_bytes),
        ("CPU latency", "latency_s", lambda s: f"{s * 1000:.2f} ms"),
    )
    for label, key, fmt in specs:
        b, a = run.before.get(key), run.after.get(key)
        if b is None or a is None:
            continue
        change = f"{(a - b) / b * 100:+.1f}%" if b else "n/a"
        rows.append({"Metric": label, "Before": fmt(b), "After": fmt(a), "Change": change})
    return rows
