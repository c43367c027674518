"""Hugging Face model folders in, OUT/hf/ out: folders written here with save_pretrained from
tiny configs (random weights, safetensors), pruned from the folder, hf/ reloaded with
transformers and compared with the pruned model.pt2 loaded from disk."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import transformers as tf
from torch.utils import _pytree as pytree

import engine
from engine.graph.capture import has_dynamic_batch
from engine.io.hf import load_folder
from engine.scoring.planning import aligned_kept
from tests.helpers import cli, one_error_line

TOKENIZER = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}}}


def _llama_config(layers=2):
    return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=100)


CONFIGS = {
    "bert": (lambda: tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=100),
             "BertForSequenceClassification", "AutoModelForSequenceClassification"),
    "vit": (lambda: tf.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8),
            "ViTForImageClassification", "AutoModelForImageClassification"),
    "gpt2": (lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                   n_positions=64, bos_token_id=0, eos_token_id=0),
             "GPT2LMHeadModel", "AutoModelForCausalLM"),
    "llama": (_llama_config, "LlamaForCausalLM", "AutoModelForCausalLM"),
    "resnet": (lambda: tf.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                       image_size=32),
               "ResNetForImageClassification", "AutoModelForImageClassification"),
}
ROUND_TRIP = ("bert", "vit", "gpt2", "llama")


def _save(name, folder, **save_kwargs):
    make_config, cls, _ = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(tf, cls)(make_config()).eval()
    model.save_pretrained(folder, **save_kwargs)
    if name in ("bert", "gpt2", "llama"):
        (folder / "tokenizer.json").write_text(json.dumps(TOKENIZER))
        (folder / "special_tokens_map.json").write_text('{"pad_token": "a"}')
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_folders")
    out = {}
    for name in CONFIGS:
        out[name] = root / name
        _save(name, out[name])
    return out


def _inputs(name, seq=32):
    """Fresh inputs of the captured shapes, drawn independently of the engine's."""
    gen = torch.Generator().manual_seed(123)
    if name in ("vit", "resnet"):
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}
    return {"input_ids": torch.randint(0, 100, (1, seq), generator=gen),
            "attention_mask": torch.ones(1, seq, dtype=torch.long)}


def _leaves(out):
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _assert_hf_equals_pt2(name, out_dir):
    """hf/ loads with the Auto class (no custom code, local files) and equals model.pt2."""
    _, cls, auto = CONFIGS[name]
    model = getattr(tf, auto).from_pretrained(out_dir / "hf", local_files_only=True,
                                              trust_remote_code=False).eval()
    assert type(model).__name__ == cls
    program = torch.export.load(out_dir / "model.pt2")
    inputs = _inputs(name)
    with torch.no_grad():
        got = _leaves(model(**inputs, use_cache=False) if name in ("gpt2", "llama")
                      else model(**inputs))
        want = _leaves(program.module()(*inputs.values()))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    return model


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_folder_pruned_with_cli_round_trips_through_hf(name, folders, tmp_path, capfd):
    out = tmp_path / "out"
    rc, stdout, err = cli(capfd, "prune", folders[name], "--ratio", "0.5", "--uniform",
                          "--reshape-channel-axis", "-2", "--no-onnx", "--out", out)
    assert rc == 0, err
    assert "hf/ not written" not in err
    report = json.loads((out / "report.json").read_text())
    assert report["hf"]["written"] and report["hf"]["max_rel_diff_vs_pt2"] <= 1e-5
    model = _assert_hf_equals_pt2(name, out)
    original = json.loads((folders[name] / "config.json").read_text())
    saved = json.loads((out / "hf" / "config.json").read_text())
    assert "auto_map" not in saved
    shrunk = [k for k, v in report["hf"]["config"].items() if v != original.get(k)]
    assert shrunk, "the config describes smaller layers"
    for key in shrunk:
        # GPT2Config's n_inner None means 4 * n_embd
        before = original[key] if original.get(key) is not None else 4 * original["n_embd"]
        assert saved[key] < before
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in getattr(tf, CONFIGS[name][1])(getattr(tf, type(
            model.config).__name__)(**original)).parameters())
    for carried in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        if (folders[name] / carried).exists():
            assert (out / "hf" / carried).read_bytes() == (folders[name] / carried).read_bytes()
    assert "hf" in stdout


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_folder_pruned_in_python_round_trips_through_hf(name, folders, tmp_path):
    result = engine.prune(str(folders[name]), ratio=0.4, uniform=True,
                          options={"reshape_channel_axis": -2})
    engine.save(result, tmp_path, onnx=False)
    assert result.report["hf"]["written"]
    _assert_hf_equals_pt2(name, tmp_path)


def test_pretrained_model_in_python_writes_hf(tmp_path):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(_llama_config()).eval()
    result = engine.prune(model, ratio=0.5, uniform=True)  # inputs from the config
    # 32 tokens from the config; a batch of 2, as a size-1 batch would be captured fixed
    assert result.example_inputs[0].shape == (2, 32)
    assert has_dynamic_batch(result.program)
    engine.save(result, tmp_path)
    assert (tmp_path / "model.onnx").is_file()
    _assert_hf_equals_pt2("llama", tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    # default axis -1: heads all stay, the hidden size stays a multiple of the heads
    # (LlamaConfig requires it); rotary pairs and value channels shrink together as a
    # smaller head_dim with the rope parameters of the kept frequencies (tests/test_rotary.py)
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["hidden_size"] < 64 and config["hidden_size"] % 4 == 0
    assert config["intermediate_size"] < 128
    assert config["head_dim"] < 16 and config["head_dim"] % 2 == 0
    assert result.report["uniform"]["kept_for_config"] == []


def test_resnet_folder_with_uniform_shrinks_stage_widths_and_bottlenecks(folders, tmp_path,
                                                                        capfd):
    """ResNetConfig fixes each bottleneck's inner width at a quarter of its stage width: the
    stage and its bottlenecks are tied in that proportion, so hf/ is written."""
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "prune", folders["resnet"], "--ratio", "0.5", "--uniform",
                     "--no-onnx", "--out", out)
    assert rc == 0, err
    assert "hf/ not written" not in err
    report = json.loads((out / "report.json").read_text())
    assert report["hf"]["written"], report["hf"]
    saved = json.loads((out / "hf" / "config.json").read_text())
    assert saved["hidden_sizes"] != [32, 64]
    assert all(a <= b for a, b in zip(saved["hidden_sizes"], [32, 64]))
    _assert_hf_equals_pt2("resnet", out)
    # without --uniform the stages are cut unequally: one line says --uniform is needed
    rc, _, err = cli(capfd, "prune", folders["resnet"], "--ratio", "0.5", "--no-onnx",
                     "--out", tmp_path / "free")
    lines = [ln for ln in err.splitlines() if "hf/" in ln]
    assert rc == 0 and len(lines) == 1 and "hf/ not written" in lines[0], err


def test_plan_that_is_not_uniform_needs_uniform_for_hf(tmp_path, capfd):
    folder = tmp_path / "llama3"
    torch.manual_seed(1)  # 3 layers (2 would be cut equally here)
    tf.LlamaForCausalLM(_llama_config(layers=3)).save_pretrained(folder)
    out = tmp_path / "out"
    # with --uniform the output folder gets hf/; the run without it then into the same
    # folder writes none and retires that hf/ (two prunes where three were)
    rc, _, err = cli(capfd, "prune", folder, "--ratio", "0.5", "--reshape-channel-axis", "-2",
                     "--uniform", "--no-onnx", "--out", out)
    assert rc == 0 and (out / "hf" / "config.json").is_file(), err
    rc, _, err = cli(capfd, "prune", folder, "--ratio", "0.5", "--reshape-channel-axis", "-2",
                     "--no-onnx", "--out", out)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    mlp = [len(g["pruned"]) for g in report["groups"] if "mlp.gate_proj" in g["name"]]
    assert len(set(mlp)) > 1, "the global ranking cut the MLPs unequally"
    assert report["hf"] == {"written": False, "reason": report["hf"]["reason"]}
    assert report["hf"]["reason"].startswith("--uniform is needed for hf/")
    assert not (out / "hf").exists()


def test_uniform_gives_equal_counts_per_layer(tmp_path):
    torch.manual_seed(1)
    model = tf.LlamaForCausalLM(_llama_config(layers=4)).eval()
    analysis = engine.analyze(model)
    options = engine.PruningOptions(reshape_channel_axis=-2)
    free = engine.plan(analysis, options, ratio=0.5)
    uniform = engine.plan(analysis, options, ratio=0.5, uniform=True)
    for kind in ("mlp.gate_proj", "self_attn.q_proj"):
        asked = [g.requested for g in free.groups if kind in g.name]
        counts = [len(g.pruned) for g in uniform.groups if kind in g.name]
        assert len(asked) == len(counts) == 4
        assert len(set(counts)) == 1
        # the per-layer count: the layers' asked counts summed, shared out, step rule
        n = next(g.n for g in free.groups if kind in g.name)
        want = math.ceil(sum(asked) / 4 - 0.5)  # nearest, ties down
        if kind == "mlp.gate_proj":
            want = n - aligned_kept(n - want, n, 1, 2, "round")
        assert counts[0] == want
    hidden_free = next(g for g in free.groups if "embed_tokens" in g.name)
    hidden = next(g for g in uniform.groups if "embed_tokens" in g.name)
    assert hidden.n - len(hidden.pruned) <= hidden_free.n - hidden_free.requested + 4


def test_sharded_checkpoint_loads_every_shard(tmp_path):
    folder = tmp_path / "sharded"
    model = _save("llama", folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    analysis = engine.analyze(str(folder))
    inputs = analysis.captured.example_inputs
    with torch.no_grad():
        want = model(*inputs).logits
        got = analysis.gm(*inputs)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    result = engine.prune(analysis, ratio=0.5, uniform=True)
    engine.save(result, tmp_path / "out", onnx=False)
    _assert_hf_equals_pt2("llama", tmp_path / "out")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(engine.ModelLoadError, match="shard .* is missing"):
        engine.analyze(str(folder))


def test_auto_map_is_refused(folders, tmp_path, capfd):
    folder = tmp_path / "custom"
    shutil.copytree(folders["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    rc, _, err = cli(capfd, "prune", folder, "--ratio", "0.5", "--out", tmp_path / "out")
    assert rc == 2
    line = one_error_line(err)
    assert "auto_map" in line and "trust_remote_code" in line
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_needs_trust_pickle(folders, tmp_path, capfd):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(folders["bert"] / "config.json", folder)
    model = tf.BertForSequenceClassification(CONFIGS["bert"][0]()).eval()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    rc, _, err = cli(capfd, "scores", folder)
    assert rc == 2
    line = one_error_line(err)
    assert "pytorch_model.bin" in line and "--trust-pickle" in line
    rc, out, err = cli(capfd, "scores", folder, "--trust-pickle", "--json", tmp_path / "s.json")
    assert rc == 0, err
    assert "warning: loading pickle" in err
    # the weights the folder loader read from the pickle are the saved ones (the loader that
    # engine.analyze and the CLI use; no second capture: capture is tested on its own)
    with pytest.warns(UserWarning, match="loading pickle"):
        loaded, inputs, _ = load_folder(folder, trust_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).logits, model(*inputs).logits)


def test_folder_without_config_is_refused(folders, tmp_path, capfd):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copy(folders["llama"] / "model.safetensors", folder)
    rc, _, err = cli(capfd, "scores", folder)
    assert rc == 2
    line = one_error_line(err)
    assert "config.json" in line and str(folder) in line


def test_seq_len_and_input_shape_set_the_example_inputs(folders, capfd):
    captured = engine.analyze(str(folders["gpt2"]), seq_len=8).captured
    # a batch of 2: a size-1 batch would be captured fixed
    assert [tuple(x.shape) for x in captured.example_inputs] == [(2, 8), (2, 8)]
    assert captured.example_inputs[1].eq(1).all()
    captured = engine.analyze(str(folders["vit"]), input_shapes=[(2, 3, 32, 32)]).captured
    assert tuple(captured.example_inputs[0].shape) == (2, 3, 32, 32)
    rc, _, err = cli(capfd, "scores", folders["gpt2"], "--seq-len", "0")
    assert rc == 2 and "--seq-len" in one_error_line(err)


def test_evaluate_and_sweep_take_a_folder(folders, tmp_path, capfd):
    """Text folders take input_ids and attention_mask: held-out data gives x0 and x1."""
    import numpy as np

    gen = np.random.default_rng(7)
    ids = gen.integers(0, 100, size=(6, 16))
    data = tmp_path / "heldout.npz"
    np.savez(data, x0=ids, x1=np.ones_like(ids))
    rc, out, err = cli(capfd, "evaluate", folders["llama"], "--data", data, "--metric",
                       "perplexity", "--seq-len", "16", "--json", tmp_path / "ppl.json")
    assert rc == 0, err
    measured = json.loads((tmp_path / "ppl.json").read_text())["value"]
    model = tf.LlamaForCausalLM.from_pretrained(folders["llama"], local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids)).logits
    # perplexity by hand: next-token cross entropy over every position
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100),
                                            torch.as_tensor(ids)[:, 1:].reshape(-1))
    assert measured == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    from engine.quality.sweep import sweep

    report = sweep(str(folders["llama"]), {"layer_norm": "tss_norm"},
                                        [0.3], eval_data=str(data), metric="perplexity",
                                        seq_len=16, workers=1)
    assert report["complete"] and len(report["points"]) == 1
    assert report["original"] == pytest.approx(measured, rel=1e-5)
    assert report["points"][0]["params"] < report["before"]["params"]
