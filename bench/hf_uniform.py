"""10. Hugging Face folders: parameter reduction with and without ``--uniform``, and hf/.

Each architecture is written as a folder with ``save_pretrained`` (random weights from a small
config) and pruned from the folder at the same global ratio, with and without ``uniform``,
pruning inside heads (``reshape_channel_axis=-1``, the default) and whole heads (``-2``).
The table gives the parameters removed and whether OUT/hf/ was written (reloaded with the
Auto class and equal to model.pt2 within 1e-5), or the one-line reason why not.

The demo-lm (assets/demo_lm, a trained byte-level Llama) is measured the same way, with its
perplexity on the held-out split (``assets/demo_lm_eval.npz``, never the calibration set).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

import engine
from bench.common import Goal, Section, md_table

NAME = "hf_uniform"
TITLE = "11. Hugging Face folders: --uniform and hf/ (parameters removed, demo-lm perplexity)"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _configs() -> dict:
    import transformers as tf

    return {
        "BERT": (tf.BertForSequenceClassification,
                 tf.BertConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=4, vocab_size=1000)),
        "ViT": (tf.ViTForImageClassification,
                tf.ViTConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                             num_attention_heads=4, image_size=64, patch_size=16)),
        "GPT-2": (tf.GPT2LMHeadModel,
                  tf.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=1000,
                                n_positions=128, bos_token_id=0, eos_token_id=0)),
        "Llama GQA": (tf.LlamaForCausalLM,
                      tf.LlamaConfig(hidden_size=256, intermediate_size=688,
                                     num_hidden_layers=4, num_attention_heads=8,
                                     num_key_value_heads=2, vocab_size=1000)),
        "ResNet": (tf.ResNetForImageClassification,
                   tf.ResNetConfig(embedding_size=32, hidden_sizes=[64, 128], depths=[2, 2],
                                   image_size=64)),
    }


def _hf_cell(report: dict) -> str:
    hf = report.get("hf") or {}
    if hf.get("written"):
        changed = ", ".join(f"{k} {v}" for k, v in hf["config"].items())
        return f"yes ({changed or 'unchanged'})"
    return f"no: {hf.get('reason', '-')}"[:140]


def _prune(folder: Path, ratio: float, axis: int, uniform: bool, out: Path, **kw):
    result = engine.prune(str(folder), ratio=ratio, uniform=uniform,
                          options={"reshape_channel_axis": axis}, **kw)
    engine.save(result, out, onnx=False)
    return result


def _removed(report: dict) -> float:
    return 1 - report["after"]["params"] / report["before"]["params"]


def run(quick: bool = False) -> Section:
    import torch

    ratio = 0.5
    rows = []
    round_trips = set()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        configs = _configs()
        names = list(configs)[:2] if quick else list(configs)
        for name in names:
            cls, config = configs[name]
            torch.manual_seed(0)
            folder = root / name.replace(" ", "_")
            cls(config).save_pretrained(folder)
            for axis in (-1, -2):
                cells = []
                for uniform in (False, True):
                    result = _prune(folder, ratio, axis, uniform, root / "out")
                    cells.append(result.report)
                    if result.report["hf"]["written"]:
                        round_trips.add(name)
                rows.append((name, axis, f"{_removed(cells[0]):.1%}", _hf_cell(cells[0]),
                             f"{_removed(cells[1]):.1%}", _hf_cell(cells[1])))
        lm_rows = _demo_lm(root, quick)
    body = (
        f"Global ratio {ratio}, `l2`, defaults otherwise; parameters removed from the whole "
        "model (embeddings and heads included).\n\n"
        + md_table(("model", "reshape_channel_axis", "removed", "hf/", "removed --uniform",
                    "hf/ with --uniform"), rows)
        + "\n\nArchitectures that round-trip through hf/ in this run: "
        + (", ".join(sorted(round_trips)) or "none")
        + ".\n\n### demo-lm (held-out perplexity, `assets/demo_lm_eval.npz`)\n\n"
        + md_table(("ratio", "reshape_channel_axis", "uniform", "params", "removed",
                    "perplexity", "hf/"), lm_rows)
    )
    goal = Goal(NAME, "hf/ round-trips for BERT, ViT, GPT-2 and Llama (with --uniform)",
                ", ".join(sorted(round_trips)) or "none",
                {"BERT", "ViT", "GPT-2", "Llama GQA"} <= round_trips if not quick else None)
    return Section(NAME, TITLE, body, [goal])


def _demo_lm(root: Path, quick: bool) -> list[tuple]:
    with np.load(ASSETS / "demo_lm_eval.npz", allow_pickle=False) as data:
        x = data["x"]
    limit = 64 if quick else len(x)
    eval_path = root / "demo_lm_eval_masked.npz"
    # the folder's program takes input_ids and attention_mask
    np.savez(eval_path, x0=x[:limit], x1=np.ones_like(x[:limit]))
    seq_len = x.shape[1]
    folder = ASSETS / "demo_lm"
    base = engine.load_model(str(folder), seq_len=seq_len)
    original = engine.evaluate(base, str(eval_path), metric="perplexity")["value"]
    params = sum(p.numel() for p in base.program.module().parameters())
    rows = [("0", "-", "-", f"{params:,}", "0.0%", f"{original:.3f}", "-")]
    for ratio in ((0.3,) if quick else (0.2, 0.3, 0.5)):
        for axis in (-1, -2):
            for uniform in (False, True):
                result = _prune(folder, ratio, axis, uniform, root / "lm_out", seq_len=seq_len)
                ppl = engine.evaluate(result, str(eval_path), metric="perplexity")["value"]
                report = result.report
                rows.append((ratio, axis, "yes" if uniform else "no",
                             f"{report['after']['params']:,}", f"{_removed(report):.1%}",
                             f"{ppl:.3f}", "yes" if report["hf"]["written"] else "no"))
    return rows
