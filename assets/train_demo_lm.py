"""Train PruneScope's second demo: a small byte-level Llama language model (`demo-lm`).

The model is transformers' ``LlamaForCausalLM`` built from a config (RMSNorm, rotary position
embeddings, grouped-query attention with 4 query / 2 key-value heads, SwiGLU MLP), so it is an
ordinary Hugging Face model too. Tokens are bytes (vocabulary 256). The text is real and
offline: the Python source of ``torch/nn/modules`` as shipped by the pinned torch wheel
(the same files on every machine with torch 2.13.0), one document per file, sorted by name.
Every ``HOLDOUT_EVERY``-th document is held out: the evaluation windows come only from those,
the calibration windows and the training only from the others.

    python assets/train_demo_lm.py --out assets

writes demo_lm/ (save_pretrained: config.json, model.safetensors), demo_lm.pt2 (exported with
the cache off, the output flattened to the logits [N, 64, 256], batch dimension dynamic),
demo_lm_calib.npz and demo_lm_eval.npz (x = token ids [N, 64] int64) and demo_lm_meta.json
with the held-out perplexity.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SEED = 0
SEQ_LEN = 64
VOCAB = 256  # bytes
HOLDOUT_EVERY = 7  # documents 3, 10, 17, 24 of the sorted list are held out
HOLDOUT_OFFSET = 3
N_CALIB = 512
N_EVAL = 256
CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "intermediate_size": 320,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": SEQ_LEN,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "use_cache": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


def corpus_documents() -> list[tuple[str, bytes]]:
    """(name, bytes) of every torch/nn/modules/*.py file, sorted by name."""
    folder = Path(torch.__file__).resolve().parent / "nn" / "modules"
    return [(f"torch/nn/modules/{p.name}", p.read_bytes())
            for p in sorted(folder.glob("*.py"), key=lambda p: p.name)]


def split_documents(docs: list[tuple[str, bytes]]) -> tuple[list, list]:
    """Training documents and held-out documents (by document, never by window)."""
    held = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_OFFSET]
    train = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_OFFSET]
    return train, held


def as_tokens(docs: list[tuple[str, bytes]]) -> np.ndarray:
    """The documents' bytes joined by a blank line, as int64 token ids."""
    return np.frombuffer(b"\n\n".join(text for _, text in docs), dtype=np.uint8).astype(np.int64)


def prepare_data(seed: int = SEED) -> dict[str, np.ndarray | list[str]]:
    """Training stream, calibration windows (training documents, random offsets) and
    evaluation windows (held-out documents, evenly spaced, non-overlapping)."""
    train_docs, held_docs = split_documents(corpus_documents())
    train = as_tokens(train_docs)
    held = as_tokens(held_docs)
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(len(train) - SEQ_LEN, size=N_CALIB, replace=False))
    calib = np.stack([train[s:s + SEQ_LEN] for s in starts])
    n_windows = len(held) // SEQ_LEN
    picks = np.linspace(0, n_windows - 1, num=min(N_EVAL, n_windows)).round().astype(int)
    held_windows = np.stack([held[i * SEQ_LEN:(i + 1) * SEQ_LEN] for i in np.unique(picks)])
    # Code repeats itself (licence lines, imports): drop any evaluation window that is also a
    # calibration window, so the two sets never share a sample.
    seen = {row.tobytes() for row in calib}
    held_windows = np.stack([w for w in held_windows if w.tobytes() not in seen])
    return {"train": train, "calib": calib, "eval": held_windows,
            "train_docs": [n for n, _ in train_docs], "held_docs": [n for n, _ in held_docs]}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIG)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model, windows: np.ndarray, batch: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        x = torch.from_numpy(windows[start:start + batch])
        logits = model(input_ids=x, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(),
                              x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def train(data: dict, seed: int, steps: int, batch_size: int) -> tuple[object, float, float]:
    """The trained model, wall-clock seconds and CPU seconds of this process (on a shared
    machine the wall clock mostly measures the other processes)."""
    seed_everything(seed)
    model = build_model()
    stream = torch.from_numpy(data["train"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps,
                                                pct_start=0.1)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for step in range(steps):
        offsets = torch.randint(0, len(stream) - SEQ_LEN, (batch_size,), generator=gen)
        x = torch.stack([stream[o:o + SEQ_LEN] for o in offsets.tolist()])
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    model.eval()
    return model, time.perf_counter() - start, time.process_time() - cpu_start


def export_program(model, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The model with the cache off and only the logits as output (so the .pt2 loads without
    transformers' output classes); the batch dimension is dynamic, the length fixed."""
    base = type(model)

    def logits_only(self, input_ids):
        return base.forward(self, input_ids=input_ids, use_cache=False).logits

    model.__class__ = type(base.__name__, (base,), {"forward": logits_only})
    try:
        batch = torch.export.Dim("batch", min=1, max=1024)
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},),
                                   strict=False)
    finally:
        model.__class__ = base


def main(argv: list[str] | None = None) -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (fixed so runs are repeatable; on a shared 2-core "
                             "machine one thread is the fastest)")
    parser.add_argument("--data-only", action="store_true",
                        help="write demo_lm_calib.npz and demo_lm_eval.npz only (no training)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    data = prepare_data(args.seed)
    np.savez_compressed(args.out / "demo_lm_calib.npz", x=data["calib"])
    np.savez_compressed(args.out / "demo_lm_eval.npz", x=data["eval"])
    if args.data_only:
        return 0

    model, seconds, cpu_seconds = train(data, args.seed, args.steps, args.batch_size)
    held_ppl = perplexity(model, data["eval"])
    calib_ppl = perplexity(model, data["calib"])
    model.save_pretrained(args.out / "demo_lm", safe_serialization=True)
    program = export_program(model, torch.from_numpy(data["eval"][:8]))
    torch.export.save(program, os.fspath(args.out / "demo_lm.pt2"))

    meta = {
        "perplexity": round(held_ppl, 4),
        "calibration_perplexity": round(calib_ppl, 4),
        "vocab_size": VOCAB,
        "seq_len": SEQ_LEN,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "threads": args.threads,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_tokens": int(len(data["train"])),
        "n_calib": len(data["calib"]),
        "n_eval": len(data["eval"]),
        "train_documents": data["train_docs"],
        "held_out_documents": data["held_docs"],
        "seed": args.seed,
        "date": dt.date.today().isoformat(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "command": " ".join(["python assets/train_demo_lm.py",
                             *(sys.argv[1:] if argv is None else argv)]),
    }
    (args.out / "demo_lm_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"held-out perplexity {held_ppl:.3f} on {len(data['eval'])} windows of {SEQ_LEN} "
          f"bytes (calibration {calib_ppl:.3f}), {meta['parameters']} parameters, trained in "
          f"{seconds:.1f} s ({cpu_seconds:.1f} s of CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
