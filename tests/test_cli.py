"""The prunescope command line on the demo model: the JSON and files it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import torch

from engine.cli import main
from engine.demo import DEMO_EVAL_PATH, demo_example_inputs


def _run(capsys, *args) -> tuple[int, str, str]:
    args = [str(a) for a in args]
    if args[0] == "prune":  # the latency tests time models; these do not need to
        args.append("--no-latency")
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_scores_json_shape_and_consistency(capsys, tmp_path):
    rc, _, err = _run(capsys, "scores", "demo", "--layer-norm", "tss_norm", "--json",
                      tmp_path / "s.json")
    assert rc == 0, err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["options"]["layer_norm"] == "tss_norm"
    assert {"head"} <= {layer for f in data["frozen"] for layer in f["layers"]}
    for group in data["groups"]:
        n = group["channels"]
        assert len(group["scores"]) == n
        assert set(group["raw"]) == set(group["layers"]) == set(group["normalized"])
        for layer in group["layers"]:
            normalized = np.array(group["normalized"][layer])
            raw = np.array(group["raw"][layer])
            assert len(raw) == n
            np.testing.assert_allclose(normalized, raw / raw.sum(), rtol=1e-9)  # tss_norm
        # default policy average: the combined score is the mean of the members' normals
        mean = np.mean([group["normalized"][layer] for layer in group["layers"]], axis=0)
        np.testing.assert_allclose(group["scores"], mean, rtol=1e-9)


def test_nuclear_norm_reads_the_calibration_data(capsys, tmp_path):
    rc, out_l2, _ = _run(capsys, "scores", "demo")
    assert rc == 0
    rc, out_nn, err = _run(capsys, "scores", "demo", "--criterion", "nuclear_norm",
                           "--calibration", DEMO_EVAL_PATH)
    assert rc == 0, err
    l2, nn_ = json.loads(out_l2), json.loads(out_nn)
    first = nn_["groups"][0]["layers"][0]
    assert nn_["groups"][0]["raw"][first] != l2["groups"][0]["raw"][first]


def test_prune_writes_a_smaller_checked_model(capsys, tmp_path):
    rc, out, err = _run(capsys, "prune", "demo", "--ratio", "0.5", "--out", tmp_path)
    assert rc == 0, err
    assert "wrote" in out and "frozen: head" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ratio"] == 0.5
    assert report["after"]["params"] < report["before"]["params"]
    assert report["verification"]["output_shapes_match"]
    for group in report["groups"]:
        assert sorted(group["kept"] + group["pruned"]) == list(range(group["channels"]))
    (x,) = demo_example_inputs(16)
    torch_out = torch.export.load(tmp_path / "model.pt2").module()(x)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, torch_out.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_per_group_ratios_file(capsys, tmp_path):
    rc, out, _ = _run(capsys, "scores", "demo")
    names = [g["name"] for g in json.loads(out)["groups"]]
    ratios = {names[0]: 0.5}
    (tmp_path / "r.json").write_text(json.dumps(ratios))
    rc, _, err = _run(capsys, "prune", "demo", "--ratios", tmp_path / "r.json", "--out",
                      tmp_path / "o", "--no-onnx")
    assert rc == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["ratios"] == ratios
    pruned = {g["name"]: len(g["pruned"]) for g in report["groups"]}
    assert pruned[names[0]] > 0 and all(pruned[n] == 0 for n in names[1:])


def test_python_dash_m_engine_is_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "engine", "scores", "demo", "--policy", "nope"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("prunescope: error: option policy")


def test_trusted_graphmodule_pickle_is_captured_and_pruned(capsys, tmp_path):
    """The NetsPresso input format: a pickled torch.fx.GraphModule, with an input shape."""
    from tests.zoo import tiny

    model, (x,) = tiny()
    traced = torch.fx.symbolic_trace(model)
    torch.save(traced, tmp_path / "model.pt")
    rc, out, err = _run(capsys, "prune", tmp_path / "model.pt", "--trust-pickle",
                        "--input-shape", ",".join(map(str, x.shape)), "--ratio", "0.5",
                        "--out", tmp_path / "out", "--no-onnx")
    assert rc == 0, err
    assert "warning" in err and "pickle" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert report["verification"]["exact"]
    assert sorted(layer for g in report["groups"] for layer in g["layers"]) == ["a", "b"]
