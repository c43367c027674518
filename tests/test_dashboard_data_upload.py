"""The dashboard's data upload takes the forms of the engine's loader: text is tokenized
with the loaded model's tokenizer (real Streamlit AppTest, a real model folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from engine.io.data import UPLOAD_SUFFIXES
from tests.helpers import app_ok
from tests.text_models import SENTENCES, bert_folder

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
TIMEOUT = 240


def test_text_upload_is_tokenized_for_the_loaded_model(tmp_path) -> None:
    from transformers import AutoTokenizer

    folder = bert_folder(tmp_path / "bert")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    app_ok(at)
    uploader = at.file_uploader(key="upload_eval")
    assert set(uploader.proto.type) == set(UPLOAD_SUFFIXES)  # the engine's list
    # text on the demo (an image model): one line, the demo still drawn
    uploader.upload("notes.txt", b"the cat sat\n").run()
    assert not at.exception
    assert any("notes.txt is text, but demo does not take token ids" in e.value
               for e in at.error)
    at.radio(key="source").set_value("Local file path").run()
    at.text_input(key="local_path").set_value(str(folder)).run()
    rows = "".join(json.dumps({"text": t}) + "\n" for t in SENTENCES).encode()
    at.file_uploader(key="upload_eval").upload("sentences.jsonl", rows).run()
    app_ok(at)
    data = at.session_state["_ps_eval"][1]
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    want = tok(SENTENCES, padding="max_length", truncation=True, max_length=32,
               return_tensors="np")
    assert data.input_names == ("input_ids", "attention_mask")
    np.testing.assert_array_equal(data.inputs[0], want["input_ids"])
    np.testing.assert_array_equal(data.inputs[1], want["attention_mask"])
