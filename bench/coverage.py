"""5. Coverage side by side: the coupling zoo (tests/zoo.py) and six transformers models
through both tools at ratio 0.5.

Correct means: the pruned model runs and returns the original output shapes. For ours that is
the report's verification (which also compares the pruned model with the masked original),
checked again here by running the pruned module; for Torch-Pruning it is a forward pass of
the pruned model after updating the attention modules' size attributes as its examples do.
"Pruned" means the parameter count went down.
"""

from __future__ import annotations

import copy
import time

from bench.common import Goal, Section, collect, fmt_s, md_table, one_line
from bench.models import TRANSFORMERS, BenchModel, zoo
from bench.peers import output_shapes, param_count, run_ours, run_torch_pruning

NAME = "coverage"
TITLE = "5. Coverage: the zoo and transformers models through both tools (ratio 0.5)"
RATIO = 0.5


def _ours(bm: BenchModel, ref: list) -> dict:
    model = copy.deepcopy(bm.model)
    start = time.perf_counter()
    try:
        run = run_ours(model, bm.inputs, RATIO)
    except Exception as exc:  # noqa: BLE001 - a failure is the result
        return {"error": one_line(exc), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    report = run.result.report
    v = report["verification"]
    try:
        shapes_ok = output_shapes(run.result.module, bm.inputs) == ref
    except Exception as exc:  # noqa: BLE001
        return {"error": f"pruned module fails: {one_line(exc)}", "seconds": seconds}
    return {"before": report["before"]["params"], "after": report["after"]["params"],
            "shapes_ok": shapes_ok and v["output_shapes_match"], "exact": v["exact"],
            "relative": v["relative_diff_vs_masked"], "seconds": seconds,
            "groups": sum(1 for g in report["groups"] if g["pruned"]),
            "frozen": len(report["frozen"])}


def _peer(bm: BenchModel, ref: list) -> dict:
    model = copy.deepcopy(bm.model)
    before = param_count(model)
    start = time.perf_counter()
    try:
        run = run_torch_pruning(bm, model, RATIO)
    except Exception as exc:  # noqa: BLE001
        return {"error": one_line(exc), "seconds": time.perf_counter() - start}
    seconds = run.total
    after = param_count(model)
    try:
        shapes_ok = output_shapes(model, bm.inputs) == ref
        error = None if shapes_ok else "output shapes changed"
    except Exception as exc:  # noqa: BLE001
        shapes_ok, error = False, f"pruned model fails: {one_line(exc)}"
    return {"before": before, "after": after, "shapes_ok": shapes_ok, "seconds": seconds,
            "run_error": error}


def _pruned(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    if r["after"] >= r["before"]:
        return "nothing pruned"
    return f"-{100 * (1 - r['after'] / r['before']):.0f}% params"


def _correct(r: dict, ours: bool) -> str:
    if "error" in r:
        return "-"
    if not r["shapes_ok"]:
        return f"**no** ({r.get('run_error') or 'shapes changed'})"
    if ours:
        return "yes, exact" if r["exact"] else f"yes (vs masked {r['relative']:.2g})"
    return "yes"


def _ok(r: dict) -> bool:
    return "error" not in r and r["shapes_ok"] and r["after"] < r["before"]


def run(quick: bool = False) -> Section:
    factories = dict(zoo())
    models = TRANSFORMERS if not quick else {"Llama GQA (small)": TRANSFORMERS["Llama GQA (small)"]}
    factories.update(models)
    rows = []
    ours_ok = peer_ok = 0
    for name, factory in factories.items():
        try:
            bm = factory()
            ref = output_shapes(bm.model, bm.inputs)
        except Exception as exc:  # noqa: BLE001
            rows.append((name, f"model does not build: {one_line(exc)}", "-", "-", "-", "-", "-"))
            continue
        ours = _ours(bm, ref)
        collect()
        peer = _peer(bm, ref)
        collect()
        ours_ok += _ok(ours)
        peer_ok += _ok(peer)
        rows.append((bm.name, _pruned(ours), _correct(ours, True), fmt_s(ours["seconds"]),
                     _pruned(peer), _correct(peer, False), fmt_s(peer["seconds"])))
        del bm
        collect()
    n = len(factories)
    goals = [Goal(NAME, "models pruned and correct: ours / Torch-Pruning",
                  f"{ours_ok}/{n} / {peer_ok}/{n}", None)]
    body = [
        "Ours: `engine.prune(..., ratio=0.5)` with default options. Torch-Pruning: "
        "`MetaPruner`, `MagnitudeImportance(p=2)`, pruning_ratio 0.5, the output layers "
        "ignored (classifier / lm_head; for the zoo, the layer(s) producing the output), "
        "`num_heads` for attention projections; Llama as in its LLM example (whole heads, "
        "`prune_head_dims=False`). Ours' time includes its verification, not the lazy re-export.",
        md_table(["model", "ours: pruned", "ours: correct", "ours: time",
                  "Torch-Pruning: pruned", "Torch-Pruning: correct", "Torch-Pruning: time"],
                 rows),
        f"Pruned and correct: ours {ours_ok}/{n}, Torch-Pruning {peer_ok}/{n}.",
    ]
    return Section(NAME, TITLE, "\n\n".join(body), goals)
