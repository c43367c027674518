"""HFSource: the Auto class of a transformers model, looked up only when first asked for."""

from __future__ import annotations

import copy

import pytest

from engine.io import hf


def _tiny(cls_name: str):
    import transformers

    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=50, num_labels=3)
    return getattr(transformers, cls_name)(cfg).eval()


@pytest.mark.parametrize(("cls_name", "auto"), [
    ("BertForSequenceClassification", "AutoModelForSequenceClassification"),
    ("BertForMaskedLM", "AutoModelForMaskedLM"),
])
def test_auto_class_is_found_when_first_needed(monkeypatch, cls_name, auto):
    calls = []
    real = hf.auto_class_for
    monkeypatch.setattr(hf, "auto_class_for", lambda *a: calls.append(a) or real(*a))
    source = hf.source_of_model(_tiny(cls_name), ("input_ids",))
    assert calls == []  # describing the model did not look it up
    copied = copy.deepcopy(source)  # the "not looked up yet" marker survives a copy
    assert source.auto_class == auto
    assert source.auto_class == auto
    assert copied.auto_class == auto
    assert len(calls) == 2  # once per object, then cached
