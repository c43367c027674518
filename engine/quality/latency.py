"""The measured speed of a pruned model against its original: report.json's ``latency``.

FLOPs and parameters do not predict latency (memory traffic, kernel shapes and channel counts
that a library does not like decide it), so both models are timed on this machine: torch on
the chosen device, and ONNX Runtime on the CPU, at batch 1 (or the captured batch) and a
larger batch. The two models run alternately (original, pruned, pruned, original, ...), so a
machine that slows down or speeds up during the measurement affects both alike; each figure
is the median of its runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.device import current, on_device, to_device
from engine.graph.outputs import tensor_leaves
from engine.io.export import export_onnx

LARGE_BATCH = 8
RUNS = 10
WARMUP = 2
BUDGET_S = 10.0  # per batch size and runtime: fewer runs (at least 3) for slow models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def interleaved_medians(calls: Sequence[Callable[[], Any]], runs: int = RUNS,
                        warmup: int = WARMUP, budget_s: float = BUDGET_S,
                        sync: Callable[[], None] = lambda: None) -> list[float]:
    """Median seconds of each call, timed in alternating order round after round (the order
    reversed every round), after `warmup` untimed rounds; stops early once `budget_s` is
    spent and 3 rounds are done."""
    for _ in range(warmup):
        for call in calls:
            call()
    sync()
    times: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    for r in range(runs):
        order = range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            t0 = time.perf_counter()
            calls[i]()
            sync()
            times[i].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return [float(statistics.median(t)) for t in times]


def _batched(inputs: tuple, batch: int) -> tuple:
    """The example inputs cut or repeated along dim 0 to `batch` samples."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim():
            repeats = -(-batch // x.shape[0])
            x = x.repeat(repeats, *([1] * (x.dim() - 1)))[:batch]
        out.append(x)
    return tuple(out)


def _row(batch: int, original: float, pruned: float) -> dict[str, Any]:
    return {"batch": batch, "original_ms": round(original * 1e3, 4),
            "pruned_ms": round(pruned * 1e3, 4),
            "speedup": round(original / pruned, 4) if pruned > 0 else None}


def _torch_rows(original: torch.nn.Module, pruned: torch.nn.Module, inputs: tuple,
                kwargs: dict, batches: list[int], runs: int) -> list[dict]:
    device = current()
    models = [on_device(original), on_device(pruned)]
    rows = []
    for batch in batches:
        x, kw = to_device(_batched(inputs, batch)), to_device(kwargs)
        try:
            with torch.inference_mode():
                for m in models:
                    m(*x, **kw)
        except Exception as exc:  # noqa: BLE001 - a graph captured with a fixed batch
            rows.append({"batch": batch, "error": _one_line(exc)})
            continue

        medians = interleaved_medians([_forward(m, x, kw) for m in models], runs,
                                      sync=lambda: _sync(device))
        rows.append(_row(batch, *medians))
    return rows


def _forward(module: torch.nn.Module, inputs: tuple, kwargs: dict) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return module(*inputs, **kwargs)
    return run


def _onnx_rows(programs: list[torch.export.ExportedProgram], inputs: tuple,
               batches: list[int], runs: int) -> list[dict] | dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="prunescope-latency-") as tmp:
        sessions = []
        for name, program in zip(("original", "pruned"), programs):
            path = export_onnx(program, Path(tmp) / f"{name}.onnx")
            options = ort.SessionOptions()
            options.log_severity_level = 3
            sessions.append(ort.InferenceSession(str(path), options,
                                                 providers=["CPUExecutionProvider"]))
        rows = []
        for batch in batches:
            arrays = [t.detach().cpu().numpy() for t in tensor_leaves(_batched(inputs, batch))]
            feeds = [dict(zip([i.name for i in s.get_inputs()], arrays)) for s in sessions]
            try:
                for s, feed in zip(sessions, feeds):
                    s.run(None, feed)
            except Exception as exc:  # noqa: BLE001 - an ONNX graph with a fixed batch
                rows.append({"batch": batch, "error": _one_line(exc)})
                continue
            medians = interleaved_medians(
                [lambda s=s, f=feed: s.run(None, f) for s, feed in zip(sessions, feeds)], runs)
            rows.append(_row(batch, *medians))
    return rows


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def latency_report(original: Any, result: Any, *, onnx: bool = True, runs: int = RUNS,
                   large_batch: int = LARGE_BATCH) -> dict[str, Any]:
    """``report["latency"]``: the original (a Captured or Analysis with its weights) and the
    pruned model (a PruneResult) timed on the current device (engine.device) with torch and,
    with `onnx`, on the CPU with ONNX Runtime; at batch 1 and at `large_batch` (the example's
    batch when the graph takes no other). ``speedup`` = original time / pruned time, beside
    ``flops_ratio`` (original FLOPs / pruned FLOPs)."""
    captured = getattr(original, "captured", original)
    program = captured.program
    inputs = tuple(captured.example_inputs)
    kwargs = dict(captured.example_kwargs or {})
    base = int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], torch.Tensor) \
        and inputs[0].dim() else 1
    batches = sorted({1, large_batch})
    rows = _torch_rows(program.module(), result.module, inputs, kwargs, batches, runs)
    if all("error" in row for row in rows) and base not in batches:
        batches = [base]  # a graph captured with a fixed batch runs that batch only
        rows = _torch_rows(program.module(), result.module, inputs, kwargs, batches, runs)
    before, after = result.report["before"]["flops"], result.report["after"]["flops"]
    report: dict[str, Any] = {
        "device": str(current()),
        "method": "median of interleaved runs (original and pruned alternately), "
                  f"{WARMUP} warm-up rounds, up to {runs} timed rounds",
        "flops_ratio": round(before / after, 4) if after else None,
        "torch": rows,
    }
    if onnx and not kwargs:
        try:
            report["onnxruntime_cpu"] = _onnx_rows([program, result.program], inputs,
                                                   batches, runs)
        except Exception as exc:  # noqa: BLE001 - the torch figures still stand
            report["onnxruntime_cpu"] = {"error": _one_line(exc)}
    return report


def latency_lines(latency: dict[str, Any]) -> list[str]:
    """What the CLI prints: one line per runtime and batch size."""
    lines = []
    for key, name in (("torch", f"torch {latency['device']}"),
                      ("onnxruntime_cpu", "onnxruntime cpu")):
        rows = latency.get(key)
        if isinstance(rows, dict):
            lines.append(f"latency ({name}): not measured: {rows['error']}")
            continue
        for row in rows or []:
            if "error" in row:
                lines.append(f"latency ({name}) batch {row['batch']}: not measured: "
                             f"{row['error']}")
            else:
                lines.append(f"latency ({name}) batch {row['batch']}: "
                             f"{row['original_ms']:.3g} ms -> {row['pruned_ms']:.3g} ms "
                             f"({row['speedup']:.2f}x faster; FLOPs {latency['flops_ratio']}x "
                             "fewer)")
    return lines


__all__ = ["interleaved_medians", "latency_lines", "latency_report"]
