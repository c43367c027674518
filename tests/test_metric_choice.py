"""The metric follows what the model returns (engine/quality/evaluate.py choose_metric) and
the embedding metrics (engine/quality/embedding.py) compute what they say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import engine
from engine.errors import OptionError
from engine.io.data import DataOptions, load_data
from engine.quality.embedding import (
    embedding_cosine,
    embedding_spearman,
    mean_pool,
    neighbor_agreement,
)
from tests.helpers import cli, one_error_line
from tests.text_models import SENTENCES, bert_folder, llama_folder

LABELS = [i % 3 for i in range(len(SENTENCES))]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("metric-models")
    return {"bert": bert_folder(base / "bert"),
            "bert_cls": bert_folder(base / "bert_cls", classifier=3),
            "llama": llama_folder(base / "llama"),
            "wide": llama_folder(base / "wide", vocab_extra=40)}


@pytest.fixture(scope="module")
def bert(folders):
    """The encoder folder loaded (captured) once; prunes and evaluations only read it."""
    return engine.load_model(folders["bert"], seq_len=16)


@pytest.fixture(scope="module")
def llama(folders):
    """The causal LM folder captured once at seq_len 16, read by the perplexity tests (an
    evaluation and a data load only read it)."""
    return engine.load_model(folders["llama"], seq_len=16)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                            for t, y in zip(SENTENCES * 2, LABELS * 2)))
    return path


# ---------------------------------------------------------------------- the metric functions

def test_mean_pool_uses_only_real_tokens() -> None:
    hidden = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(mean_pool(hidden, mask), [[1, 2], [6, 7]])
    np.testing.assert_allclose(mean_pool(hidden), hidden.mean(axis=1))


def test_embedding_metrics_against_independent_computations() -> None:
    gen = np.random.default_rng(0)
    original = gen.normal(size=(40, 8))
    pruned = original + 0.3 * gen.normal(size=(40, 8))
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(pruned, original)]
    assert embedding_cosine(pruned, original) == pytest.approx(np.mean(cos))

    def pairs(e):
        n = e / np.linalg.norm(e, axis=1, keepdims=True)
        return [n[i] @ n[j] for i in range(len(n)) for j in range(i + 1, len(n))]

    assert embedding_spearman(pruned, original) == pytest.approx(
        spearmanr(pairs(pruned), pairs(original)).statistic, abs=1e-9)
    assert embedding_spearman(original, original) == pytest.approx(1.0)

    def nearest(e):
        n = e / np.linalg.norm(e, axis=1, keepdims=True)
        sims = n @ n.T
        np.fill_diagonal(sims, -np.inf)
        return sims.argmax(axis=1)

    assert neighbor_agreement(pruned, original) == pytest.approx(
        np.mean(nearest(pruned) == nearest(original)))
    assert 0 < neighbor_agreement(pruned, original) < 1
    # a sample's nearest neighbour is never itself, even for duplicated rows
    twins = np.repeat(original[:5], 2, axis=0)
    assert neighbor_agreement(twins, twins) == 1.0


# ------------------------------------------------------------------------- per model kind

def test_encoder_hidden_states_get_embedding_metrics(bert, text) -> None:
    original = bert
    pruned = engine.prune(original, None, ratio=0.5)
    data = load_data(text, model=original)
    quality = engine.quality_report(original, pruned, data)
    assert quality["metric"] == "embedding_cosine"
    assert "hidden states" in quality["metric_reason"] and "encoder" in quality["metric_reason"]
    assert quality["original"] == pytest.approx(1.0)
    # the same numbers by hand: pooled over the attention mask, then compared
    ids, mask = (torch.as_tensor(a) for a in data.inputs)
    with torch.no_grad():  # captured with a batch of 1: one sample at a time
        ref = np.concatenate([original.program.module()(ids[i:i + 1], mask[i:i + 1])[0].numpy()
                              for i in range(len(ids))])
        out = np.concatenate([pruned.module(ids[i:i + 1], mask[i:i + 1])[0].numpy()
                              for i in range(len(ids))])
    by_hand = mean_pool(out, mask.numpy()), mean_pool(ref, mask.numpy())
    assert quality["pruned"] == pytest.approx(embedding_cosine(*by_hand), abs=1e-6)
    got = quality["embedding"]["pruned"]
    assert got["neighbor_agreement"] == pytest.approx(neighbor_agreement(*by_hand))
    assert got["embedding_spearman"] == pytest.approx(embedding_spearman(*by_hand), abs=1e-6)
    # never perplexity on an encoder, even when asked
    with pytest.raises(OptionError, match="BertModel is not a causal language model"):
        engine.evaluate(original, data, "perplexity")
    # without a reference there is nothing to compare the embeddings with: one line
    with pytest.raises(OptionError, match="hidden states .* give --reference MODEL"):
        engine.evaluate(original, data)


def test_hidden_states_of_an_npz_are_never_perplexity(bert, tmp_path) -> None:
    """The issue's case: token ids in a hand-made .npz, an encoder returning hidden states
    [N, T, H] with H smaller than the vocabulary: embedding metrics, not perplexity."""
    original = bert
    ids = np.random.default_rng(0).integers(4, 29, size=(12, 16))
    path = tmp_path / "tokens.npz"
    np.savez(path, x0=ids, x1=np.ones_like(ids))
    result = engine.evaluate(original, path, reference=original)
    assert result["metric"] == "embedding_cosine" and result["value"] == pytest.approx(1.0)


def test_classifier_with_labels_gets_accuracy(folders, text) -> None:
    original = engine.load_model(folders["bert_cls"], seq_len=16)
    data = load_data(text, model=original)
    result = engine.evaluate(original, data)
    ids, mask = (torch.as_tensor(a) for a in data.inputs)
    with torch.no_grad():
        pred = np.concatenate([original.program.module()(ids[i:i + 1], mask[i:i + 1])[0]
                               .argmax(-1).numpy() for i in range(len(ids))])
    assert result["metric"] == "accuracy" and "has labels" in result["reason"]
    assert result["value"] == pytest.approx(np.mean(pred == np.asarray(LABELS * 2)))


def test_causal_lm_gets_perplexity_over_real_tokens_only(folders, llama, text) -> None:
    original = llama
    data = load_data(text, model=original, options=DataOptions(label_field="none"))
    result = engine.evaluate(original, data)
    assert result["metric"] == "perplexity" and "spanning the tokenizer's vocabulary of 29" \
        in result["reason"]
    # by hand with transformers: next-token NLL where the next token is real (not padding)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folders["llama"], local_files_only=True).eval()
    ids, mask = (torch.as_tensor(a) for a in data.inputs)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            ids[:, 1:].reshape(-1), reduction="none")
    real = mask[:, 1:].reshape(-1) > 0
    assert result["tokens"] == int(real.sum()) < ids[:, 1:].numel()
    assert result["value"] == pytest.approx(float(torch.exp(nll[real].mean())), rel=1e-5)


def test_perplexity_needs_logits_spanning_the_tokenizer(folders, llama, text,
                                                         tmp_path) -> None:
    """A causal LM whose logits are narrower than its tokenizer's vocabulary is not scored
    with perplexity: here the tokenizer has 69 tokens, the model 29 (text uses only ids the
    model has, so it runs)."""
    from transformers import PreTrainedTokenizerFast

    from tests.text_models import word_tokenizer

    tok, vocab = word_tokenizer(("<unk>", "<s>", "</s>", *(f"extra{i}" for i in range(40))))
    wide_tok = tmp_path / "widetok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>") \
        .save_pretrained(wide_tok)
    assert vocab == 69
    narrow = llama
    # ids of the wide tokenizer's words: 43.., beyond the narrow model: refused at loading
    with pytest.raises(Exception, match="beyond the vocabulary"):
        load_data(text, model=narrow, options=DataOptions(tokenizer=str(wide_tok)))
    # a model wider than the tokenizer (69 logits, tokenizer of 29) does get perplexity
    wide = engine.load_model(folders["wide"], seq_len=16)
    result = engine.evaluate(wide, load_data(text, model=wide,
                                             options=DataOptions(label_field="none")))
    assert result["metric"] == "perplexity"
    # and the decision itself, on logits narrower than the tokenizer
    from engine.quality.evaluate import causal_lm_reason

    ok, why = causal_lm_reason(torch.zeros(2, 8, 20), torch.zeros(2, 8, dtype=torch.long), 29,
                               "LlamaForCausalLM")
    assert not ok and "does not span the tokenizer's vocabulary of 29" in why


def test_prune_reports_the_metric_and_why(folders, text, tmp_path, capfd) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(reversed(SENTENCES)) + "\n")
    rc, out, err = cli(capfd, "prune", folders["bert"], "--ratio", "0.5", "--seq-len", "16",
                       "--criterion", "activation", "--calibration", calib, "--eval-data",
                       text, "--out", tmp_path / "out", "--no-onnx")
    assert rc == 0, err
    quality = json.loads((tmp_path / "out" / "report.json").read_text())["quality"]
    assert quality["metric"] == "embedding_cosine" and quality["samples"] == 24
    assert "mean pooling over the attention mask" in quality["metric_reason"]
    assert set(quality["embedding"]["pruned"]) == {"embedding_cosine", "embedding_spearman",
                                                   "neighbor_agreement"}
    assert "quality: embedding_cosine original 1.0000" in out
    assert "neighbor_agreement" in out
    rc, out, err = cli(capfd, "evaluate", folders["llama"], "--data", text, "--seq-len", "8",
                       "--text-mode", "stream", "--max-samples", "5")
    assert rc == 0, err
    assert out.startswith("perplexity ") and "(5 samples, 35 tokens)" in out
    rc, _, err = cli(capfd, "evaluate", folders["bert"], "--data", text, "--metric",
                     "perplexity")
    assert rc == 2
    assert "BertModel is not a causal language model" in one_error_line(err)


def test_sweep_reads_text_for_the_model(folders, text) -> None:
    """engine.sweep reads text eval data for the model it analyses; every point is measured
    with the metric the original got (the embedding metric for an encoder)."""
    report = engine.sweep(folders["bert"], {"layer_norm": "none"}, [0.25], eval_data=text,
                          workers=1, seq_len=16)
    assert report["metric"] == "embedding_cosine"
    point = report["points"][0]
    assert 0 < point["metric"] < 1


def test_the_python_api_takes_text_paths_everywhere(bert, tmp_path) -> None:
    """prune(calibration=path) scores on the text; recover(result, path) recovers on it."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(reversed(SENTENCES)) + "\n")
    original = bert
    result = engine.prune(original, None, engine.PruningOptions(criterion="activation"),
                          ratio=0.5, calibration=calib)
    recovered = engine.recover(result, calib, "bias", budget_s=0)
    info = recovered.report["recovery"]
    assert info["calibration_samples"] + info["holdout_samples"] == len(SENTENCES)


@pytest.mark.parametrize("command", ["sweep", "sensitivity"])
def test_sweep_and_sensitivity_take_the_data_flags(folders, tmp_path, capfd, command) -> None:
    """`--text-field` reaches the data loader from both commands: records whose text sits in
    `body` are measured (one point per record); without the flag the run stops with the
    loader's one-line error naming the file and the flag."""
    records = tmp_path / "held.jsonl"
    records.write_text("".join(json.dumps({"body": s}) + "\n" for s in SENTENCES))
    out = tmp_path / f"{command}.json"
    args = [command, folders["bert"], "--ratio", "0.5", "--eval-data", records,
            "--seq-len", "16", "--workers", "1", "--json", out]
    if command == "sweep":
        args += ["--layer-norm", "none"]
    rc, _, err = cli(capfd, *args)
    assert rc == 2 and "--text-field" in one_error_line(err) and "held.jsonl" in err
    rc, stdout, err = cli(capfd, *args, "--text-field", "body")
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["samples"] == len(SENTENCES)
    assert report["metric"] == "embedding_cosine"
    assert all(0 < p["metric"] < 1 for p in report["points"])
