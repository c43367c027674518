"""engine.io.export: atomic writes, .pt2 saving, ONNX conversion checked with ONNX Runtime."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.demo import demo_example_inputs, load_demo_eval, load_demo_program
from engine.errors import ExportError
from engine.io.export import (
    atomic_write,
    atomic_write_bytes,
    check_onnx,
    export_onnx,
    save_program,
    write_json,
)
from tests.helpers import unwritable_dir

TOLERANCE = 1e-4


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyTransformerBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        # A nested output, so check_onnx has to flatten it.
        return x, {"pooled": x.mean(dim=1)}


class Unconvertible(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x).S  # no ONNX translation exists for SVD


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics so a wrong BN export would show in the outputs."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_file_with_umask_mode(tmp_path: Path) -> None:
    target = tmp_path / "report.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.bin"]


def test_failing_writer_leaves_existing_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    original = os.urandom(4096)
    target.write_bytes(original)
    seen: list[Path] = []

    def half_write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer crashed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        atomic_write(target, half_write)
    assert target.read_bytes() == original
    assert seen and seen[0].parent == tmp_path and seen[0] != target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_writer_os_error_becomes_export_error(tmp_path: Path) -> None:
    target = tmp_path / "x.json"

    def disk_full(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(ExportError, match="No space left"):
        atomic_write(target, disk_full)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_raises_export_error_naming_path(tmp_path: Path) -> None:
    target = unwritable_dir(tmp_path) / "scores.json"
    with pytest.raises(ExportError) as info:
        write_json(target, {"a": 1})
    assert str(target) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("parent", ["missing/deeper", "a_file"])
def test_missing_or_bad_parent_raises_export_error(tmp_path: Path, parent: str) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    target = tmp_path / parent / "model.pt2"
    with pytest.raises(ExportError, match=str(target)):
        save_program(load_demo_program(), target)
    with pytest.raises(ExportError, match=str(target)):
        export_onnx(load_demo_program(), target)


def test_write_json_converts_numpy_and_refuses_nan(tmp_path: Path) -> None:
    target = tmp_path / "scores.json"
    data = {
        "n": np.int64(7),
        "score": np.float32(0.25),
        "kept": np.array([1, 2, 3], dtype=np.int32),
        "flag": np.bool_(True),
        "t": torch.tensor([0.5, 1.5]),
    }
    write_json(target, data)
    assert json.loads(target.read_text()) == {
        "n": 7,
        "score": 0.25,
        "kept": [1, 2, 3],
        "flag": True,
        "t": [0.5, 1.5],
    }
    before = target.read_bytes()
    with pytest.raises(ExportError, match="NaN"):
        write_json(target, {"score": float("nan")})
    with pytest.raises(ExportError, match="not JSON serialisable"):
        write_json(target, {"obj": object()})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


# ---------------------------------------------------------------- .pt2


def test_save_program_round_trips(tmp_path: Path) -> None:
    program = load_demo_program()
    target = save_program(program, tmp_path / "copy.pt2")
    (x,) = demo_example_inputs()
    loaded = torch.export.load(str(target))
    torch.testing.assert_close(loaded.module()(x), program.module()(x), rtol=0, atol=0)
    with pytest.raises(ExportError, match="ExportedProgram"):
        save_program(nn.Linear(2, 2), tmp_path / "bad.pt2")  # type: ignore[arg-type]
    assert not (tmp_path / "bad.pt2").exists()


# ---------------------------------------------------------------- ONNX


def test_conv_net_onnx_matches_torch(tmp_path: Path) -> None:
    model = _trained_like(SmallConvNet())
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    path = export_onnx(model, tmp_path / "conv.onnx", example_inputs=(x,))
    onnx.checker.check_model(str(path))
    assert check_onnx(path, model, (x,)) < TOLERANCE
    # The check is not vacuous: a model with different weights is far off.
    other = _trained_like(SmallConvNet())
    with torch.no_grad():
        other.fc.weight.add_(1.0)
    assert check_onnx(path, other, (x,)) > 1e-2


def test_transformer_block_with_sdpa_onnx_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyTransformerBlock().eval()
    x = torch.randn(2, 6, 16)
    path = export_onnx(model, tmp_path / "block.onnx", example_inputs=(x,))
    outputs = _ort_run(path, x.numpy())
    assert [o.shape for o in outputs] == [(2, 6, 16), (2, 16)]
    assert check_onnx(path, model, (x,)) < TOLERANCE


def test_nn_module_dynamic_batch_via_dynamic_shapes(tmp_path: Path) -> None:
    model = _trained_like(SmallConvNet())
    x = torch.randn(2, 3, 12, 12)
    batch = torch.export.Dim("batch", min=1, max=64)
    path = export_onnx(
        model, tmp_path / "conv.onnx", example_inputs=(x,), dynamic_shapes=({0: batch},)
    )
    x5 = torch.randn(5, 3, 12, 12)
    assert check_onnx(path, model, (x5,)) < TOLERANCE


def test_demo_program_exports_with_dynamic_batch(tmp_path: Path) -> None:
    program = load_demo_program()
    path = export_onnx(program, tmp_path / "demo.onnx")
    graph_input = onnx.load(str(path)).graph.input[0]
    batch_dim = graph_input.type.tensor_type.shape.dim[0]
    assert not batch_dim.HasField("dim_value")
    # torch.export calls the size s77; the graph (and Netron in the Graphs tab) says batch
    assert batch_dim.dim_param == "batch"
    graph_output = onnx.load(str(path)).graph.output[0]
    assert graph_output.type.tensor_type.shape.dim[0].dim_param == "batch"

    x, y = load_demo_eval()
    example = demo_example_inputs()[0]
    for n in (1, 37, len(x)):
        assert n != len(example)
        assert check_onnx(path, program, (torch.from_numpy(x[:n]),)) < TOLERANCE
    (logits,) = _ort_run(path, x)
    assert logits.shape == (len(x), 10)
    assert (logits.argmax(axis=1) == y).mean() >= 0.95


def test_unconvertible_model_gives_one_line_export_error(tmp_path: Path) -> None:
    target = tmp_path / "svd.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError) as info:
        export_onnx(Unconvertible().eval(), target, example_inputs=(torch.randn(2, 4, 4),))
    message = str(info.value)
    assert "\n" not in message and "svd" in message and str(target) in message
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svd.onnx"]


def test_bad_export_arguments(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset"):
        export_onnx(load_demo_program(), tmp_path / "m.onnx", opset=13)
    with pytest.raises(ExportError, match="example_inputs"):
        export_onnx(SmallConvNet().eval(), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="no such file"):
        check_onnx(tmp_path / "m.onnx", SmallConvNet().eval(), (torch.randn(1, 3, 8, 8),))
    assert list(tmp_path.iterdir()) == []


def test_check_onnx_rejects_wrong_inputs(tmp_path: Path) -> None:
    model = _trained_like(SmallConvNet())
    x = torch.randn(2, 3, 12, 12)
    path = export_onnx(model, tmp_path / "conv.onnx", example_inputs=(x,))
    with pytest.raises(ExportError, match="tensor inputs"):
        check_onnx(path, nn.Bilinear(4, 4, 1), (torch.randn(2, 4), torch.randn(2, 4)))
    with pytest.raises(ExportError, match="ONNX Runtime could not run"):
        check_onnx(path, nn.Identity(), (torch.randn(2, 5, 12, 12),))
