"""Transformers models and folders are captured with a dynamic batch (and sequence length):
calibration, evaluation and recovery then run many samples at once. The results must equal
those of the same folder captured the old way, with a fixed batch of one sample, which the
engine feeds one chunk at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import engine
from engine.graph.capture import Captured, capture_module, has_dynamic_batch
from engine.io.hf import load_folder
from engine.quality.evaluate import predict
from engine.quality.recovery.data import captured_batch, expected_shapes

SEQ = 12


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("bert")
    tf.BertModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokens() -> dict[str, np.ndarray]:
    """40 padded 'sentences' of 4..SEQ real tokens: x0 token ids, x1 the attention mask."""
    gen = np.random.default_rng(0)
    ids = gen.integers(1, 120, size=(40, SEQ))
    lengths = gen.integers(4, SEQ + 1, size=40)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x0": (ids * mask).astype(np.int64), "x1": mask}


def _static(folder) -> engine.Analysis:
    """The folder captured as before: a fixed batch of one sample."""
    model, inputs, source = load_folder(folder, seq_len=SEQ)
    captured = capture_module(model, inputs, str(folder), source.input_names, dynamic=False)
    captured.hf = source
    return engine.analyze(captured)


@pytest.fixture(scope="module")
def both(bert_folder):
    dynamic = engine.analyze(str(bert_folder), seq_len=SEQ)
    return dynamic, _static(bert_folder)


def test_folder_is_captured_with_dynamic_batch_and_sequence(both):
    dynamic, static = both
    assert isinstance(dynamic.captured, Captured) and has_dynamic_batch(dynamic.captured.program)
    shapes = expected_shapes(dynamic.captured.program)
    assert shapes == [(None, None), (None, None)]  # batch and sequence length both free
    assert captured_batch(expected_shapes(static.captured.program)) == 1
    gm = dynamic.captured.program.module()
    out = gm(torch.randint(0, 120, (5, 7)), torch.ones(5, 7, dtype=torch.long))
    assert out[0].shape == (5, 7, 32)


def test_batched_scores_equal_chunked_scores(both, tokens):
    dynamic, static = both
    for criterion in ("wanda", "activation"):
        a = engine.plan(dynamic, {"criterion": criterion}, ratio=0.3, calibration=tokens)
        b = engine.plan(static, {"criterion": criterion}, ratio=0.3, calibration=tokens)
        assert [g.pruned.tolist() for g in a.groups] == [g.pruned.tolist() for g in b.groups]
        for ga, gb in zip(a.groups, b.groups):
            np.testing.assert_allclose(ga.scores, gb.scores, rtol=1e-4, atol=1e-6)


def test_batched_evaluation_equals_chunked(both, tokens, tmp_path):
    dynamic, static = both
    np.savez(tmp_path / "eval.npz", **tokens)
    a = predict(dynamic.captured, str(tmp_path / "eval.npz"))
    b = predict(static.captured, str(tmp_path / "eval.npz"))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batched_recovery_equals_chunked(both, tokens):
    dynamic, static = both
    results = []
    for analysis in (dynamic, static):
        pruned = engine.apply(analysis, engine.plan(analysis, {}, ratio=0.4, uniform=True))
        recovered = engine.recover(pruned, tokens, "lsq", eval_holdout=0.25)
        results.append((pruned, recovered))
    (pa, ra), (pb, rb) = results
    assert "chunking" not in ra.report["recovery"]  # one batch, no chunks
    assert rb.report["recovery"]["chunking"]["captured_batch"] == 1  # one sample at a time
    a, b = ra.module.state_dict(), rb.module.state_dict()
    before = pa.module.state_dict()
    changed = [k for k in a if not torch.allclose(a[k], before[k])]
    assert changed  # lsq did refit some layers
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert ra.report["recovery"]["metric"] == rb.report["recovery"]["metric"] == \
        "embedding_cosine"
    assert ra.report["recovery"]["metric_after"] == pytest.approx(
        rb.report["recovery"]["metric_after"], abs=1e-5)
