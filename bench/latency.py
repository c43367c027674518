"""4. Is the pruned model really faster? CPU latency of the original and pruned ResNet-50,
ViT-B/16, BERT-base and a Llama-style model at ratios 0.3 and 0.5 and step sizes 1, 8 and 64,
in torch eager and ONNX Runtime, against the FLOPs cut: which widths the hardware rewards.

The original is the captured program (``ExportedProgram.module()``), the same form as the
pruned module, so both run the same ATen ops; both ONNX files come from the converter
``engine.save`` uses (``engine.io.export.export_onnx``). Channel rounding: ``step_size`` 1 (no
rounding), 8 and 64 keep a multiple of that many channels per group. Latencies are measured
in interleaved rounds (every variant in every round) so load changes on a shared machine hit
all variants alike; the number is the median of all iterations.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import engine
from bench.common import Goal, Section, collect, fmt_count, md_table, one_line
from bench.models import BenchModel, bert_base, llama, resnet50, vit_base
from engine.io.export import export_onnx
from engine.quality.metrics import count_flops, count_params

NAME = "latency"
TITLE = "4. Latency of pruned models on CPU (torch eager and ONNX Runtime)"


@dataclass
class Variant:
    label: str
    ratio: float | None
    step: int | None
    params: int
    flops: int
    module: Any
    session: Any
    feed: dict
    eager: list[float]
    ort: list[float]
    error: str | None = None


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()  # the same budget as torch
    options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _feed(session, inputs: tuple) -> dict:
    names = [i.name for i in session.get_inputs()]
    return {n: t.numpy() for n, t in zip(names, inputs)}


def _time_eager(module, inputs: tuple, n: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(n):
            start = time.perf_counter()
            module(*inputs)
            out.append(time.perf_counter() - start)
    return out


def _time_ort(session, feed: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        session.run(None, feed)
        out.append(time.perf_counter() - start)
    return out


def _variants(bm: BenchModel, ratios: tuple, steps: tuple, tmp: Path) -> list[Variant]:
    an = engine.analyze(bm.model, bm.inputs)
    original = an.captured.program
    path = export_onnx(original, tmp / "original.onnx")
    session = _session(path)
    variants = [Variant("original", None, None, count_params(an.gm),
                        count_flops(an.gm, bm.inputs), an.gm, session,
                        _feed(session, bm.inputs), [], [])]
    for ratio in ratios:
        for step in steps:
            label = f"ratio {ratio}, step {step}"
            try:
                the_plan = engine.plan(an, engine.PruningOptions(criterion="l2", step_size=step),
                                       ratio=ratio)
                res = engine.apply(an, the_plan)
                # the same converter engine.save uses, without its .pt2 copy and ORT check
                session = _session(export_onnx(res.program, tmp / f"r{ratio}-s{step}.onnx"))
                variants.append(Variant(label, ratio, step, res.after["params"],
                                        res.after["flops"], res.module, session,
                                        _feed(session, bm.inputs), [], []))
            except Exception as exc:  # noqa: BLE001 - a failing variant is a result
                variants.append(Variant(label, ratio, step, 0, 0, None, None, {}, [], [],
                                        one_line(exc)))
            collect()
    return variants


def _measure(variants: list[Variant], inputs: tuple, rounds: int, per_round: int) -> None:
    live = [v for v in variants if v.error is None]
    for v in live:  # warm-up: first calls allocate and pick kernels
        _time_eager(v.module, inputs, 2)
        _time_ort(v.session, v.feed, 2)
    for _ in range(rounds):
        for v in live:
            v.eager += _time_eager(v.module, inputs, per_round)
            v.ort += _time_ort(v.session, v.feed, per_round)


def _table(variants: list[Variant]) -> tuple[str, dict]:
    base = variants[0]
    b_eager = statistics.median(base.eager)
    b_ort = statistics.median(base.ort)
    rows, eff = [], {}
    for v in variants:
        if v.error:
            rows.append((v.label, "-", "-", "-", v.error, "-", "-", "-", "-", "-"))
            continue
        e, o = statistics.median(v.eager), statistics.median(v.ort)
        ideal = base.flops / v.flops if v.flops else float("nan")
        se, so = b_eager / e, b_ort / o
        eff[v.label] = (se / ideal, so / ideal, v.ratio, v.step, se, so)
        rows.append((v.label, fmt_count(v.params), fmt_count(v.flops), f"{ideal:.2f}x",
                     f"{e * 1000:.1f}", f"{se:.2f}x", f"{se / ideal:.2f}",
                     f"{o * 1000:.1f}", f"{so:.2f}x", f"{so / ideal:.2f}"))
    table = md_table(["variant", "params", "FLOPs", "ideal speed-up (FLOPs)", "eager ms",
                      "eager speed-up", "eager / ideal", "ORT ms", "ORT speed-up",
                      "ORT / ideal"], rows)
    return table, eff


def llama_style() -> BenchModel:
    """A Llama-shaped decoder wide enough for its matrix products to dominate (4 layers)."""
    return llama(layers=4, hidden=1024, heads=16, kv_heads=4, intermediate=2816, vocab=8192,
                 length=128, name="Llama-style (4 layers, d 1024, GQA 16/4)")


def run(quick: bool = False) -> Section:
    ratios = (0.5,) if quick else (0.3, 0.5)
    steps = (1, 64) if quick else (1, 8, 64)
    rounds, per_round = (3, 2) if quick else (5, 3)
    parts, goals = [], []
    for factory in (resnet50, vit_base, bert_base, llama_style):
        bm = factory()
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
            variants = _variants(bm, ratios, steps, Path(tmp))
            _measure(variants, bm.inputs, rounds, per_round)
        table, eff = _table(variants)
        shape = "x".join(str(s) for s in bm.inputs[0].shape)
        parts.append(f"#### {bm.name} (input {shape}, batch 1)\n\n{table}")
        for ratio in ratios:
            cells = {s: eff.get(f"ratio {ratio}, step {s}") for s in steps}
            if not all(cells.values()):
                continue
            best = max(steps, key=lambda s: cells[s][4])
            base_eager = cells[steps[0]][4]
            goals.append(Goal(
                NAME, f"{bm.name} at {ratio}: measured / ideal speed-up (eager, ORT)",
                "; ".join(f"step {s}: {cells[s][0]:.2f}, {cells[s][1]:.2f}" for s in steps)
                + f"; fastest eager: step {best} ({cells[best][4]:.2f}x vs "
                f"{base_eager:.2f}x at step {steps[0]})",
                None,
            ))
        del variants, bm
        collect()
    body = [
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s); ONNX Runtime "
        f"CPUExecutionProvider with {torch.get_num_threads()} intra-op thread(s). Medians of "
        f"{rounds} interleaved rounds x {per_round} iterations after 2 warm-up calls. "
        "Ideal speed-up = FLOPs before / FLOPs after (torch's FlopCounterMode); "
        "\"/ ideal\" = measured speed-up / ideal speed-up (1.0: the FLOPs cut turns fully into "
        "speed). Ratio = the engine's global ratio (l2, default options otherwise).",
        *parts,
    ]
    return Section(NAME, TITLE, "\n\n".join(body), goals)
