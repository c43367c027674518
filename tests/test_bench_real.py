"""The path of `python -m bench real`, offline and small: real English text that ships with
Python, a tiny BERT folder with its own WordPiece tokenizer (random weights), pruned with
--uniform, recovered (data-light, then distillation), measured on held-out sentences, hf/
written. The real checkpoint stays in the bench (it is 90 MB)."""

from __future__ import annotations

import collections
import json

import torch
import transformers as tf

import engine
from bench import real


def _tiny_bert_folder(path, texts: list[str]):
    """A BertModel folder with a WordPiece vocabulary of the text's frequent words."""
    words = collections.Counter(w.lower().strip('.,;:"()') for t in texts for w in t.split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(
        {c for w in words for c in w} | {f"##{c}" for w in words for c in w})]
    vocab += [w for w, _ in words.most_common(400) if w and w not in vocab]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = tf.BertTokenizer(str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=real.SEQ, initializer_range=0.2)
    tf.BertModel(config).eval().save_pretrained(path)
    return path


def test_real_text_splits_are_disjoint_english_sentences():
    sentences = real.sentences(real.python_docs_text())
    assert len(sentences) > 1500  # enough for 600 calibration + 500 held-out
    calib, held = real.splits(sentences, 600, 500)
    assert len(calib) == 600 and len(held) == 500 and not set(calib) & set(held)
    assert all(s[0].isupper() and 6 <= len(s.split()) <= 50 for s in calib + held)


def test_bench_real_path_on_a_tiny_bert_folder(tmp_path):
    calib_texts, held_texts = real.splits(real.sentences(real.python_docs_text()), 160, 80)
    folder = _tiny_bert_folder(tmp_path / "bert", calib_texts)
    calib, held = real.tokenize(folder, calib_texts), real.tokenize(folder, held_texts)
    assert calib["x0"].shape == (160, real.SEQ) and (calib["x1"].sum(1) < real.SEQ).any()
    original = engine.load_model(str(folder)).program.module()
    reference = real.embeddings(original, held)
    same = real.embedding_quality(reference, reference)
    assert same == {"cosine": 1.0, "neighbours": 1.0}

    # a 2 s distillation budget: the path runs and keeps its best held-back state (the
    # bench gives it minutes); a longer budget adds CPU time, not coverage
    rows, best = real.quality_curve(folder, calib, held, reference, (0.5,), ("l2",), 2.0)
    flops, pruned, light, distilled, final = best[("l2", 0.5)]
    assert flops > 0.25
    assert [r[4] for r in rows] == ["none", "data-light (lsq)", "+ distill (2 s)"]
    # held-out sentences, never fitted: lsq's refit brings the embeddings back (a random
    # encoder's embeddings barely move when pruned: the distance to 1 is what shrinks)
    assert 1 - light["cosine"] < 0.5 * (1 - pruned["cosine"])
    assert 1 - distilled["cosine"] <= 1.2 * (1 - light["cosine"])
    info = final.report["recovery"]
    assert info["metric"] == "embedding_cosine"
    engine.save(final, tmp_path / "out", onnx=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["hf"]["written"]
    reloaded = tf.AutoModel.from_pretrained(tmp_path / "out" / "hf").eval()
    ids, mask = torch.from_numpy(held["x0"][:4]), torch.from_numpy(held["x1"][:4])
    with torch.no_grad():
        want = final.module(ids, mask)[0]
        got = reloaded(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
