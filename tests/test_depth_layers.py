"""Whole-layer depth pruning (`block_unit="layer"`): the consecutive residual blocks of one
transformer layer are scored together (the stream entering the layer against the stream
leaving it) and removed together, so a transformers model keeps a loadable hf/ folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import engine
from tests.helpers import cli, one_error_line
from tests.test_depth import PreNormLM, ResCNN
from tests.test_depth import _ids as _lm_ids
from tests.test_hf_depth import SEQ, _ids, _llama, _pt2_logits, _rel, _reload, _without_layers


def _layer_relative_norms(model) -> list[float]:
    """||layer output - layer input|| / ||layer input|| of every decoder layer, measured with
    hooks on the transformers modules on the engine's seeded example inputs (seed 0)."""
    ids = torch.randint(0, 100, (1, SEQ), generator=torch.Generator().manual_seed(0))
    seen: dict[int, tuple] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(_module, args, kwargs, output, i=i):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            seen[i] = (before.double(), after.double())
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for h in hooks:
        h.remove()
    return [float((a - b).norm() / b.norm()) for b, a in (seen[i] for i in sorted(seen))]


@pytest.fixture(scope="module")
def llama4():
    """(the 4-layer Llama, its capture): one capture read by several tests; engine.prune
    removes blocks from a copy of the captured graph, so each test's prune is its own."""
    model = _llama()
    return model, engine.analyze(model, seq_len=SEQ)


def test_one_whole_llama_layer_removed_and_written_as_hf(tmp_path, llama4):
    model, analysis = llama4
    expected = _layer_relative_norms(model)
    lowest = min(range(4), key=expected.__getitem__)
    result = engine.prune(analysis, remove_blocks=1, block_unit="layer")
    depth = result.report["depth"]
    assert depth["unit"] == "layer"
    assert depth["removed_layers"] == [f"model.layers.{lowest}"]
    assert [entry["score"] for entry in depth["layers"]] == pytest.approx(expected, rel=1e-4)
    assert sorted(b["name"] for b in result.report["blocks"] if b["removed"]) == [
        f"model.layers.{lowest}.mlp", f"model.layers.{lowest}.self_attn"]
    assert depth["verification"]["exact"]
    engine.save(result, tmp_path, onnx=False)
    reloaded = _reload(tmp_path / "hf")
    assert reloaded.config.num_hidden_layers == 3
    ids = _ids()
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits
        want = _without_layers(model, {lowest})(input_ids=ids).logits
    assert _rel(got, _pt2_logits(tmp_path, ids)) <= 1e-5
    assert _rel(got, want) <= 1e-5


def test_block_ratio_counts_layers(llama4):
    result = engine.prune(llama4[1], block_ratio=0.5, block_unit="layer")
    assert len(result.report["depth"]["removed_layers"]) == 2
    assert sum(b["removed"] for b in result.report["blocks"]) == 4


def test_blocks_outside_multi_block_layers_are_their_own_layers():
    """ResNet-like blocks (blocks.0, blocks.1, ...) are one block per layer: the same choice
    as block mode, and the layer score is the block's relative branch norm."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    by_block = engine.prune(ResCNN().eval(), (x,), remove_blocks=1)
    by_layer = engine.prune(ResCNN().eval(), (x,), remove_blocks=1, block_unit="layer")
    assert by_layer.report["depth"]["removed_layers"] == ["blocks.1"]
    assert [b["removed"] for b in by_layer.report["blocks"]] == \
        [b["removed"] for b in by_block.report["blocks"]]
    assert [entry["score"] for entry in by_layer.report["depth"]["layers"]] == pytest.approx(
        [b["score"] for b in by_block.report["blocks"]], rel=1e-6)


def test_cli_removes_a_whole_layer_and_writes_hf(tmp_path, capfd):
    folder = tmp_path / "llama"
    _llama(layers=3).save_pretrained(folder)  # 3 layers: a capture a quarter cheaper
    rc, out, err = cli(capfd, "prune", folder, "--remove-blocks", "1", "--block-unit", "layer",
                       "--out", tmp_path / "o", "--no-onnx")
    assert rc == 0, err
    assert "layers: removed 1 of 3: model.layers." in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["hf"]["written"], report["hf"]
    assert _reload(tmp_path / "o" / "hf").config.num_hidden_layers == 2


def test_bad_block_unit_is_one_line(tmp_path, capfd):
    folder = tmp_path / "llama"
    _llama(layers=2).save_pretrained(folder)
    rc, _out, err = cli(capfd, "prune", folder, "--remove-blocks", "1", "--block-unit", "layers",
                        "--out", tmp_path / "o", "--no-onnx")
    assert rc == 2
    line = one_error_line(err)
    assert "--block-unit" in line and "block, layer" in line
    assert not (tmp_path / "o").exists()


def test_too_many_layers_is_one_line(llama4):
    with pytest.raises(engine.errors.OptionError, match="has 4 removable layers"):
        engine.prune(llama4[1], remove_blocks=4, block_unit="layer")


def test_layer_influence_with_calibration_on_a_model_of_ones_own():
    """Blocks named layers.0 and layers.0#2 (both sublayers' weights under layers.0) form one
    layer; with calibration its score is 1 - cos(stream before the layer, stream after it),
    computed here from the model's own recorded streams."""
    model = PreNormLM().eval()
    calibration = torch.randint(0, 50, (6, 10), generator=torch.Generator().manual_seed(5))
    result = engine.prune(model, (_lm_ids(),), remove_blocks=1, block_unit="layer",
                          calibration=calibration.numpy())
    depth = result.report["depth"]
    assert [entry["blocks"] for entry in depth["layers"]] == [
        [f"layers.{k}", f"layers.{k}#2"] for k in range(3)]
    model.record = []
    with torch.no_grad():
        for ids in calibration.split(2):
            model(ids)
    records, model.record = model.record, None
    per_layer: dict[str, list[float]] = {}
    for attn, mlp in zip(records[0::2], records[1::2]):
        before, after = attn[2], mlp[2] + mlp[3]
        cos = (before * after).sum(-1) / (before.norm(dim=-1) * after.norm(dim=-1))
        per_layer.setdefault(attn[0], []).append(float((1 - cos).mean()))
    expected = [float(np.mean(v)) for v in per_layer.values()]
    assert [entry["score"] for entry in depth["layers"]] == pytest.approx(expected, rel=1e-5)
    lowest = int(np.argmin(expected))
    assert depth["removed_layers"] == [f"layers.{lowest}"]
    model.skip = {(lowest, "attn"), (lowest, "mlp")}
    with torch.no_grad():
        torch.testing.assert_close(result.module(_lm_ids()), model(_lm_ids()),
                                   rtol=1e-6, atol=1e-6)
    assert depth["verification"]["exact"]


def test_block_unit_without_a_depth_option_is_one_line(tmp_path, capfd):
    folder = tmp_path / "llama"
    _llama(layers=2).save_pretrained(folder)
    rc, _out, err = cli(capfd, "prune", folder, "--ratio", "0.2", "--block-unit", "layer",
                        "--out", tmp_path / "o", "--no-onnx")
    assert rc == 2
    assert "--remove-blocks N or --block-ratio R" in one_error_line(err)
    assert not (tmp_path / "o").exists()
