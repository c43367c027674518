"""The verifier's failure path: a fault injected into the rewrite (one sliced weight corrupted,
a slice dropped, the wrong block or expert removed, a corrupted hf/ folder) must stop the run
with its one-line error and leave no output behind.

Only the slicing step is replaced, by a wrapper around the real function that corrupts exactly
one thing; mask mode and the verifier that compares with it are the engine's own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import engine
import engine.io.hf_export as hf_export
import engine.transform.apply as apply_module
import engine.transform.depth as depth_module
import engine.transform.experts as experts_module
from engine.errors import PruneScopeError
from engine.transform.experts import find_routers, prune_experts
from tests.helpers import cli, one_error_line
from tests.test_depth import PreNormLM, ResCNN, _ids
from tests.test_moe import StackedMoE, _tokens
from tests.zoo import tiny


def _corrupting_take(monkeypatch, corrupt):
    """`take` (the slicing of every pruned weight) with the first sliced floating weight
    passed through `corrupt`; the calls are counted so the test knows the fault happened."""
    real_take = apply_module.take
    calls = []

    def take(data, dim, index):
        out = real_take(data, dim, index)
        calls.append(out.shape)
        if len(calls) == 1:
            out = corrupt(out, data, dim, index)
        return out

    monkeypatch.setattr(apply_module, "take", take)
    return calls


def _plus_one_element(out, data, dim, index):
    bad = out.clone()
    bad.view(-1)[0] += 10.0 * float(data.abs().max())
    return bad


def _one_nan(out, data, dim, index):
    bad = out.clone()
    bad.view(-1)[0] = float("nan")
    return bad


def _unsliced(out, data, dim, index):
    """The slice dropped: the weight keeps every channel along `dim`."""
    return data.clone()


def test_sound_rewrite_passes_the_verifier():
    """The control for the faults below: the same prune, untouched, verifies exactly."""
    model, inputs = tiny()
    result = engine.prune(model, inputs, ratio=0.5)
    assert result.report["verification"]["exact"]


def test_one_corrupted_weight_stops_the_prune(monkeypatch):
    model, inputs = tiny()
    calls = _corrupting_take(monkeypatch, _plus_one_element)
    with pytest.raises(PruneScopeError, match=r"^verification failed: the pruned model differs "
                                              r"from the masked original by [0-9.e+-]+ "
                                              r"\(relative\), where it must agree exactly$"):
        engine.prune(model, inputs, ratio=0.5)
    assert calls, "the fault was never injected"


def test_one_nan_weight_stops_the_prune(monkeypatch):
    model, inputs = tiny()
    _corrupting_take(monkeypatch, _one_nan)
    with pytest.raises(PruneScopeError, match="NaN or infinite outputs where the masked original"):
        engine.prune(model, inputs, ratio=0.5)


def test_a_dropped_slice_stops_the_prune(monkeypatch):
    model, inputs = tiny()
    _corrupting_take(monkeypatch, _unsliced)
    with pytest.raises(PruneScopeError, match="^the pruned model failed to run: "):
        engine.prune(model, inputs, ratio=0.5)


@pytest.mark.parametrize("corrupt", [_plus_one_element, _unsliced])
def test_cli_stops_in_one_line_and_writes_nothing(corrupt, tiny_pt2, tmp_path, monkeypatch,
                                                  capfd):
    _corrupting_take(monkeypatch, corrupt)
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "prune", tiny_pt2, "--ratio", "0.5", "--out", out)
    assert rc != 0
    line = one_error_line(err)
    assert "verification failed" in line or "the pruned model failed to run" in line
    assert not out.exists() or not any(out.iterdir())


def test_a_wrong_slice_of_a_program_with_heads_is_caught(monkeypatch):
    """The same fault in a transformer, on its exact groups (the MLPs; the residual stream
    meets layer norms, so it is not expected to agree exactly)."""
    analysis = engine.analyze(PreNormLM().eval(), (_ids(),))
    exact = {g.name: 0.5 for g in analysis.groups if analysis.structure(False).group(g.name).exact}
    assert len(exact) == 3
    the_plan = engine.plan(analysis, ratios=exact)
    assert engine.apply(analysis, the_plan).report["verification"]["exact"]  # the control
    _corrupting_take(monkeypatch, _plus_one_element)
    with pytest.raises(PruneScopeError, match="^verification failed"):
        engine.apply(analysis, the_plan)


# ------------------------------------------------------------------------------ depth
def _remove_the_wrong_block(monkeypatch):
    """`remove` given, instead of the chosen blocks, the same number of other blocks."""
    real_remove = depth_module.remove
    seen = []

    def remove(gm, removed):
        every = depth_module.find_blocks(gm)
        chosen = {b.name for b in removed}
        others = [b for b in every if b.name not in chosen][:len(removed)]
        seen.append(([b.name for b in removed], [b.name for b in others]))
        return real_remove(gm, others)

    monkeypatch.setattr(depth_module, "remove", remove)
    return seen


def test_removing_the_wrong_block_stops_the_prune(monkeypatch):
    model = ResCNN().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = _remove_the_wrong_block(monkeypatch)
    with pytest.raises(PruneScopeError, match=r"^depth verification failed: the reduced model "
                                              r"differs from the original with the removed "
                                              r"blocks' branches zeroed by [0-9.e+-]+"):
        engine.prune(model, (x,), remove_blocks=1)
    assert seen and seen[0][0] != seen[0][1]


def test_cli_removing_the_wrong_block_is_one_line(monkeypatch, tmp_path, capfd):
    path = tmp_path / "lm.pt2"
    torch.export.save(torch.export.export(PreNormLM().eval(), (_ids(),)), path)
    _remove_the_wrong_block(monkeypatch)
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "prune", path, "--remove-blocks", "2", "--out", out)
    assert rc != 0
    assert "depth verification failed" in one_error_line(err)
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------- experts
def test_removing_the_wrong_expert_stops_the_prune(monkeypatch):
    model = StackedMoE().eval()
    x = _tokens()
    analysis = engine.analyze(model, (x,))
    (router,) = find_routers(analysis)
    roots = analysis.structure(False).state.uf.roots()
    real_rewrite = experts_module.rewrite
    swapped = []

    def rewrite(gm, structure, removed, release=None):
        gone = [e for e in range(len(router.ids)) if removed[roots[router.ids[e]]].all()]
        other = next(e for e in range(len(router.ids)) if e not in gone)
        wrong = removed.copy()
        wrong[roots[router.ids[gone[0]]]] = False
        wrong[roots[router.ids[other]]] = True
        swapped.append((gone[0], other))
        return real_rewrite(gm, structure, wrong, release)

    monkeypatch.setattr(experts_module, "rewrite", rewrite)
    with pytest.raises(PruneScopeError, match=r"^expert verification failed: the reduced model "
                                              r"differs from the original with the removed "
                                              r"experts' router logits at -inf"):
        prune_experts(analysis, 0.25)
    assert len(swapped) == 1


# -------------------------------------------------------------------------------- hf/
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    import transformers as tf

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    tf.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_pruned(llama_folder):
    """One prune saved by both tests below (saving leaves the result's module as it was)."""
    return engine.prune(str(llama_folder), ratio=0.5, uniform=True,
                        options={"reshape_channel_axis": -2})


def test_a_corrupted_hf_folder_is_not_written(llama_pruned, tmp_path, monkeypatch):
    real_weights = hf_export.pretrained_weights

    def pretrained_weights(hf, module, *rest):
        model, tensors = real_weights(hf, module, *rest)
        # a copy: the pruned module (model.pt2) keeps its own weight
        weight = tensors["lm_head.weight"].clone()
        weight[0, 0] += 10.0 * float(weight.abs().max())
        tensors["lm_head.weight"] = weight
        return model, tensors

    monkeypatch.setattr(hf_export, "pretrained_weights", pretrained_weights)
    result = llama_pruned
    with pytest.warns(UserWarning, match="hf/ not written: the reloaded hf/ model differs"):
        engine.save(result, tmp_path, onnx=False)
    entry = json.loads((tmp_path / "report.json").read_text())["hf"]
    assert entry["written"] is False
    assert entry["reason"].startswith("the reloaded hf/ model differs from model.pt2 by ")
    assert not (tmp_path / "hf").exists()
    assert (tmp_path / "model.pt2").is_file()


def test_sound_hf_folder_is_written(llama_pruned, tmp_path):
    """The control: the same result saved without the fault writes hf/."""
    result = llama_pruned
    engine.save(result, tmp_path, onnx=False)
    assert result.report["hf"]["written"]
    assert (tmp_path / "hf" / "config.json").is_file()
    assert np.isfinite(result.report["hf"]["max_rel_diff_vs_pt2"])
