"""Recovery (engine.recover): every method on the demo, measured on the held-out evaluation
set (never the calibration set), exactness of lsq and bn against hand computations, ratio 0,
export, reproducibility and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.demo import ASSETS_DIR
from engine.errors import OptionError

DATA_LIGHT = ("bias", "lsq", "bn", "norm")


def _accuracy(module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy, computed here rather than by the code under test."""
    with torch.no_grad():
        logits = module(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    with np.load(ASSETS_DIR / "demo_calib.npz") as data:
        return {"x": data["x"], "y": data["y"]}


@pytest.fixture(scope="module")
def evaluation() -> tuple[np.ndarray, np.ndarray]:
    with np.load(ASSETS_DIR / "demo_eval.npz") as data:
        return data["x"], data["y"]


@pytest.fixture(scope="module")
def pruned():
    return engine.prune("demo", ratio=0.5)


@pytest.fixture(scope="module")
def data_light(pruned, calib):
    return engine.recover(pruned, calib, "bn,bias,lsq,norm")


def test_calibration_and_evaluation_sets_are_disjoint(calib, evaluation):
    seen = {row.tobytes() for row in calib["x"]}
    assert not any(row.tobytes() in seen for row in evaluation[0])


# margins: measured gains on the 450 held-out digits (25.3% after pruning) were bn +20.4,
# bias +26.9 and lsq +73.1 points; the asserted margins leave room. `norm` alone leaves the
# accuracy where it is (upstream damage dominates); its own job is tested below.
@pytest.mark.parametrize(("method", "margin"), [("bn", 0.10), ("bias", 0.10), ("lsq", 0.60)])
def test_each_method_improves_demo_accuracy(pruned, calib, evaluation, method, margin):
    before = _accuracy(pruned.module, *evaluation)
    recovered = engine.recover(pruned, calib, method)
    after = _accuracy(recovered.module, *evaluation)
    assert after >= before + margin, (method, before, after)
    assert recovered.report["recovery"]["methods"] == [method]
    assert _accuracy(pruned.module, *evaluation) == before  # the input result is untouched


def test_data_light_recovery_reaches_ninety_percent(pruned, data_light, evaluation):
    assert _accuracy(data_light.module, *evaluation) >= 0.90
    info = data_light.report["recovery"]
    # each method ran on top of the ones kept before it and stayed only if the held-back
    # accuracy rose; lsq carries most of the gain
    assert list(info["per_method"]) == [m for m in ("bias", "lsq", "bn", "norm")
                                        if m not in info["skipped"]]
    assert "lsq" in info["methods"]
    for name, verdict in info["per_method"].items():
        assert verdict["kept"] == (verdict["after"] > verdict["before"]) == \
            (name in info["methods"])
    assert info["metric"] == "accuracy"
    assert info["metric_after"] > info["metric_before"]
    for name, param in pruned.module.named_parameters():  # same shapes as the pruned model
        assert dict(data_light.module.named_parameters())[name].shape == param.shape


def test_distill_improves_demo_accuracy(pruned, calib, evaluation):
    recovered = engine.recover(pruned, calib, "distill", steps=60, seed=0)
    # measured: 25.3% -> above 90% after 60 steps
    assert _accuracy(recovered.module, *evaluation) >= _accuracy(pruned.module, *evaluation) + 0.4


def test_distill_with_steps_is_reproducible(pruned, calib):
    def weights(seed):
        r = engine.recover(pruned, calib, "distill", steps=8, seed=seed)
        return {k: v.clone() for k, v in r.module.state_dict().items()}

    first, second, other = weights(1), weights(1), weights(2)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.fixture(scope="module")
def unpruned(calib):
    """The demo pruned at ratio 0, shared by the methods below, with its outputs as made."""
    result = engine.prune("demo", ratio=0.0)
    with torch.no_grad():
        return result, result.module(torch.from_numpy(calib["x"][:64]))


@pytest.mark.parametrize("method", [*DATA_LIGHT, "distill"])
def test_ratio_zero_is_left_unchanged(calib, unpruned, method):
    result, made = unpruned
    few = {"x": calib["x"][:200], "y": calib["y"][:200]}
    recovered = engine.recover(result, few, method, steps=5)
    x = torch.from_numpy(calib["x"][:64])
    with torch.no_grad():
        assert torch.equal(recovered.module(x), result.module(x))
        assert torch.equal(result.module(x), made)  # no earlier method changed the shared one
    assert recovered.report["recovery"]["methods"] == []
    assert method in recovered.report["recovery"]["skipped"]


class _Chain(nn.Module):
    """x -> fc1 -> fc2: no nonlinearity, so hidden channels 4..7 are exactly linear
    combinations of channels 0..3 when fc1's rows are."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        mix = torch.randn(4, 4, generator=gen)
        with torch.no_grad():
            self.fc1.weight[:4] = torch.randn(4, 6, generator=gen)
            self.fc1.bias[:4] = torch.randn(4, generator=gen)
            self.fc1.weight[4:] = mix @ self.fc1.weight[:4]
            self.fc1.bias[4:] = mix @ self.fc1.bias[:4]

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _dynamic_program(model: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


def test_lsq_is_exact_when_removed_inputs_are_combinations_of_kept_ones():
    model = _Chain()
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(1))
    program = _dynamic_program(model, x[:4])
    result = engine.prune(program, options={"criterion": "index"},
                          indices={"fc1": [4, 5, 6, 7]})
    assert result.module.fc1.weight.shape == (4, 6)
    with torch.no_grad():
        want = model(x)
        assert (result.module(x) - want).norm() / want.norm() > 0.1  # pruning did hurt
        recovered = engine.recover(result, x.numpy(), "lsq")
        got = recovered.module(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
    # the refit matches the closed form W2' = W2[:, kept] + W2[:, removed] @ mix
    w2 = model.fc2.weight.detach().double()
    mix = torch.linalg.lstsq(model.fc1.weight[:4].double().T,
                             model.fc1.weight[4:].double().T).solution.T
    expected = w2[:, :4] + w2[:, 4:] @ mix
    assert torch.allclose(recovered.module.fc2.weight.double(), expected, rtol=1e-3, atol=1e-4)


def test_bias_restores_the_mean_of_a_layer_that_lost_inputs():
    """FLAP: with nothing upstream changed, the layer's mean output is the original's."""
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    x = torch.randn(400, 5, generator=gen)
    result = engine.prune(_dynamic_program(model, x[:4]), options={"criterion": "index"},
                          indices={"0": [1, 6]})
    recovered = engine.recover(result, x.numpy(), "bias", eval_holdout=0)
    with torch.no_grad():
        want = model(x)
        got = recovered.module(x)
        hidden = model[1](model[0](x))
    assert torch.allclose(got.mean(0), want.mean(0), atol=1e-5)
    # and equals the hand computation W[:, removed] @ mean(h[removed]) (a bias was added)
    removed = [1, 6]
    expected = model[2].weight[:, removed] @ hidden[:, removed].mean(0)
    added = dict(recovered.module.named_parameters())
    bias = next(v for k, v in added.items() if k.startswith("2.bias"))
    assert torch.allclose(bias, expected, atol=1e-5)


class _BatchNormRecorder(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.inputs = {}

    def run_node(self, n):
        if n.op == "call_function" and n.target == torch.ops.aten.batch_norm.default:
            self.inputs[n.args[3].target.rpartition(".")[0]] = self.env[n.args[0]]
        return super().run_node(n)


def test_bn_matches_a_hand_recomputation(pruned, calib):
    recovered = engine.recover(pruned, calib, "bn", eval_holdout=0)
    recorder = _BatchNormRecorder(recovered.module)
    with torch.no_grad():
        recorder.run(torch.from_numpy(calib["x"]))
    changed = recovered.report["recovery"]["layers"]["bn"]
    assert changed and "stem_bn" not in changed  # its input lost no channel upstream
    for name, x in recorder.inputs.items():
        bn_module = recovered.module.get_submodule(name)
        if name in changed:
            mean = x.double().mean(dim=(0, 2, 3))
            var = ((x.double() - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
            assert torch.allclose(bn_module.running_mean.double(), mean, atol=1e-5), name
            assert torch.allclose(bn_module.running_var.double(), var, rtol=1e-4), name
        else:
            assert torch.equal(bn_module.running_mean,
                               pruned.module.get_submodule(name).running_mean)


class _Recorder(torch.fx.Interpreter):
    """Records the inputs and output of every node calling `target`."""

    def __init__(self, gm, target):
        super().__init__(gm)
        self.target, self.calls = target, []

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target == self.target:
            self.calls.append((self.env[n.args[0]], out))
        return out


def test_norm_corrects_the_demo_layer_norm_statistics_on_held_out_data(pruned, calib,
                                                                       evaluation):
    """With the original activations reaching it, the recovered LayerNorm reproduces the
    original's output on the kept channels better than the pruned one, on the evaluation
    set (the statistics were measured on the calibration set)."""
    recovered = engine.recover(pruned, calib, "norm")
    assert recovered.report["recovery"]["layers"]["norm"] == ["attn_norm"]
    original = engine.load_model("demo").program.module()  # prune("demo") let its weights go
    recorder = _Recorder(original, torch.ops.aten.layer_norm.default)
    with torch.no_grad():
        recorder.run(torch.from_numpy(evaluation[0]))
    (pre, original_out), = recorder.calls
    group = next(g for g in pruned.report["groups"] if "attn_norm" in g["layers"] or
                 g["name"].startswith("stem_conv"))
    kept = torch.tensor(group["kept"])
    z = F.layer_norm(pre[..., kept], [len(kept)])
    target = original_out[..., kept]

    def error(module):
        norm_module = module.get_submodule("attn_norm")
        return float((z * norm_module.weight + norm_module.bias - target).norm() /
                     target.norm())

    # measured: 0.1452 -> 0.1407 (a per-channel affine cannot follow each token's own
    # change of statistics; the rest is per token)
    assert error(recovered.module) < 0.99 * error(pruned.module)


def test_recovered_model_saves_and_passes_the_onnx_check(data_light, tmp_path, evaluation):
    paths = engine.save(data_light, tmp_path)
    report = json.loads(paths["report.json"].read_text())
    assert report["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    assert report["recovery"]["methods"] == data_light.report["recovery"]["methods"]
    program = torch.export.load(paths["model.pt2"])
    x = torch.from_numpy(evaluation[0][:32])
    with torch.no_grad():  # the saved program is the recovered model, not the stale pruned one
        assert torch.allclose(program.module()(x), data_light.module(x), atol=1e-5)
    import onnxruntime as ort

    session = ort.InferenceSession(str(paths["model.onnx"]))
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(onnx_out - data_light.module(x).detach().numpy()).max() < 1e-4


def test_auto_runs_data_light_then_distill(pruned, calib):
    few = {"x": calib["x"][:300], "y": calib["y"][:300]}
    recovered = engine.recover(pruned, few, "auto", steps=3)
    info = recovered.report["recovery"]
    # every method measured in this order (distill last, on top of the data-light ones kept)
    assert list(info["per_method"]) == ["bias", "lsq", "bn", "norm", "distill"]
    assert info["methods"] == [m for m, v in info["per_method"].items() if v["kept"]]
    assert info["distill"]["steps"] == 3


def test_calibration_forms_and_built_in_name(calib):
    from engine.io.data import as_data

    for form in ("demo", ASSETS_DIR / "demo_calib.npz", calib,
                 type("EvalData", (), {"x": calib["x"], "y": calib["y"]})()):
        data = as_data(form)
        assert len(data.inputs) == 1 and np.array_equal(data.inputs[0], calib["x"])
        assert np.array_equal(data.labels, calib["y"])
    data = as_data({"x0": calib["x"][:3], "x1": calib["y"][:3]})
    assert len(data.inputs) == 2 and data.labels is None


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"methods": "bn,sharpen"}, "unknown recovery method 'sharpen'; allowed: bias, lsq, bn"),
    ({"methods": ""}, "no recovery method given"),
    ({"budget_s": -1}, "allowed: a positive number of seconds"),
    ({"budget_s": float("nan")}, "allowed: a positive number of seconds"),
    ({"steps": 0}, "allowed: a positive integer"),
    ({"steps": 2.5}, "allowed: a positive integer"),
    ({"calibration": np.zeros((4, 1, 7, 7), np.float32)}, "the model takes (N, 1, 8, 8)"),
    ({"calibration": np.zeros((4, 1, 8, 8), np.int64)}, "the model takes float32"),
    ({"calibration": {"z": np.zeros(3)}}, "has no array 'x'"),
])
def test_bad_input_is_one_line(pruned, calib, kwargs, text):
    args = {"calibration": calib, "methods": "bn", **kwargs}
    with pytest.raises(OptionError) as info:
        engine.recover(pruned, args.pop("calibration"), **args)
    message = str(info.value)
    assert "\n" not in message and text in message


def test_norm_and_lsq_on_a_llama_with_written_out_rms_norm():
    """transformers' Llama writes RMSNorm out (pow, mean, rsqrt, mul): `norm` finds it and
    rescales its weight by the hand-computed least-squares factor; `lsq` brings the logits
    closer to the original's on held-out tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    llama = LlamaForCausalLM(config).eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.llama = llama

        def forward(self, ids):
            return self.llama(input_ids=ids, use_cache=False).logits

    model = Logits().eval()
    gen = torch.Generator().manual_seed(0)
    calib, held = (torch.randint(0, 64, (n, 16), generator=gen) for n in (128, 64))
    result = engine.prune(_dynamic_program(model, calib[:4]), ratio=0.3)
    recovered = engine.recover(result, calib.numpy(), "norm", eval_holdout=0)
    name = "llama.model.layers.0.input_layernorm"
    assert name in recovered.report["recovery"]["layers"]["norm"]
    hidden = next(g for g in result.report["groups"] if g["name"].startswith("llama.model.embed"))
    kept = torch.tensor(hidden["kept"])
    assert 0 < len(kept) < 64
    with torch.no_grad():
        h = llama.model.embed_tokens(calib).double()
        eps = config.rms_norm_eps
        z_full = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))[..., kept]
        z_kept = h[..., kept] * torch.rsqrt(h[..., kept].pow(2).mean(-1, keepdim=True) + eps)
        factor = (z_kept * z_full).sum((0, 1)) / (z_kept * z_kept).sum((0, 1))
        expected = llama.model.layers[0].input_layernorm.weight[kept].double() * factor
    got = recovered.module.get_submodule(name).weight.double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    refitted = engine.recover(result, calib.numpy(), "lsq")
    with torch.no_grad():
        want = model(held)

        def error(m):
            return float((m(held) - want).norm() / want.norm())

        # measured: 0.65 -> 0.37 relative logits error (random weights)
        assert error(refitted.module) < 0.75 * error(result.module)
