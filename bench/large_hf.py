"""9b. Larger than memory: a streamed prune of a 7B-class Hugging Face folder against its floor.

Model: a Llama-2-7B-shaped folder (hidden 4096, intermediate 11008, 32 layers, 32 heads,
vocabulary 32,000, untied head; 6.74 B parameters, 13.5 GB in bf16), built from its config
with random weights (normal, std 0.02; norms 1) written shard by shard in 3 shards of at
most 5 GB, never the whole model in memory. Cached under ``$PRUNESCOPE_BENCH_CACHE`` (default
``~/.cache/prunescope-bench``), never in the repository. ``--quick``: the same widths with 4
layers (2.2 GB). ``PRUNESCOPE_BENCH_LARGE_14B=1`` adds a 14B-class folder (hidden 5120,
intermediate 13824, 48 layers: 28 GB, larger than this machine's memory).

Measured in the same run, each in a fresh subprocess:
- floor: every stored tensor read and written again as the same safetensors shards (the
  same reader and writer the streamed prune uses);
- ``prunescope prune FOLDER --uniform --ratio 0.3 --stream --out OUT``.
Peak RSS is the subprocess's ``ru_maxrss`` (``os.wait4``); a watchdog reads its resident
memory every 0.2 s and kills it above the cap (available memory minus 3 GiB, at most 18 GiB;
``PRUNESCOPE_BENCH_RSS_CAP_GIB`` changes it). The folders are removed after the run unless
``PRUNESCOPE_BENCH_KEEP=1``. ``PRUNESCOPE_BENCH_BASELINE=DIR`` also times the streamed prune of
another checkout (DIR, e.g. ``git worktree add DIR main``) in the same run, just before this
one's: a before/after pair against the same floor (7B-class folders only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import Goal, Section, fmt_bytes, fmt_s, md_table, one_line, quiet
from bench.isolated import available_memory, cache_dir, default_cap, llama_config, measured

NAME = "large_hf"
TITLE = "9b. Larger than memory: streamed prune of a 7B-class HF folder against its floor"
RATIO = "0.3"
TIME_GOAL = 1.5
RSS_GOAL = 0.5  # x the model's bytes
RSS_14B_GOAL = 8 * 2**30
SHARD_BYTES = 5 * 10**9

MODELS = {
    "llama-2-7b": {"label": "Llama-2-7B shape (4096 hidden, 32 layers)", "hidden": 4096,
                   "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32,
                   "vocab": 32000},
    "llama-2-7b-4l": {"label": "Llama-2-7B widths, 4 layers", "hidden": 4096,
                      "intermediate": 11008, "layers": 4, "heads": 32, "kv_heads": 32,
                      "vocab": 32000},
    "14b": {"label": "14B class (5120 hidden, 48 layers)", "hidden": 5120,
            "intermediate": 13824, "layers": 48, "heads": 40, "kv_heads": 40, "vocab": 32000},
}


def _build(name: str, folder: Path) -> None:
    """The folder from its config: keys and shapes from the model built on meta, each tensor
    drawn and written alone."""
    quiet()
    import torch
    from transformers import LlamaForCausalLM

    from engine.io.shards import write_index, write_shard

    config = llama_config(MODELS[name], tie_word_embeddings=False, dtype="bfloat16",
                          architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    specs = {k: (torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()}
    shards: list[dict] = [{}]
    size = 0
    for key, (dtype, shape) in specs.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = (dtype, shape)
        size += nbytes
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)

    def draw(key: str) -> torch.Tensor:
        shape = specs[key][1]
        if key.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)

    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(tmp / file, shard, draw)
        weight_map.update({k: file for k in shard})
    write_index(tmp, weight_map, total)
    os.replace(tmp, folder)


def _floor(src: Path, dst: Path) -> None:
    """Read every stored tensor and write it again in the same shards."""
    from engine.io.shards import ShardSet, write_index, write_shard

    shards = ShardSet(src)
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    total, weight_map = 0, {}
    for file in shards.files:
        keys = shards.by_file[file]
        specs = {k: (shards.entries[k].dtype, shards.entries[k].shape) for k in keys}
        total += write_shard(dst / file, specs, shards.read)
        weight_map.update({k: file for k in keys})
    write_index(dst, weight_map, total)


def _into_page_cache(folder: Path, model_bytes: int) -> None:
    """Read the folder's files once (untimed) where they fit in the memory available, so
    that each timed run starts from the same page cache: the streamed prune's writing pass
    drops the input's pages (posix_fadvise), which would leave the next run reading the disk."""
    if model_bytes + 2 * 2**30 > available_memory():
        return
    for path in sorted(folder.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass


def _folder(name: str) -> tuple[Path, float]:
    path = cache_dir() / f"{name}-hf-bf16"
    if path.is_dir():
        return path, 0.0
    start = time.perf_counter()
    run = measured([sys.executable, "-m", "bench.large_hf", "--build", name, str(path)],
                   default_cap())
    if "error" in run:
        raise RuntimeError(f"building {name} failed: {run['error']}")
    return path, time.perf_counter() - start


def measure(name: str, cap: int) -> dict:
    from engine.io.shards import ShardSet

    src, built = _folder(name)
    model_bytes = ShardSet(src).total_bytes
    out: dict = {"name": name, "label": MODELS[name]["label"], "model_bytes": model_bytes,
                 "built_s": built, "shards": len(ShardSet(src).files)}
    work = cache_dir() / f"{name}-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        py = sys.executable
        _into_page_cache(src, model_bytes)
        out["floor"] = measured([py, "-m", "bench.large_hf", "--floor", str(src),
                                 str(work / "copy")], cap)
        shutil.rmtree(work / "copy", ignore_errors=True)  # disk: one copy at a time
        prune = [py, "-m", "engine", "prune", str(src), "--uniform", "--ratio", RATIO,
                 "--stream", "--out"]
        baseline = os.environ.get("PRUNESCOPE_BENCH_BASELINE")
        if baseline and name != "14b":  # another checkout's prune, same run (before/after)
            _into_page_cache(src, model_bytes)
            out["baseline"] = measured([*prune, str(work / "before")], cap, root=Path(baseline))
            shutil.rmtree(work / "before", ignore_errors=True)
        _into_page_cache(src, model_bytes)
        out["prune"] = measured([*prune, str(work / "pruned")], cap)
        report = work / "pruned" / "report.json"
        if report.exists():
            data = json.loads(report.read_text())
            v = data["verification"]
            out["report"] = {"before": data["before"], "after": data["after"],
                             "seconds": data.get("seconds"),
                             "hf": data["hf"], "mode": data.get("mode"),
                             "verification": {k: v.get(k) for k in (
                                 "blocks", "relative_diff_vs_masked", "exact",
                                 "exact_expected", "skipped")}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.environ.get("PRUNESCOPE_BENCH_KEEP") != "1":
            shutil.rmtree(src, ignore_errors=True)
    for key in ("floor", "prune", "baseline"):
        out.get(key, {}).pop("stdout", None)
        out.get(key, {}).pop("stderr", None)
    (cache_dir() / f"{name}-hf-last-run.json").write_text(json.dumps(out, indent=1))
    return out


def run(quick: bool = False) -> Section:
    names = ["llama-2-7b-4l"] if quick else ["llama-2-7b"]
    if os.environ.get("PRUNESCOPE_BENCH_LARGE_14B") == "1":
        names.append("14b")
    cap = default_cap()
    rows, goals, done = [], [], []
    for name in names:
        try:
            r = measure(name, cap)
        except Exception as exc:  # noqa: BLE001 - report the failure, keep the other model
            rows.append((MODELS[name]["label"], "-", one_line(exc, 300), *["-"] * 6))
            continue
        done.append(r)
        mb = r["model_bytes"]
        floor, prune = r["floor"], r["prune"]
        floor_s = None if "error" in floor else floor["seconds"]
        cells = []
        for run_ in (floor, prune):
            t = run_.get("error") or fmt_s(run_["seconds"])
            if "error" not in run_ and run_ is prune and floor_s:
                t += f" ({run_['seconds'] / floor_s:.2f}x floor)"
            cells += [t, f"{fmt_bytes(run_['peak_rss'])} ({run_['peak_rss'] / mb:.2f}x)"]
        params, verified = "-", "-"
        if "report" in r:
            rep = r["report"]
            params = (f"{rep['before']['params'] / 1e9:.2f} B → "
                      f"{rep['after']['params'] / 1e9:.2f} B")
            v = rep["verification"]
            verified = v.get("skipped") or (f"{v['blocks']} blocks, max rel. diff "
                                            f"{v['relative_diff_vs_masked']:.3g} (exact "
                                            f"expected: {v['exact_expected']})")
        rows.append((r["label"], f"{fmt_bytes(mb)} in {r['shards']} shards", params, *cells,
                     verified))
        if "baseline" in r:
            base = r["baseline"]
            t = base.get("error") or fmt_s(base["seconds"])
            if "error" not in base and floor_s:
                t += f" ({base['seconds'] / floor_s:.2f}x floor)"
            rows.append((f"the same, prune by `{os.environ['PRUNESCOPE_BENCH_BASELINE']}` "
                         "(before)", "", "", "", "", t,
                         f"{fmt_bytes(base['peak_rss'])} ({base['peak_rss'] / mb:.2f}x)", ""))
        label = "14B" if name == "14b" else ("7B" if name == "llama-2-7b" else "7B widths, 4L")
        if "error" in prune or floor_s is None:
            goals.append(Goal(NAME, f"{label} streamed prune", prune.get("error", "floor "
                                                                                "failed"), False))
            continue
        ratio_t = prune["seconds"] / floor_s
        goals.append(Goal(NAME, f"{label} streamed prune: time <= {TIME_GOAL}x floor",
                          f"{fmt_s(prune['seconds'])} = {ratio_t:.2f}x {fmt_s(floor_s)}",
                          ratio_t <= TIME_GOAL))
        if name == "14b":
            goals.append(Goal(NAME, "14B streamed prune: peak RSS <= 8 GiB",
                              fmt_bytes(prune["peak_rss"]), prune["peak_rss"] <= RSS_14B_GOAL))
        else:
            ratio_m = prune["peak_rss"] / mb
            goals.append(Goal(NAME, f"{label} streamed prune: peak RSS <= {RSS_GOAL}x model",
                              f"{fmt_bytes(prune['peak_rss'])} = {ratio_m:.2f}x {fmt_bytes(mb)}",
                              ratio_m <= RSS_GOAL))
    stages = [f"{r['label']}: seconds per stage of the streamed prune (report.json): "
              f"`{json.dumps(r['report']['seconds'])}`" for r in done if r.get("report")]
    body = [
        f"bf16 weights, `--uniform --ratio {RATIO}` (l2, default options), streamed "
        "(`--stream`): capture on the meta device, each weight read alone for scoring, "
        "hf/ written shard by shard, blocks verified one by one on the first 8 example tokens' "
        "embeddings. Floor = every stored tensor read and written again as the same shards. "
        "Each cell is one fresh subprocess; peak RSS is the whole process (Python, torch, "
        f"transformers) from `ru_maxrss`. Watchdog cap {fmt_bytes(cap)}. Before each timed run "
        "the input folder is read once, untimed, where it fits in the memory available (the "
        "7B-class folder does, the 14B-class one does not): each starts from the same page "
        "cache. The machine is shared: the load average below is part of the result.",
        md_table(["model", "weights", "params", "floor", "floor peak RSS (x model)",
                  "streamed prune", "peak RSS (x model)", "block verification"], rows),
        *stages,
    ]
    return Section(NAME, TITLE, "\n\n".join(body), goals)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", nargs=2, metavar=("NAME", "PATH"))
    parser.add_argument("--floor", nargs=2, metavar=("SRC", "DST"))
    args = parser.parse_args()
    if args.build:
        _build(args.build[0], Path(args.build[1]))
    elif args.floor:
        _floor(Path(args.floor[0]), Path(args.floor[1]))
