"""Recovery on models captured with a fixed batch size (an nn.Module with its example inputs,
a transformers model that only exports with a fixed batch): the graph runs exactly B samples
at a time, so recovery feeds it chunks of B. Quality is measured here on held-out data, never
the calibration set; the chunked refit is checked against the same model captured with a
dynamic batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.errors import OptionError
from engine.graph.capture import capture_module
from engine.io.hf import example_inputs_for, source_of_model
from tests.helpers import cli

SIZE = 16  # input images are 3 x SIZE x SIZE


class _ConvNet(nn.Module):
    """conv-bn-relu-pool twice, then a linear layer on the flattened maps: the flatten
    bakes the batch size into a reshape when the batch is captured fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * (SIZE // 4) ** 2, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def net() -> _ConvNet:
    """Random weights; BatchNorm statistics those of the network's own activations, as
    training leaves them (stale statistics would make `bn` look better than it is)."""
    torch.manual_seed(0)
    model = _ConvNet()
    for bn in (model.b1, model.b2):
        bn.momentum = None  # a cumulative average: the statistics of this one batch
    with torch.no_grad():
        model.train()
        model(torch.randn(512, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, torch.Tensor]:
    """(calibration, held-out): disjoint random draws."""
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(63, 3, SIZE, SIZE, generator=gen)
    held = torch.randn(96, 3, SIZE, SIZE, generator=gen)
    return calib.numpy(), held


def _held_out_error(module, original: nn.Module, held: torch.Tensor, batch: int) -> float:
    """Relative error of the outputs against the original's, fed `batch` at a time (the
    held-out count is a multiple of both batch sizes used here)."""
    with torch.no_grad():
        want = original(held)
        got = torch.cat([module(held[i:i + batch]) for i in range(0, len(held), batch)])
    return float((got - want).norm() / want.norm())


def _dynamic(net: nn.Module):
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(net, (torch.randn(4, 3, SIZE, SIZE),),
                               dynamic_shapes=({0: batch},))


@pytest.mark.parametrize("batch", [1, 2])
def test_static_batch_conv_net_recovers_on_held_out_data(net, images, batch):
    calib, held = images
    pruned = engine.prune(net, (torch.randn(batch, 3, SIZE, SIZE),), ratio=0.5)
    with pytest.raises(Exception):  # noqa: B017 - the graph itself refuses another batch
        pruned.module(held[:batch + 1])
    recovered = engine.recover(pruned, calib, "bias,lsq,bn")
    info = recovered.report["recovery"]
    assert list(info["per_method"]) == ["bias", "lsq", "bn"]  # each measured, in this order
    assert info["methods"] == [m for m, v in info["per_method"].items() if v["kept"]]
    before = _held_out_error(pruned.module, net, held, batch)
    after = _held_out_error(recovered.module, net, held, batch)
    # the methods kept on 6 held-back samples also lower the error on 96 held-out ones
    assert after < 0.8 * before
    # 63 samples: 6 held back, 57 fit; at batch 2 the layer-wise pass leaves the last one out
    chunking = info["chunking"]
    assert chunking["captured_batch"] == batch
    assert info["calibration_samples"] == 57 and info["holdout_samples"] == 6
    assert chunking["layer_pass"] == {"samples": 57 - 57 % batch, "chunks": 57 // batch,
                                      "left_out": 57 % batch}


@pytest.mark.parametrize("batch", [1, 2])
def test_lsq_in_chunks_equals_lsq_on_a_dynamic_batch(net, images, batch):
    """The chunks joined are the whole set in one batch: the same least-squares refit as on
    the model captured with a dynamic batch, given the samples the chunks cover."""
    calib, _ = images
    static = engine.prune(net, (torch.randn(batch, 3, SIZE, SIZE),), ratio=0.5)
    dynamic = engine.prune(_dynamic(net), ratio=0.5)
    used = len(calib) - len(calib) % batch  # 63 samples: whole batches only
    a = engine.recover(static, calib, "lsq", eval_holdout=0).module.state_dict()
    b = engine.recover(dynamic, calib[:used], "lsq", eval_holdout=0).module.state_dict()
    before = dynamic.module.state_dict()
    assert a.keys() == b.keys()
    assert not torch.allclose(b["fc.weight"], before["fc.weight"])  # lsq did refit
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def test_too_few_samples_for_the_batch_is_one_line(net, images):
    pruned = engine.prune(net, (torch.randn(2, 3, SIZE, SIZE),), ratio=0.5)
    with pytest.raises(OptionError) as info:
        engine.recover(pruned, images[0][:1], "lsq")
    message = str(info.value)
    assert "\n" not in message
    assert "holds 1 sample(s)" in message and "fixed batch of 2" in message
    assert "x of shape (N>=2, 3, 16, 16)" in message


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    """Captured the way a transformers model that only exports with a fixed batch is."""
    model = _llama()
    inputs, names = example_inputs_for(model, None, 8)
    captured = capture_module(model, inputs, "llama", names, dynamic=False)
    captured.hf = source_of_model(model, names)
    return model, engine.prune(captured, None, ratio=0.5)


def _logits(module, ids: torch.Tensor) -> torch.Tensor:
    """The captured graph's first output (the logits), one sequence at a time."""
    rows = []
    with torch.no_grad():
        for row in ids.split(1):
            out = module(row, torch.ones_like(row))
            rows.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(rows)


def test_transformers_llama_captured_at_batch_one_recovers(llama):
    model, pruned = llama
    gen = torch.Generator().manual_seed(3)
    calib = torch.randint(0, 100, (40, 8), generator=gen)
    held = torch.randint(0, 100, (24, 8), generator=gen)
    # random weights and random tokens: perplexity (the default for a causal LM) means
    # nothing here, the relative error of the logits against the original's does
    recovered = engine.recover(pruned, {"x": calib.numpy()}, ["norm", "lsq", "distill"],
                               steps=5, metric="relative_error")
    info = recovered.report["recovery"]
    # each method measured on the held-back samples on top of the ones kept before it
    assert set(info["per_method"]) == {"lsq", "norm", "distill"}
    assert info["methods"][0] == "lsq"
    for verdict in info["per_method"].values():
        assert verdict["kept"] == (verdict["after"] < verdict["before"])
    assert "model.layers.0.mlp.down_proj" in info["layers"]["lsq"]
    assert info["distill"]["steps"] == 5 and info["distill"]["minibatch"] == 36
    assert info["filled_inputs"] == ["attention_mask"]
    chunking = info["chunking"]
    assert chunking["captured_batch"] == 1 and "1 sample(s) at a time" in chunking["note"]
    assert chunking["layer_pass"] == {"samples": 36, "chunks": 36, "left_out": 0}
    with torch.no_grad():
        want = model(input_ids=held, use_cache=False).logits

    def error(module) -> float:
        return float((_logits(module, held) - want).norm() / want.norm())

    # lsq's refit lowers the relative logits error on the held-out sequences (norm and 5
    # distillation steps do not lower it further on the held-back samples: dropped)
    assert error(recovered.module) < 0.92 * error(pruned.module)


def test_transformers_llama_wrong_sequence_length_is_one_line(llama):
    _, pruned = llama
    with pytest.raises(OptionError) as info:
        engine.recover(pruned, {"x": np.zeros((16, 16), np.int64)}, "lsq")
    message = str(info.value)
    assert "\n" not in message
    assert "x has shape (16, 16); the model takes (N, 8)" in message
    assert "fixed batch of 1" in message


def test_cli_prune_of_a_transformers_folder_recovers(capfd, tmp_path):
    _llama().save_pretrained(tmp_path / "llama")
    ids = np.random.default_rng(0).integers(0, 100, (24, 8))
    np.savez(tmp_path / "x.npz", x=ids)
    common = ["prune", tmp_path / "llama", "--ratio", "0.5", "--seq-len", "8", "--recover",
              "auto", "--recover-steps", "5", "--no-onnx"]
    rc, out, err = cli(capfd, *common, "--calibration", tmp_path / "x.npz",
                       "--out", tmp_path / "o")
    assert rc == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    recovery = report["recovery"]
    assert {"lsq", "norm", "distill"} <= set(recovery["per_method"])
    assert recovery["calibration_samples"] + recovery["holdout_samples"] == 24
    program = torch.export.load(tmp_path / "o" / "model.pt2")
    row = torch.from_numpy(ids[:1])
    with torch.no_grad():
        out_pt2 = program.module()(row, torch.ones_like(row))
    logits = out_pt2[0] if isinstance(out_pt2, (tuple, list)) else out_pt2
    assert logits.shape == (1, 8, 100) and torch.isfinite(logits).all()


