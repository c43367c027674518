"""6. Large models in bf16: `prunescope prune --ratio 0.3` on a `.pt2` against the floor.

Models: Llama-3.2-3B-shaped (hidden 3072, intermediate 8192, 28 layers, 24/8 heads,
vocabulary 128,256, tied embeddings as in Llama-3.2-3B: 3.2 B parameters, 6.0 GiB) and,
first, a 0.85 B Llama-style model (hidden 2048, intermediate 5632,
16 layers, 16/4 heads, vocabulary 32,000), both bf16 with random weights, built from their
configs and exported with an 8-token example input (the verification runs on it). Each is
built once, in its own subprocess, and cached under ``$PRUNESCOPE_BENCH_CACHE`` (default
``~/.cache/prunescope-bench``), never in the repository.

Measured in the same run, each in a fresh subprocess:
- floor: ``torch.export.load`` + ``torch.export.save`` of the original file;
- ``prunescope prune MODEL --ratio 0.3 --no-onnx --no-latency`` and the same with ONNX.
Peak RSS is the command's maximum resident set size (``ru_maxrss``, bench/isolated.py). A
watchdog polls the resident memory of the command and its children and kills it if it
passes the cap (by default the machine's available memory minus 3 GiB, at most 18 GiB;
``PRUNESCOPE_BENCH_RSS_CAP_GIB`` changes it), so a run that would exhaust this shared
machine is reported as killed instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Goal, Section, fmt_bytes, fmt_s, md_table, one_line, quiet
from bench.isolated import cache_dir, default_cap, llama_config, measured

NAME = "large"
TITLE = "9. Large models in bf16: prune a .pt2 against its load + save floor"
RATIO = "0.3"
SEQ = 8
RSS_GOAL = 1.5
TIME_GOAL = 1.5
ONNX_GOAL = 1.0  # ONNX may add at most one more floor
FIRST_CHART_GOAL = 20.0
REPLAN_GOAL = 0.2

MODELS = {
    "llama-0.85b": {"label": "Llama-style 0.85 B (2048 hidden, 16 layers)", "hidden": 2048,
                    "intermediate": 5632, "layers": 16, "heads": 16, "kv_heads": 4,
                    "vocab": 32000, "tied": False},
    "llama-3.2-3b": {"label": "Llama-3.2-3B shape (3072 hidden, 28 layers)", "hidden": 3072,
                     "intermediate": 8192, "layers": 28, "heads": 24, "kv_heads": 8,
                     "vocab": 128256, "tied": True},
}


def _build(name: str, path: Path) -> None:
    """The model from its config, random weights, bf16, exported with an 8-token input."""
    quiet()
    import torch
    from transformers import LlamaForCausalLM

    spec = MODELS[name]
    torch.manual_seed(0)
    cfg = llama_config(spec, use_cache=False, attn_implementation="sdpa",
                       tie_word_embeddings=spec["tied"])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids).logits

    ids = torch.randint(0, spec["vocab"], (1, SEQ))
    with torch.no_grad():
        program = torch.export.export(Logits().eval(), (ids,), strict=False)
    tmp = path.with_suffix(".tmp")
    torch.export.save(program, tmp)
    os.replace(tmp, path)


def _floor(src: Path, dst: Path) -> None:
    import torch

    program = torch.export.load(src)
    torch.export.save(program, dst)


def _model_file(name: str) -> tuple[Path, float]:
    path = cache_dir() / f"{name}-bf16.pt2"
    if path.exists():
        return path, 0.0
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.large", "--build", name, str(path)],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"building {name} failed: {lines[-1][:300]}")
    return path, time.perf_counter() - start


def _model_bytes(path: Path) -> int:
    """Bytes of the weights stored in the archive (the uncompressed zip entries of data/)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if "/data/" in i.filename
                   or i.filename.startswith("data/"))


def measure(name: str, cap: int) -> dict:
    path, built = _model_file(name)
    out: dict = {"name": name, "label": MODELS[name]["label"], "file_bytes": path.stat().st_size,
                 "model_bytes": _model_bytes(path), "built_s": built}
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        py = sys.executable
        out["floor"] = measured([py, "-m", "bench.large", "--floor", str(path),
                                 str(Path(tmp) / "copy.pt2")], cap)
        # the pruning itself against the floor: no latency timing (it keeps the original)
        out["prune"] = measured([py, "-m", "engine", "prune", str(path), "--ratio", RATIO,
                                 "--no-onnx", "--no-latency", "--out",
                                 str(Path(tmp) / "no-onnx")], cap)
        out["onnx"] = measured([py, "-m", "engine", "prune", str(path), "--ratio", RATIO,
                                "--no-latency", "--out", str(Path(tmp) / "onnx")], cap)
        report = Path(tmp) / "onnx" / "report.json"
        if not report.exists():
            report = Path(tmp) / "no-onnx" / "report.json"
        if report.exists():
            data = json.loads(report.read_text())
            out["report"] = {"before": data["before"], "after": data["after"],
                             "verification": data["verification"], "onnx": data.get("onnx")}
    for key in ("floor", "prune", "onnx"):
        out[key].pop("stdout", None)
        out[key].pop("stderr", None)
    # kept next to the model: a long run interrupted later still leaves this model's numbers
    (cache_dir() / f"{name}-last-run.json").write_text(json.dumps(out, indent=1))
    return out


def _dashboard(path: Path) -> dict:
    """The engine calls the dashboard makes on a model opened by path: load + analyse + plan
    + the score-overview chart (first chart), then re-plans after one option change."""
    quiet()
    import statistics

    import engine
    from dashboard import charts, frames

    start = time.perf_counter()
    captured = engine.load_model(str(path))
    analysis = engine.analyze(captured)
    groups = len(analysis.groups)
    options = engine.PruningOptions()
    plan = engine.plan(analysis, options, ratio=0.5)
    charts.score_overview(frames.stats_frame(plan), plan.threshold)
    first = time.perf_counter() - start
    changes = [("layer_norm", v) for v in ("tss_norm", "linear_scaling", "none")] + [
        ("policy", v) for v in ("sum", "backward")] + [
        ("group_policy", v) for v in ("sum", "count")] + [("step_size", 8)]
    replans = {}
    for key, value in changes:
        opts = engine.PruningOptions(**{**options.to_dict(), key: value})
        t = time.perf_counter()
        engine.plan(analysis, opts, ratio=0.5)
        replans[f"{key}={value}"] = time.perf_counter() - t
    for ratio in (0.3, 0.7):
        t = time.perf_counter()
        engine.plan(analysis, options, ratio=ratio)
        replans[f"ratio={ratio}"] = time.perf_counter() - t
    return {"first_chart_s": first, "groups": groups, "replans": replans,
            "replan_median_s": statistics.median(replans.values()),
            "replan_max_s": max(replans.values())}


def _dashboard_run(cap: int) -> dict:
    path, _ = _model_file("llama-0.85b")
    run = measured([sys.executable, "-m", "bench.large", "--dashboard", str(path)], cap)
    lines = [ln for ln in run["stdout"].splitlines() if ln.startswith("{")]
    if "error" in run or not lines:
        return {"error": run.get("error", "no output")}
    return {**json.loads(lines[-1]), "peak_rss": run["peak_rss"]}


def _cell(run: dict, floor: float | None, model_bytes: int) -> tuple[str, str]:
    if "error" in run:
        return run["error"], f"{fmt_bytes(run['peak_rss'])} ({run['peak_rss'] / model_bytes:.2f}x)"
    ratio = f" ({run['seconds'] / floor:.2f}x floor)" if floor else ""
    return (f"{fmt_s(run['seconds'])}{ratio}",
            f"{fmt_bytes(run['peak_rss'])} ({run['peak_rss'] / model_bytes:.2f}x)")


def run(quick: bool = False) -> Section:
    names = ["llama-0.85b"] if quick else list(MODELS)
    cap = default_cap()
    rows, goals, notes = [], [], []
    for name in names:
        try:
            r = measure(name, cap)
        except Exception as exc:  # noqa: BLE001 - report the failure, keep the other model
            rows.append((MODELS[name]["label"], "-", one_line(exc, 300), "-", "-", "-", "-", "-"))
            continue
        floor = r["floor"]
        floor_s = None if "error" in floor else floor["seconds"]
        mb = r["model_bytes"]
        f_t, f_m = _cell(floor, None, mb)
        p_t, p_m = _cell(r["prune"], floor_s, mb)
        o_t, o_m = _cell(r["onnx"], floor_s, mb)
        params = ""
        if "report" in r:
            before, after = r["report"]["before"]["params"], r["report"]["after"]["params"]
            params = f"{before / 1e9:.2f} B → {after / 1e9:.2f} B"
        rows.append((r["label"], fmt_bytes(mb), params, f_t, f_m, p_t, p_m, o_t, o_m))
        if name != "llama-3.2-3b" and not quick:
            continue
        label = "3B" if name == "llama-3.2-3b" else "0.85 B"
        prune, onnx = r["prune"], r["onnx"]
        if "error" in prune or floor_s is None:
            goals.append(Goal(NAME, f"{label} bf16 prune: peak RSS <= {RSS_GOAL}x model, "
                              f"time <= {TIME_GOAL}x floor", prune.get("error", "floor failed"),
                              False))
        else:
            ratio_m = prune["peak_rss"] / mb
            ratio_t = prune["seconds"] / floor_s
            goals.append(Goal(NAME, f"{label} bf16 prune --no-onnx: peak RSS <= {RSS_GOAL}x "
                              "the model", f"{fmt_bytes(prune['peak_rss'])} = {ratio_m:.2f}x "
                              f"{fmt_bytes(mb)}", ratio_m <= RSS_GOAL))
            goals.append(Goal(NAME, f"{label} bf16 prune --no-onnx: time <= {TIME_GOAL}x floor",
                              f"{fmt_s(prune['seconds'])} = {ratio_t:.2f}x "
                              f"{fmt_s(floor_s)}", ratio_t <= TIME_GOAL))
        if "error" in onnx or "error" in prune or floor_s is None:
            goals.append(Goal(NAME, f"{label} bf16 prune with ONNX: adds <= one floor",
                              onnx.get("error", "see above"), False))
        else:
            extra = (onnx["seconds"] - prune["seconds"]) / floor_s
            goals.append(Goal(NAME, f"{label} bf16 prune with ONNX: adds <= one floor, peak RSS "
                              f"<= {RSS_GOAL}x", f"+{extra:.2f} floors, "
                              f"{onnx['peak_rss'] / mb:.2f}x", extra <= ONNX_GOAL
                              and onnx["peak_rss"] / mb <= RSS_GOAL))
        if "report" in r and r["report"].get("onnx"):
            entry = json.dumps(r["report"]["onnx"])
            notes.append(f"{r['label']}: report.json onnx entry: `{entry}`")
    dash = _dashboard_run(cap) if "llama-0.85b" in names else None
    dash_text = []
    if dash is not None:
        if "error" in dash:
            goals.append(Goal(NAME, "dashboard on the 0.85 B model: first chart < 20 s",
                              dash["error"], False))
        else:
            first, worst = dash["first_chart_s"], dash["replan_max_s"]
            goals.append(Goal(NAME, "dashboard on the 0.85 B model (by path): first chart "
                              f"< {FIRST_CHART_GOAL:g} s", fmt_s(first), first < FIRST_CHART_GOAL))
            slowest = max(dash["replans"], key=dash["replans"].get)
            goals.append(Goal(NAME, "dashboard on the 0.85 B model: re-plan after an option "
                              f"change < {REPLAN_GOAL * 1000:g} ms",
                              f"worst {worst * 1000:.0f} ms ({slowest})", worst < REPLAN_GOAL))
            dash_text = [
                "Dashboard engine calls on the 0.85 B bf16 `.pt2` opened by path (one fresh "
                "subprocess): first chart = `engine.load_model` + `engine.analyze` + "
                "`engine.plan` (default options, ratio 0.5) + the score-overview chart; then "
                "one re-plan per option change.",
                md_table(["first chart", "groups", *dash["replans"]],
                         [(fmt_s(first), dash["groups"],
                           *[f"{v * 1000:.0f} ms" for v in dash["replans"].values()])]),
            ]
    body = [
        f"bf16 weights, ratio {RATIO}, default options, verification on the stored {SEQ}-token "
        "example. Floor = `torch.export.load` + `torch.export.save` of the original `.pt2`. "
        "Each cell is one fresh subprocess; peak RSS is the whole process (Python, torch, "
        f"transformers, ONNX Runtime) from `ru_maxrss`. Watchdog cap "
        f"{fmt_bytes(cap)}.",
        md_table(["model", "weights", "params", "floor", "floor peak RSS",
                  "prune --no-onnx", "peak RSS (x model)", "prune with ONNX", "peak RSS (x model)"],
                 rows),
        *notes,
        *dash_text,
    ]
    return Section(NAME, TITLE, "\n\n".join(body), goals)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", nargs=2, metavar=("NAME", "PATH"))
    parser.add_argument("--floor", nargs=2, metavar=("SRC", "DST"))
    parser.add_argument("--measure", metavar="NAME", help="one model, JSON on stdout")
    parser.add_argument("--dashboard", metavar="PT2", help="the dashboard's engine calls")
    args = parser.parse_args()
    if args.build:
        _build(args.build[0], Path(args.build[1]))
    elif args.floor:
        _floor(Path(args.floor[0]), Path(args.floor[1]))
    elif args.dashboard:
        print(json.dumps(_dashboard(Path(args.dashboard))))
    elif args.measure:
        print(json.dumps(measure(args.measure, default_cap()), indent=1))
