"""The ONNX step of `save`/`prunescope prune`: weights beyond the inline limit go to
model.onnx.data (ONNX external data), and an ONNX failure keeps model.pt2 and report.json,
names the failure and exits with status 3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import engine
from engine.cli import EXIT_ONNX_FAILED
from engine.io.export import EXTERNAL_BYTES_ENV, export_onnx
from tests.helpers import cli


class SvdHead(nn.Module):
    """Prunable MLP whose output goes through SVD, which has no ONNX translation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(x)))
        return torch.linalg.svd(y.reshape(-1, 4, 4)).S


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_onnx_failure_keeps_pt2_and_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    result = engine.prune(SvdHead().eval(), (x,), ratio=0.5)
    assert result.after["params"] < result.before["params"]
    out = tmp_path / "out"
    out.mkdir()
    # an older ONNX export (of another model) must not survive next to the new model.pt2
    (out / "model.onnx").write_bytes(b"older model")
    (out / "model.onnx.data").write_bytes(b"older weights")
    with pytest.raises(engine.OnnxExportError) as info:
        engine.save(result, out)
    message = str(info.value)
    assert "\n" not in message and "svd" in message.lower()
    assert sorted(p.name for p in out.iterdir()) == ["model.pt2", "report.json"]
    assert set(info.value.paths) == {"model.pt2", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert "svd" in report["onnx"]["error"].lower()
    assert report["after"]["params"] == result.after["params"]
    loaded = torch.export.load(out / "model.pt2").module()
    torch.testing.assert_close(loaded(x), result.module(x))


def test_cli_exit_status_3_when_onnx_fails(tmp_path: Path, capfd) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    path = tmp_path / "svd.pt2"
    torch.export.save(torch.export.export(SvdHead().eval(), (x,)), path)
    rc, out, err = cli(capfd, "prune", path, "--ratio", "0.5", "--out", tmp_path / "o")
    assert rc == EXIT_ONNX_FAILED == 3
    errors = [ln for ln in err.splitlines() if ln.startswith("prunescope: error: ")]
    assert len(errors) == 1 and "ONNX export failed" in errors[0] and "svd" in errors[0].lower()
    assert "Traceback" not in err
    assert f"wrote {tmp_path / 'o' / 'model.pt2'}" in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.pt2", "report.json"]
    assert "error" in json.loads((tmp_path / "o" / "report.json").read_text())["onnx"]


def test_weights_above_threshold_go_to_external_data(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    result = engine.prune(Mlp().eval(), (x,), ratio=0.5)
    weights = sum(p.numel() * p.element_size() for p in result.module.parameters())
    monkeypatch.setenv(EXTERNAL_BYTES_ENV, str(weights - 1))
    out = tmp_path / "out"
    paths = engine.save(result, out)
    assert set(paths) == {"model.pt2", "model.onnx", "model.onnx.data", "report.json"}
    assert sorted(p.name for p in out.iterdir()) == [
        "model.onnx", "model.onnx.data", "model.pt2", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["external_data"] == "model.onnx.data"
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    big = [t for t in graph.initializer if t.name.endswith("weight")]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert all(entry.value == "model.onnx.data" for t in big for entry in t.external_data
               if entry.key == "location")
    matrices = sum(p.numel() * p.element_size() for n, p in result.module.named_parameters()
                   if n.endswith("weight"))
    assert (out / "model.onnx.data").stat().st_size >= matrices
    np.testing.assert_allclose(_ort(out / "model.onnx", x), result.module(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)

    # back under the threshold: one self-contained file, the old data file retired
    monkeypatch.setenv(EXTERNAL_BYTES_ENV, str(weights))
    engine.save(result, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt2", "report.json"]
    assert "external_data" not in json.loads((out / "report.json").read_text())["onnx"]
    np.testing.assert_allclose(_ort(out / "model.onnx", x), result.module(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_export_onnx_with_external_data_leaves_no_temporaries(tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setenv(EXTERNAL_BYTES_ENV, "0")
    model, x = Mlp().eval(), torch.randn(2, 16)
    export_onnx(model, tmp_path / "m.onnx", example_inputs=(x,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_allclose(_ort(tmp_path / "m.onnx", x), model(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- on demand


def test_onnx_added_later_matches_the_pruned_model_and_joins_the_report(tmp_path: Path) -> None:
    """save(onnx=False) then save_onnx: the folder ends as `save` with ONNX writes it."""
    torch.manual_seed(0)
    result = engine.prune(Mlp().eval(), (torch.randn(3, 16),), ratio=0.5)
    x = torch.randn(3, 16)  # not the inputs the check ran on
    out = tmp_path / "out"
    engine.save(result, out, onnx=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.pt2", "report.json"]
    assert "onnx" not in json.loads((out / "report.json").read_text())
    pt2 = (out / "model.pt2").read_bytes()
    paths = engine.save_onnx(result, out)
    assert set(paths) == {"model.onnx", "report.json"}
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt2", "report.json"]
    assert (out / "model.pt2").read_bytes() == pt2
    # the file is the pruned model: ONNX Runtime on inputs it was not checked on
    np.testing.assert_allclose(_ort(out / "model.onnx", x), result.module(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    assert report["after"]["params"] == result.after["params"]
    assert report == json.loads(json.dumps(result.report))


def test_onnx_added_later_that_fails_leaves_no_onnx_and_says_why(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = engine.prune(SvdHead().eval(), (torch.randn(3, 16),), ratio=0.5)
    out = tmp_path / "out"
    engine.save(result, out, onnx=False)
    with pytest.raises(engine.OnnxExportError) as info:
        engine.save_onnx(result, out)
    assert "\n" not in str(info.value) and "svd" in str(info.value).lower()
    assert sorted(p.name for p in out.iterdir()) == ["model.pt2", "report.json"]
    assert "svd" in json.loads((out / "report.json").read_text())["onnx"]["error"].lower()
