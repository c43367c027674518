"""The shipped demo model and its training script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import engine.demo as demo_module
from engine.demo import (
    ASSETS_DIR,
    DEMO_CALIB_PATH,
    DEMO_EVAL_PATH,
    DEMO_PATH,
    demo_example_inputs,
    load_demo_eval,
    load_demo_program,
)

MIN_ACCURACY = 0.95


def _accuracy(program: torch.export.ExportedProgram, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(x))
    assert logits.shape == (len(x), 10)
    return float((logits.argmax(dim=1).numpy() == y).mean())


def test_shipped_assets_are_small() -> None:
    total = sum(p.stat().st_size for p in (DEMO_PATH, DEMO_EVAL_PATH))
    assert total < 1_000_000


def test_shipped_demo_reaches_accuracy_on_eval_set() -> None:
    x, y = load_demo_eval()
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
    assert y.dtype == np.int64 and y.shape == (len(x),)
    assert _accuracy(load_demo_program(), x, y) >= MIN_ACCURACY


def test_eval_set_is_the_held_out_quarter() -> None:
    x, y = load_demo_eval()
    n_all = len(load_digits().target)
    # A stratified 25% hold-out of 1797 digits: 450 images, every class present.
    assert 400 <= len(x) <= 500 < n_all - len(x)
    assert set(np.unique(y).tolist()) == set(range(10))
    assert np.bincount(y).min() >= 40


def test_demo_batch_dimension_is_dynamic() -> None:
    program = load_demo_program()
    module = program.module()
    x, _ = load_demo_eval()
    example = demo_example_inputs()[0]
    assert torch.equal(example, torch.from_numpy(x[: len(example)]))
    with torch.no_grad():
        one = module(torch.from_numpy(x[:1]))
        many = module(torch.from_numpy(x[:37]))
    assert one.shape == (1, 10) and many.shape == (37, 10)
    torch.testing.assert_close(one[0], many[0], rtol=1e-4, atol=1e-5)


def test_demo_contains_every_prunable_structure() -> None:
    program = load_demo_program()
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    convs = [n for n in program.graph.nodes if str(n.target) == "aten.conv2d.default"]
    groups = {n.args[6] if len(n.args) > 6 else 1 for n in convs}
    assert {1, 4}.issubset(groups)  # plain and grouped (groups=4) convolutions
    assert max(groups) == program.state_dict["block2.dwconv.weight"].shape[0]  # depthwise
    assert "aten.scaled_dot_product_attention.default" in targets
    assert "aten.view.default" in targets and "aten.layer_norm.default" in targets
    assert targets.count("aten.add.Tensor") >= 3  # two residual blocks and the attention add
    n_params = sum(p.numel() for p in program.parameters())
    assert 20_000 <= n_params <= 80_000


SHORT_EPOCHS = 5  # the shipped recipe trains 30 (assets/demo_meta.json); 5 reach 0.97


@pytest.mark.slow
def test_training_script_reproduces_the_demo(tmp_path: Path) -> None:
    """The shipped script, run as shipped but for fewer epochs: the same split, the same
    network (every weight name and shape of the shipped demo.pt2) and a held-out accuracy
    above the bar. Run in this process (a fresh Python and torch import cost more than the
    training); the script's global torch settings are put back afterwards."""
    spec = importlib.util.spec_from_file_location("train_demo", ASSETS_DIR / "train_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        # one torch thread: `make test` runs three workers on two cores
        rc = script.main(["--out", str(tmp_path), "--threads", "1",
                          "--epochs", str(SHORT_EPOCHS)])
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    assert rc == 0
    with np.load(tmp_path / "demo_eval.npz") as data:
        x, y = data["x"], data["y"]
    shipped_x, shipped_y = load_demo_eval()
    # Same seed, same split: the fresh run evaluates on exactly the shipped eval set.
    np.testing.assert_array_equal(x, shipped_x)
    np.testing.assert_array_equal(y, shipped_y)
    with np.load(tmp_path / "demo_calib.npz") as fresh, np.load(DEMO_CALIB_PATH) as shipped:
        np.testing.assert_array_equal(fresh["x"], shipped["x"])
        np.testing.assert_array_equal(fresh["y"], shipped["y"])
    fresh = torch.export.load(str(tmp_path / "demo.pt2"))
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict.items()}
    assert shapes == {k: tuple(v.shape) for k, v in load_demo_program().state_dict.items()}
    meta = json.loads((tmp_path / "demo_meta.json").read_text())
    shipped_meta = json.loads((ASSETS_DIR / "demo_meta.json").read_text())
    assert meta["parameters"] == shipped_meta["parameters"]
    assert meta["epochs"] == SHORT_EPOCHS and meta["accuracy"] >= MIN_ACCURACY
    assert _accuracy(fresh, x, y) >= MIN_ACCURACY


# ----------------------------------------------------------------------------- loaded once


def test_a_builtin_is_read_once_per_process_and_every_caller_gets_its_own_copy(monkeypatch):
    reads: list[str] = []
    real_load = torch.export.load

    def counting_load(path, *args, **kwargs):
        reads.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch.export, "load", counting_load)
    monkeypatch.setattr(demo_module, "_LOADED", {})
    x = demo_example_inputs()
    first = demo_module.load_builtin_program("demo")
    second = demo_module.load_builtin_program("demo")
    assert reads == [str(DEMO_PATH)]
    shipped = real_load(str(DEMO_PATH))
    with torch.no_grad():
        want = shipped.module()(*x)
        torch.testing.assert_close(second.module()(*x), want, rtol=0, atol=0)
        # one caller zeroing its weights and rewriting its graph reaches no other caller
        for value in first.state_dict.values():
            value.data.zero_()
        output = next(n for n in first.graph.nodes if n.op == "output")
        first.graph.erase_node(output)
        third = demo_module.load_builtin_program("demo")
        torch.testing.assert_close(third.module()(*x), want, rtol=0, atol=0)
        torch.testing.assert_close(second.module()(*x), want, rtol=0, atol=0)
    assert reads == [str(DEMO_PATH)]


def test_a_rebuilt_builtin_is_read_again(monkeypatch, tmp_path):
    """`make demo` rewrites the asset under a running dashboard: the next load sees it."""
    path = tmp_path / "demo.pt2"
    path.write_bytes(DEMO_PATH.read_bytes())
    monkeypatch.setitem(demo_module.BUILTINS, "demo",
                        (path, DEMO_CALIB_PATH, DEMO_EVAL_PATH, "demo"))
    monkeypatch.setattr(demo_module, "_LOADED", {})
    x = demo_example_inputs()
    before = demo_module.load_builtin_program("demo")
    rebuilt = torch.export.load(str(DEMO_PATH))
    for value in rebuilt.state_dict.values():
        if value.is_floating_point():
            value.data.mul_(0.5)
    torch.export.save(rebuilt, str(path))
    after = demo_module.load_builtin_program("demo")
    with torch.no_grad():
        torch.testing.assert_close(after.module()(*x), rebuilt.module()(*x), rtol=0, atol=0)
        assert not torch.equal(after.module()(*x), before.module()(*x))
