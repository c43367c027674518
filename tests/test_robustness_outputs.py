"""Robustness: results are written all or nothing. An unwritable or full output folder gives
one line and leaves earlier results as they were; ratio 0 reproduces the original exactly."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
from tests.helpers import cli, one_error_line, unwritable_dir
from tests.zoo import ZOO, build

REPO = Path(__file__).resolve().parent.parent
RESULT_FILES = ("model.pt2", "model.onnx", "report.json")


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of a folder (hidden ones included) with a hash of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(folder.iterdir())
    }




@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tiny_pt2: Path) -> tuple[Path, dict[str, str]]:
    """A folder holding a complete earlier result (with ONNX) and its snapshot."""
    folder = tmp_path_factory.mktemp("earlier")
    engine.save(engine.prune(tiny_pt2, None, None, ratio=0.5), folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(RESULT_FILES)
    return folder, snapshot(folder)


def copy_of(earlier: tuple[Path, dict[str, str]], dst: Path) -> Path:
    dst.mkdir()
    for p in earlier[0].iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    assert snapshot(dst) == earlier[1]
    return dst


# ----------------------------------------------------------- unwritable output folder


@pytest.mark.parametrize("kind", ["is_a_file", "under_a_file", "unwritable"])
def test_unwritable_output_folder(capfd, tmp_path: Path, tiny_pt2: Path, kind: str) -> None:
    (tmp_path / "a_file").write_text("keep me")
    out = {
        "is_a_file": tmp_path / "a_file",
        "under_a_file": tmp_path / "a_file" / "out",
        "unwritable": unwritable_dir(tmp_path) / "out",
    }[kind]
    before = snapshot(tmp_path)
    result = engine.prune(tiny_pt2, None, None, ratio=0.5)
    with pytest.raises(engine.ExportError, match="cannot write") as info:
        engine.save(result, out, onnx=False)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    rc, _, err = cli(capfd, "prune", tiny_pt2, "--ratio", "0.5", "--out", out, "--no-onnx")
    assert rc == 2 and str(out) in one_error_line(err)
    assert snapshot(tmp_path) == before
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["missing_folder", "is_a_folder", "unwritable"])
def test_unwritable_scores_json(capfd, tmp_path: Path, tiny_pt2: Path, kind: str) -> None:
    (tmp_path / "folder").mkdir()
    target = {
        "missing_folder": tmp_path / "nowhere" / "scores.json",
        "is_a_folder": tmp_path / "folder",
        "unwritable": unwritable_dir(tmp_path) / "scores.json",
    }[kind]
    before = snapshot(tmp_path)
    rc, out, err = cli(capfd, "scores", tiny_pt2, "--json", target)
    assert rc == 2 and out == ""
    assert str(target) in one_error_line(err)
    assert snapshot(tmp_path) == before


def test_failed_scores_run_keeps_the_earlier_json(capfd, tmp_path: Path, tiny_pt2: Path) -> None:
    target = tmp_path / "scores.json"
    assert cli(capfd, "scores", tiny_pt2, "--json", target)[0] == 0
    first = target.read_bytes()
    assert json.loads(first)["groups"]
    rc, _, _ = cli(capfd, "scores", tiny_pt2, "--json", target, "--criterion", "nuclear_norm")
    assert rc == 2  # nuclear_norm without calibration data
    assert target.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


# ----------------------------------------------------------------- full disk


def _file_size_limit() -> None:
    """In the child: writes beyond 16 KiB fail with EFBIG, as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory, earlier, tiny_pt2: Path):
    """The CLI pruning into a folder with earlier results while the disk is full."""
    out = copy_of(earlier, tmp_path_factory.mktemp("full") / "out")
    assert (out / "model.pt2").stat().st_size > 16 * 1024  # so writing it must fail
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "prune", str(tiny_pt2), "--ratio", "0.25",
         "--no-latency", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=_file_size_limit,
    )
    return proc, out


def test_full_disk_leaves_earlier_results_in_place(full_disk_run, earlier) -> None:
    proc, out = full_disk_run
    assert proc.returncode != 0
    assert snapshot(out) == earlier[1]  # same files, same bytes, no staging folder left


def test_full_disk_is_a_one_line_error(full_disk_run) -> None:
    proc, out = full_disk_run
    assert proc.returncode == 2
    assert str(out) in one_error_line(proc.stderr)


# ------------------------------------------------------------------ atomic results


def test_failed_commit_leaves_earlier_results(tmp_path: Path, earlier, tiny_pt2: Path) -> None:
    out = copy_of(earlier, tmp_path / "out")
    (out / "report.json").unlink()
    (out / "report.json").mkdir()  # the last file cannot be moved into place
    (out / "report.json" / "keep").write_text("x")
    before = snapshot(out)
    result = engine.prune(tiny_pt2, None, None, ratio=0.25)
    with pytest.raises(engine.ExportError):
        engine.save(result, out)
    assert snapshot(out) == before


def test_no_onnx_run_does_not_leave_a_stale_onnx(tmp_path: Path, earlier, tiny_pt2: Path) -> None:
    out = copy_of(earlier, tmp_path / "out")
    result = engine.prune(tiny_pt2, None, None, ratio=0.0)
    engine.save(result, out, onnx=False)
    report = json.loads((out / "report.json").read_text())
    assert report["after"] == report["before"]  # the new result is the unpruned model
    if (out / "model.onnx").exists():
        session = ort.InferenceSession(str(out / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        x = result.example_inputs[0].numpy()
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            want = result.module(result.example_inputs[0]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_successful_save_is_complete(earlier) -> None:
    folder, _ = earlier
    report = json.loads((folder / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert report["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    program = torch.export.load(folder / "model.pt2")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = program.module()(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------ ratio 0


@pytest.mark.parametrize("name", sorted(ZOO))
def test_ratio_zero_reproduces_the_original_exactly(name: str) -> None:
    model, inputs = build(name)
    result = engine.prune(model, inputs, None, ratio=0.0)
    assert all(len(g["pruned"]) == 0 for g in result.report["groups"])
    assert result.after == result.before
    with torch.no_grad():
        assert torch.equal(result.module(*inputs), model(*inputs))
    original = dict(model.state_dict())
    for key, value in result.module.state_dict().items():
        assert torch.equal(value, original[key]), key


class OddChannels(nn.Module):
    """5 and 7 channels: any step alignment at ratio 0 would have to remove some."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(5, 7, 3, padding=1)
        self.c = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x))))).flatten(1)


@pytest.mark.parametrize("step", [("round", 2), ("round_up", 4), ("round_down", 4),
                                  ("round_down", 3)])
@pytest.mark.parametrize("how", [{"ratio": 0.0}, {"ratios": {"a": 0.0, "b": 0.0}}],
                         ids=["global", "per_group"])
def test_ratio_zero_never_aligns_channels_away(step, how) -> None:
    torch.manual_seed(0)
    model, x = OddChannels().eval(), torch.randn(2, 3, 4, 4)
    result = engine.prune(model, (x,), {"step_op": step[0], "step_size": step[1]}, **how)
    assert {g["name"]: len(g["kept"]) for g in result.report["groups"]} == {"a": 5, "b": 7}
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def test_ratio_zero_onnx_matches_the_original(tmp_path: Path) -> None:
    model, inputs = build("conv_bn_residual")
    engine.save(engine.prune(model, inputs, None, ratio=0.0), tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})[0]
    with torch.no_grad():
        want = model(*inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert os.path.getsize(tmp_path / "model.pt2") > 0
