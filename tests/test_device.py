"""--device / device= (engine/device.py): one resolution function, a one-line error for a
device this machine lacks, and every forward of every stage on the resolved device.

No GPU here: the runs that must follow the device use the `meta` device, which holds no
data. A tensor left on the CPU would either run there (seen by the recorder) or meet a meta
tensor and fail with "not on the expected device"; the stage stops only where it needs
numbers (a verification difference, a score), after its forwards ran on meta."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import engine
from engine.device import DeviceError, on_device, resolve_device, to_device, using
from tests.helpers import cli, one_error_line

META = torch.device("meta")
COMPUTE = {"convolution", "linear", "addmm", "mm", "bmm", "scaled_dot_product_attention"}


class ComputeOps(TorchDispatchMode):
    """Records the device and dtype of every tensor that a matrix product or convolution
    receives."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[str] = []
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in COMPUTE:
            for t in tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor):
                    self.devices.append(t.device.type)
                    self.dtypes.add(t.dtype)
        return func(*args, **(kwargs or {}))


def _count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_cpu_and_auto_resolve_and_a_missing_gpu_is_one_clear_error() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    expected = "cuda" if _count() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    with pytest.raises(DeviceError, match=r"--device cuda:\d+: .*allowed: cpu, cuda, cuda:N"):
        resolve_device(f"cuda:{_count() + 1}")
    with pytest.raises(DeviceError, match="'tpu0' is not a device"):
        resolve_device("tpu0")
    assert engine.available_devices()[0] == "cpu"


def test_cli_names_the_missing_device_in_one_line_and_writes_nothing(capfd,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "prune", "demo", "--ratio", "0.5", "--device",
                     f"cuda:{_count() + 1}", "--out", out)
    assert rc == 2
    assert "--device cuda:" in one_error_line(err)
    assert not out.exists()
    rc, _, err = cli(capfd, "evaluate", "demo", "--data", "demo", "--amp", "fp8")
    assert rc == 2 and "--amp 'fp8' is not allowed; allowed: bf16, fp16" in one_error_line(err)


def test_cpu_and_auto_prune_the_same_and_report_the_device() -> None:
    a = engine.prune("demo", ratio=0.5, device="cpu")
    b = engine.prune("demo", ratio=0.5, device="auto")
    assert a.report["device"] == "cpu"
    assert b.report["device"] == str(resolve_device("auto"))
    assert a.report["groups"] == b.report["groups"]
    assert a.report["verification"]["max_abs_diff_vs_masked"] == pytest.approx(
        b.report["verification"]["max_abs_diff_vs_masked"], rel=1e-4, abs=1e-5)


def _tiny_llama():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            use_cache=False)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval(), (torch.randint(0, 100, (1, 12)),)


def test_a_captured_graph_runs_wholly_on_the_device_it_is_moved_to() -> None:
    """The capture records the CPU in arange/to ops (rotary embedding, causal mask):
    on_device must point those at the device too, not only move the weights."""
    model, inputs = _tiny_llama()
    gm = engine.analyze(model, inputs).gm
    assert on_device(gm, torch.device("cpu")) is gm  # nothing copied for the CPU
    moved = on_device(gm, META)
    rec = ComputeOps()
    with rec:
        out = moved(*to_device(inputs, META))
    assert {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)} == {"meta"}
    assert rec.devices and set(rec.devices) == {"meta"}
    assert all(p.device.type == "cpu" for p in gm.parameters())  # the original stays


def _stages(analysis):
    """Each stage that runs the model, called with device=meta."""
    data = engine.load_eval_data("demo").head(64)
    pruned = engine.prune(analysis, ratio=0.5)  # on the CPU: recovery's input
    return {
        "verification": lambda: engine.prune(analysis, ratio=0.5, device=META),
        "data-aware scoring": lambda: engine.plan(analysis, {"criterion": "wanda"}, ratio=0.5,
                                                  calibration="demo", device=META),
        "taylor gradients": lambda: engine.plan(analysis, {"criterion": "taylor"}, ratio=0.5,
                                                calibration="demo", device=META),
        "evaluation": lambda: engine.evaluate(pruned, data, device=META),
        "recovery": lambda: engine.recover(pruned, "demo", "bias,distill", steps=1,
                                           device=META),
    }


@pytest.mark.parametrize("stage", ["verification", "data-aware scoring", "taylor gradients",
                                   "evaluation", "recovery"])
def test_every_stage_runs_its_forwards_on_the_given_device(stage) -> None:
    run = _stages(engine.analyze("demo"))[stage]  # fresh: no scores cached from another run
    rec = ComputeOps()
    with rec, pytest.raises((RuntimeError, NotImplementedError, engine.PruneScopeError),
                            match="meta"):
        run()  # stops where the stage needs numbers, after its forwards
    assert rec.devices, f"{stage}: no convolution ran"
    assert set(rec.devices) == {"meta"}, f"{stage}: ran on {set(rec.devices)}"


def test_amp_runs_calibration_in_autocast_and_keeps_the_ranking_close() -> None:
    analysis = engine.analyze("demo")
    rec = ComputeOps()
    with rec:
        full = engine.plan(analysis, {"criterion": "activation"}, ratio=0.5,
                           calibration="demo")
    assert rec.dtypes == {torch.float32}
    analysis = engine.analyze("demo")
    rec = ComputeOps()
    with rec:
        half = engine.plan(analysis, {"criterion": "activation"}, ratio=0.5,
                           calibration="demo", amp="bf16")
    assert torch.bfloat16 in rec.dtypes
    for a, b in zip(full.groups, half.groups):
        assert a.name == b.name
        assert np.corrcoef(a.scores, b.scores)[0, 1] > 0.99
    with using("cpu", "bf16"):  # nested calls keep the device and amp in force
        assert str(resolve_device(None)) == "cpu"


def test_dashboard_offers_a_device_only_when_there_is_a_choice() -> None:
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
    at = AppTest.from_file(app, default_timeout=240).run()
    assert not at.exception
    keys = [s.key for s in at.sidebar.selectbox]
    assert ("device" in keys) == (len(engine.available_devices()) > 1), keys
    assert "opt_criterion" in keys  # the sidebar was drawn


def test_sweep_points_run_on_the_jobs_device_and_a_missing_one_fails_first() -> None:
    import dataclasses

    from engine.quality.sweep import prepare
    from engine.quality.sweep_job import run_point

    data = engine.load_eval_data("demo").head(64)
    with pytest.raises(DeviceError, match="--device cuda:"):
        engine.sweep("demo", None, "0.3", eval_data=data, device=f"cuda:{_count() + 1}")
    prepared = prepare("demo", eval_data=data, ship=False)
    job = dataclasses.replace(prepared.job, device=META)  # what each worker receives
    rec = ComputeOps()
    with rec, pytest.raises((RuntimeError, NotImplementedError, engine.PruneScopeError),
                            match="meta"):
        run_point(job, {"options": engine.PruningOptions().to_dict(), "ratio": 0.3})
    assert rec.devices and set(rec.devices) == {"meta"}
