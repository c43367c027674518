"""``python -m bench.gpu_check [--device cuda] [--amp bf16]``: every path that runs a model on
the chosen device, once, with a table of what it gave and how long it took.

A check, not a benchmark: a GPU user (or a GPU CI machine) runs it in a few minutes to see
that verification forwards, data-aware scoring, data-light recovery, distillation and
evaluation all run on the device. Nothing in `make test` needs a GPU; on the CPU this script
runs the same paths (the default device is ``auto``: a GPU when there is one).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import engine
from bench.common import md_table
from bench.models import llama
from engine.device import resolve_device, using


def _step(rows: list, name: str, fn: Callable[[], Any], describe: Callable[[Any], str]) -> Any:
    start = time.perf_counter()
    try:
        value = fn()
        outcome = describe(value)
    except Exception as exc:  # noqa: BLE001 - a failed path is a row of the table
        value, outcome = None, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    rows.append((name, f"{time.perf_counter() - start:.2f}", outcome))
    return value


def _verified(result) -> str:
    v = result.report["verification"]
    return (f"on {result.report['device']}; max abs diff vs mask mode "
            f"{v['max_abs_diff_vs_masked']:.3g}, exact={v['exact']}")


def run(device: str = "auto", amp: str | None = None, distill_steps: int = 200) -> str:
    """The table (markdown) of every device path on `device`."""
    where = resolve_device(device)
    rows: list[tuple] = []
    with using(where, amp):
        demo = _step(rows, "prune demo (l2, 0.5) + verification",
                     lambda: engine.prune("demo", ratio=0.5), _verified)
        bm = llama(layers=2, hidden=512, heads=8, kv_heads=2, intermediate=1376, length=64)
        _step(rows, "prune Llama-style (2 layers, d 512) + verification",
              lambda: engine.prune(bm.model, bm.inputs, ratio=0.3, uniform=True), _verified)
        an = engine.analyze("demo")
        _step(rows, f"wanda scoring, demo calibration (amp {amp or 'off'})",
              lambda: engine.plan(an, {"criterion": "wanda"}, ratio=0.5, calibration="demo"),
              lambda p: f"{sum(len(g.pruned) for g in p.groups)} channels chosen")
        _step(rows, "data-light recovery (bias, lsq, bn, norm)",
              lambda: engine.recover(demo, "demo", "bias,lsq,bn,norm"),
              lambda r: f"held-out {r.report['recovery']['metric']} "
                        f"{r.report['recovery']['metric_before']:.4f} -> "
                        f"{r.report['recovery']['metric_after']:.4f}")
        _step(rows, f"distillation, {distill_steps} steps",
              lambda: engine.recover(demo, "demo", "distill", steps=distill_steps),
              lambda r: f"held-out {r.report['recovery']['metric']} "
                        f"{r.report['recovery']['metric_before']:.4f} -> "
                        f"{r.report['recovery']['metric_after']:.4f}")
        _step(rows, "evaluation, demo held-out set (original, pruned)",
              lambda: (engine.evaluate("demo", "demo"), engine.evaluate(demo, "demo")),
              lambda pair: f"accuracy {pair[0]['value']:.4f}, {pair[1]['value']:.4f}")
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else str(where)
    head = (f"Device: {where} ({name}); torch {torch.__version__}; amp {amp or 'off'}; "
            f"{torch.get_num_threads()} CPU thread(s).")
    return head + "\n\n" + md_table(["path", "seconds", "result"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--amp", default=None, help="bf16 or fp16 calibration passes")
    p.add_argument("--distill-steps", type=int, default=200)
    args = p.parse_args(argv)
    table = run(args.device, args.amp, args.distill_steps)
    print(table)
    return 1 if "FAILED" in table else 0


if __name__ == "__main__":
    raise SystemExit(main())
