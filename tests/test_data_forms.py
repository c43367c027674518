"""engine/io/data.py, data_text.py, data_images.py: text, datasets and image folders become
the model's inputs (real files written here, real tiny tokenizers, real transformers models);
bad data is one line naming the file and what was expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.errors import DataError
from engine.io.data import DataOptions, load_data, model_inputs
from tests.helpers import one_error_line
from tests.text_models import SENTENCES, bert_folder, llama_folder

ROOT = Path(__file__).resolve().parents[1]
LABELS = [i % 3 for i in range(len(SENTENCES))]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("text-models")
    return {"bert": bert_folder(base / "bert"),
            "bert_cls": bert_folder(base / "bert_cls", classifier=3),
            "bare": bert_folder(base / "bare", with_tokenizer=False),
            "llama": llama_folder(base / "llama")}


@pytest.fixture(scope="module")
def bert(folders):
    return engine.load_model(folders["bert"], seq_len=16)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)


def _write_forms(tmp: Path, texts: list[str], labels: list | None) -> dict[str, Path]:
    """The same records in every text form (and a datasets save_to_disk folder)."""
    import datasets
    import pandas as pd

    rows = [{"text": t, **({} if labels is None else {"label": labels[i]})}
            for i, t in enumerate(texts)]
    forms = {}
    if labels is None:
        forms["txt"] = tmp / "s.txt"
        forms["txt"].write_text("\n".join(texts[:3]) + "\n\n" + "\n".join(texts[3:]) + "\n")
    forms["jsonl"] = tmp / "s.jsonl"
    forms["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    forms["json"] = tmp / "s.json"
    forms["json"].write_text(json.dumps(rows))
    frame = pd.DataFrame(rows)
    forms["csv"] = tmp / "s.csv"
    frame.to_csv(forms["csv"], index=False)
    forms["tsv"] = tmp / "s.tsv"
    frame.to_csv(forms["tsv"], index=False, sep="\t")
    forms["parquet"] = tmp / "s.parquet"
    frame.to_parquet(forms["parquet"])
    forms["dataset"] = tmp / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(os.fspath(forms["dataset"]))
    return forms


def test_every_text_form_gives_the_tokenizers_own_inputs(folders, bert, tmp_path) -> None:
    tok = _tokenizer(folders["bert"])
    want = tok(SENTENCES, padding="max_length", truncation=True, max_length=16,
               return_tensors="np")
    forms = _write_forms(tmp_path, SENTENCES, None)
    for form, path in forms.items():
        data = load_data(path, model=bert, options=DataOptions(read_batch=5))
        assert data.input_names == ("input_ids", "attention_mask"), form
        np.testing.assert_array_equal(data.inputs[0], want["input_ids"], err_msg=form)
        np.testing.assert_array_equal(data.inputs[1], want["attention_mask"], err_msg=form)
        assert data.labels is None and data.vocab_size == len(tok) and data.form == "text"
    # padding was needed and truncation too (the longest sentence is cut at 16 tokens)
    long = "the cat " * 12
    data = load_data(_text(tmp_path / "long.txt", [long, "a dog"]), model=bert)
    assert data.inputs[0].shape == (2, 16) and data.inputs[1][0].all()
    assert data.inputs[1][1].sum() == 4  # [CLS] a dog [SEP]


def _text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_inputs_are_mapped_by_name_not_position(folders, tmp_path) -> None:
    """A model taking (token_type_ids, attention_mask, input_ids) in that order gets each
    array under its name; token type ids the tokenizer does not give are zeros."""
    from transformers import BertModel

    inner = BertModel.from_pretrained(folders["bert"], local_files_only=True).eval()

    class Reordered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, token_type_ids, attention_mask, input_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones(2, 12, dtype=torch.long)
    captured = engine.load_model(Reordered(), (torch.zeros_like(ids), ids, ids))
    spec = model_inputs(captured)
    assert spec.names == ("token_type_ids", "attention_mask", "input_ids")
    data = load_data(_text(tmp_path / "s.txt", SENTENCES[:4]), model=captured,
                     options=DataOptions(tokenizer=str(folders["bert"])))
    want = _tokenizer(folders["bert"])(SENTENCES[:4], padding="max_length", max_length=12,
                                       truncation=True, return_tensors="np")
    np.testing.assert_array_equal(data.inputs[2], want["input_ids"])
    np.testing.assert_array_equal(data.inputs[1], want["attention_mask"])
    np.testing.assert_array_equal(data.inputs[0], np.zeros_like(want["input_ids"]))
    # and the model runs on them: the same hidden states as transformers on the same text
    out = engine.evaluate(captured, data, "relative_error", reference=Reordered(),
                          example_inputs=(torch.zeros_like(ids), ids, ids))
    assert out["value"] < 1e-5


def test_labels_as_indices_or_class_names(folders, tmp_path) -> None:
    cls = engine.load_model(folders["bert_cls"], seq_len=16)
    forms = _write_forms(tmp_path, SENTENCES, LABELS)
    for form, path in forms.items():
        data = load_data(path, model=cls)
        np.testing.assert_array_equal(data.labels, LABELS, err_msg=form)
    # class names through the config's label2id
    names = [f"class{label}" for label in LABELS]
    path = tmp_path / "names.jsonl"
    path.write_text("".join(json.dumps({"sentence": t, "y": n}) + "\n"
                            for t, n in zip(SENTENCES, names)))
    data = load_data(path, model=cls, options=DataOptions(text_field="sentence",
                                                          label_field="y"))
    np.testing.assert_array_equal(data.labels, LABELS)
    path.write_text("".join(json.dumps({"sentence": t, "y": "pos"}) + "\n" for t in SENTENCES))
    error = _error(lambda: load_data(path, model=cls, options=DataOptions(
        text_field="sentence", label_field="y")))
    assert "label 'pos' is not a class index" in str(error) and "names.jsonl" in str(error)


def test_stream_mode_cuts_the_token_stream_into_windows(folders, tmp_path) -> None:
    llama = engine.load_model(folders["llama"], seq_len=8)
    path = _text(tmp_path / "corpus.txt", SENTENCES)
    data = load_data(path, model=llama, options=DataOptions(text_mode="stream"))
    tok = _tokenizer(folders["llama"])
    stream = []
    for sentence in SENTENCES:
        stream += tok(sentence, add_special_tokens=False)["input_ids"]
        stream += tok("\n", add_special_tokens=False)["input_ids"]
    windows = len(stream) // 8
    np.testing.assert_array_equal(data.inputs[0], np.reshape(stream[:windows * 8], (windows, 8)))
    assert data.inputs[1].all() and data.labels is None
    # a seeded subset of the windows
    some = load_data(path, model=llama, options=DataOptions(text_mode="stream", max_samples=3,
                                                            seed=4))
    rows = {tuple(r) for r in data.inputs[0]}
    assert len(some) == 3 and all(tuple(r) in rows for r in some.inputs[0])
    short = _text(tmp_path / "short.txt", ["the cat"])
    error = _error(lambda: load_data(short, model=llama, options=DataOptions(
        text_mode="stream")))
    assert "short.txt holds 2 tokens, fewer than one window of 8" in str(error)


def test_max_samples_is_a_seeded_subset_in_every_form(bert, tmp_path) -> None:
    forms = _write_forms(tmp_path, SENTENCES, LABELS)
    full = load_data(forms["jsonl"], model=bert)
    rows = [tuple(r) for r in full.inputs[0]]
    picked = {}
    for form, path in forms.items():
        data = load_data(path, model=bert, options=DataOptions(max_samples=5, seed=1,
                                                               read_batch=4))
        assert len(data) == 5
        index = [rows.index(tuple(r)) for r in data.inputs[0]]
        assert index == sorted(index)  # original order kept
        np.testing.assert_array_equal(data.labels, np.asarray(LABELS)[index])
        picked[form] = index
    assert len({tuple(v) for v in picked.values()}) == 1  # the same subset from every form
    other = load_data(forms["csv"], model=bert, options=DataOptions(max_samples=5, seed=2))
    assert [rows.index(tuple(r)) for r in other.inputs[0]] != picked["csv"]


def _error(call) -> DataError:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return info.value


def test_bad_text_is_one_line_naming_the_file(folders, bert, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "empty.txt is empty; expected text samples" in str(
        _error(lambda: load_data(empty, model=bert)))
    csv = tmp_path / "q.csv"
    csv.write_text("question,answer\nwhy,because\n")
    assert "q.csv has no column 'text' (columns: question, answer); name the text column " \
           "with --text-field" in str(_error(lambda: load_data(csv, model=bert)))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "the cat"}\nnot json\n')
    assert "bad.jsonl: line 2 is not JSON" in str(_error(lambda: load_data(jsonl, model=bert)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    assert "latin.txt is not UTF-8 text" in str(_error(lambda: load_data(latin, model=bert)))
    txt = _text(tmp_path / "s.txt", SENTENCES)
    bare = engine.load_model(folders["bare"], seq_len=16)
    message = str(_error(lambda: load_data(txt, model=bare)))
    assert "s.txt is text, but model folder" in message and "has no tokenizer" in message
    assert "--tokenizer FOLDER" in message
    # with --tokenizer the same model reads it
    assert len(load_data(txt, model=bare, options=DataOptions(tokenizer=str(folders["bert"]))))
    # a model that takes no token ids
    assert "does not take token ids" in str(_error(lambda: load_data(
        txt, model=engine.load_model("demo"))))
    assert "read for a captured model, not the path demo" in str(
        _error(lambda: load_data(txt, model="demo")))
    assert "--text-mode 'lines' is not allowed; allowed: pad, stream" in str(
        _error(lambda: load_data(txt, model=bert, options=DataOptions(text_mode="lines"))))
    assert "--tokenizer nope is not a folder" in str(_error(lambda: load_data(
        txt, model=bert, options=DataOptions(tokenizer="nope"))))


def test_a_tokenizer_beyond_the_models_vocabulary_is_refused(folders, tmp_path) -> None:
    narrow = llama_folder(tmp_path / "narrow", vocab_extra=-5)
    txt = _text(tmp_path / "s.txt", SENTENCES)
    error = _error(lambda: load_data(txt, model=engine.load_model(narrow, seq_len=16)))
    assert "the tokenizer gives token id 28, beyond the vocabulary of" in str(error)
    assert "(24 tokens)" in str(error)


def test_a_datasets_folder_with_splits_and_hf_names(bert, tmp_path) -> None:
    import datasets

    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": SENTENCES}),
                                  "test": datasets.Dataset.from_dict({"text": SENTENCES[:4]})})
    split.save_to_disk(os.fspath(tmp_path / "dd"))
    error = _error(lambda: load_data(tmp_path / "dd", model=bert))
    assert "holds the splits train, test; give one split's folder" in str(error)
    assert len(load_data(tmp_path / "dd" / "test", model=bert)) == 4
    assert "write a Hugging Face dataset as hf:NAME:SPLIT" in str(
        _error(lambda: load_data("hf:onlyname", model=bert)))


def test_hf_name_reads_only_the_local_cache(folders, tmp_path) -> None:
    """The CLI keeps datasets off the network unless the user sets HF_HUB_OFFLINE=0: a name
    that is not cached is one line saying so, not a download attempt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB", "HF_DATASETS"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"))
    done = subprocess.run([sys.executable, "-m", "engine", "evaluate", str(folders["bert"]),
                           "--data", "hf:prunescope-missing/none:test", "--reference",
                           str(folders["bert"])], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert line.startswith("prunescope: error: --data hf:prunescope-missing/none:test is not "
                           "in the local datasets cache")
    assert "set HF_HUB_OFFLINE=0" in line
