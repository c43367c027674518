"""3. Scaling: a Llama-style model (hidden 2048, GQA 16/4 heads, intermediate 5632) at 4, 8
and 16 layers: time and peak memory to score, prune and verify.

Every size runs in a fresh subprocess (``python -m bench.scaling --child N``) so that its peak
resident memory (``getrusage`` ru_maxrss) is its own; only one model is alive at a time. The
model is fp32; the vocabulary is the config's 32,000 (embedding + untied head: 131 M
parameters, 15% of the 16-layer model, so it does not dominate). One more subprocess profiles
the largest size with pyinstrument.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import (
    REPO,
    Goal,
    PhaseClock,
    Section,
    current_rss_bytes,
    fmt_bytes,
    fmt_count,
    fmt_s,
    md_table,
    one_line,
    param_count,
    peak_rss_bytes,
    profile,
    profile_tables,
    quiet,
    tensor_bytes,
    threads,
)

NAME = "scaling"
TITLE = "3. Scaling: Llama-style 2048 hidden, GQA 16/4, 5632 intermediate, 4/8/16 layers"
VOCAB = 32000
SEQ = 32
TIME_GOAL = 15.0
RUNS = 2  # per size; the faster run is kept (other load only ever adds time)
PHASE_LABELS = {"running the masked original": "masked reference",
                "removing channels": "rewrite", "verifying": "verify",
                "re-exporting": "re-export", "measuring": "metrics"}
MEMORY_GOAL = 2.0


def _child(layers: int, do_profile: bool) -> dict:
    quiet()
    import torch

    torch.set_num_threads(threads())

    import engine
    from bench.models import llama

    rss_imports = current_rss_bytes()
    bm = llama(layers=layers, hidden=2048, heads=16, kv_heads=4, intermediate=5632,
               vocab=VOCAB, length=SEQ, dtype=torch.float32)
    model_bytes = tensor_bytes(bm.model)
    rss_model = current_rss_bytes()
    out: dict = {"layers": layers, "params": param_count(bm.model), "model_bytes": model_bytes,
                 "rss_imports": rss_imports, "rss_model": rss_model}

    def work() -> dict:
        times: dict[str, float] = {}
        cpu = time.process_time()
        start = time.perf_counter()
        an = engine.analyze(bm.model, bm.inputs)
        times["capture"] = time.perf_counter() - start
        t = time.perf_counter()
        an.structure()
        times["analysis"] = time.perf_counter() - t
        t = time.perf_counter()
        an.raw_scores("l2")
        times["score"] = time.perf_counter() - t
        t = time.perf_counter()
        the_plan = engine.plan(an, engine.PruningOptions(criterion="l2"), ratio=0.5)
        times["plan"] = time.perf_counter() - t
        clock = PhaseClock()
        result = engine.apply(an, the_plan, progress=clock)
        clock.stop()
        for name, seconds in clock.phases().items():
            if not name.startswith("("):
                times[PHASE_LABELS.get(name, name)] = seconds
        times["total"] = time.perf_counter() - start
        times["cpu"] = time.process_time() - cpu
        peak_verified = peak_rss_bytes()
        # The engine re-exports lazily, on the first use of result.program (engine.save).
        t = time.perf_counter()
        _ = result.program
        times["re-export (lazy)"] = time.perf_counter() - t
        return {"times": times, "after_params": result.report["after"]["params"],
                "verification": result.report["verification"], "peak_verified": peak_verified}

    try:
        if do_profile:
            res, stats, total = profile(work, interval=0.005)
            out["profile"] = profile_tables(stats, total)
        else:
            res = work()
        out.update(res)
    except Exception as exc:  # noqa: BLE001 - the parent reports the failure
        out["error"] = one_line(exc, 300)
    out["peak_rss"] = peak_rss_bytes()
    return out


def _spawn(layers: int, do_profile: bool = False, timeout: float = 900) -> dict:
    cmd = [sys.executable, "-m", "bench.scaling", "--child", str(layers)]
    if do_profile:
        cmd.append("--profile")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"layers": layers, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"layers": layers, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def run(quick: bool = False) -> Section:
    sizes = (4, 8) if quick else (4, 8, 16)
    runs = 1 if quick else RUNS
    results, all_totals = [], {}
    for n in sizes:
        tries = [_spawn(n) for _ in range(runs)]
        good = [r for r in tries if "error" not in r]
        all_totals[n] = [r["times"]["total"] for r in good]
        results.append(min(good, key=lambda r: r["times"]["total"]) if good else tries[0])
    prof = None if quick else _spawn(sizes[-1], do_profile=True)
    phase_names = list(dict.fromkeys(
        k for r in results if "error" not in r for k in r["times"] if k not in ("total", "cpu")))
    rows, phase_rows, goals = [], [], []
    for r in results:
        if "error" in r:
            rows.append((r["layers"], "-", "-", "-", r["error"], *["-"] * 7))
            continue
        t = r["times"]
        peak, model_bytes = r["peak_verified"], r["model_bytes"]
        rows.append((
            r["layers"], fmt_count(r["params"]), fmt_bytes(model_bytes),
            fmt_count(r["after_params"]),
            fmt_s(t["total"]), ", ".join(f"{x:.1f}" for x in all_totals[r["layers"]]),
            fmt_s(t["cpu"]), fmt_bytes(peak), fmt_bytes(r["peak_rss"]),
            f"{peak / model_bytes:.2f}x",
            f"{(peak - r['rss_imports']) / model_bytes:.2f}x",
            "exact" if r["verification"].get("exact") else "shapes only"
            if r["verification"].get("output_shapes_match") else "failed",
        ))
        phase_rows.append((r["layers"], *[fmt_s(t.get(p)) for p in phase_names]))
    ok = [r for r in results if "error" not in r]
    per_layer = []
    for a, b in zip(ok, ok[1:]):
        per_layer.append((f"{a['layers']} → {b['layers']}",
                          fmt_s((b["times"]["total"] - a["times"]["total"])
                                / (b["layers"] - a["layers"])),
                          fmt_s((b["times"]["cpu"] - a["times"]["cpu"])
                                / (b["layers"] - a["layers"]))))
    if len(ok) >= 3:
        steps = [(b["times"]["total"] - a["times"]["total"]) / (b["layers"] - a["layers"])
                 for a, b in zip(ok, ok[1:])]
        linear = max(steps) <= 1.5 * min(steps) and min(steps) > 0
        goals.append(Goal(NAME, "time linear in depth (per-layer cost within 1.5x across sizes)",
                          ", ".join(f"{s:.2f} s/layer" for s in steps), linear))
    big = next((r for r in results if r["layers"] == 16), None)
    if big is not None:
        if "error" in big:
            for what in ("score + prune + verify < 15 s", "peak RSS < 2x model size"):
                goals.append(Goal(NAME, f"16 layers: {what}", big["error"], False))
        else:
            total = big["times"]["total"]
            ratio = big["peak_verified"] / big["model_bytes"]
            goals.append(Goal(NAME, f"16 layers ({fmt_count(big['params'])} params): score + "
                              f"prune + verify < {TIME_GOAL:g} s", fmt_s(total), total < TIME_GOAL))
            goals.append(Goal(NAME, f"16 layers: peak RSS < {MEMORY_GOAL:g}x model size",
                              f"{fmt_bytes(big['peak_verified'])} = {ratio:.2f}x "
                              f"{fmt_bytes(big['model_bytes'])} (fp32)", ratio < MEMORY_GOAL))
    body = [
        f"fp32 weights, vocabulary {VOCAB:,}, input 1 x {SEQ} tokens, ratio 0.5, criterion l2. "
        "Total = capture + analysis + scoring + plan + `engine.apply` (rewrite, verification "
        "by forward passes of the original, masked and pruned models, metrics); the lazy "
        f"re-export (first use of `result.program`) is timed apart. {runs} run(s) per size, "
        "each in a fresh subprocess; the faster is shown. Peak RSS is the whole process "
        "(Python, torch and transformers included) up to the end of verification; "
        "\"(peak − imports)\" subtracts the RSS measured after the imports. CPU = process CPU "
        "time, all threads.",
        md_table(["layers", "params", "model (fp32)", "params after", "total", "runs (s)",
                  "CPU", "peak RSS", "peak incl. re-export", "peak / model",
                  "(peak − imports) / model", "verification"], rows),
        "Phases:",
        md_table(["layers", *phase_names], phase_rows),
        "Marginal time per layer:",
        md_table(["sizes", "wall per added layer", "CPU per added layer"], per_layer)
        if per_layer else "-",
    ]
    if prof is not None:
        if "profile" in prof:
            body.append(f"#### Profile: {prof['layers']} layers\n\n{prof['profile']}")
        else:
            body.append(f"Profile run failed: {prof.get('error')}")
    return Section(NAME, TITLE, "\n\n".join(body), goals)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", type=int, required=True)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(json.dumps(_child(args.child, args.profile)), flush=True)
