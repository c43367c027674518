"""Sweeps over options x ratios: grid expansion, one-line errors, points equal to prune runs,
identical results from every executor (serial, process pool, a real local Ray), interrupts."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.demo import load_demo_eval
from engine.errors import OptionError
from engine.options import CRITERIA, GROUP_POLICIES, LAYER_NORMS, POLICIES
from engine.quality import executors
from engine.quality.sweep import axis_values, expand_grid, parse_ratios, sweep
from engine.quality.sweep_job import ModelSource
from tests.helpers import cli, one_error_line

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"


def _accuracy(module, x, y) -> float:
    """An independent evaluation: the pruned module's top-1 on the held-out digits."""
    with torch.no_grad():
        logits = module(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


def _without_seconds(report: dict) -> list[dict]:
    """The points without what differs by executor: time and where each ran."""
    where = ("seconds", "pid", "ray_task_id")
    return [{k: v for k, v in p.items() if k not in where} for p in report["points"]]


# ----------------------------------------------------------------------- the grid
def test_all_expands_to_every_allowed_value():
    assert axis_values("layer_norm", "all") == list(LAYER_NORMS)
    assert axis_values("policy", "all") == list(POLICIES)
    assert axis_values("group_policy", "all") == list(GROUP_POLICIES)
    assert axis_values("reshape_channel_axis", "all") == [0, 1, -1, -2]
    # index names filters by hand: it has no ranking for a ratio to cut
    assert axis_values("criterion", "all") == [c for c in CRITERIA if c != "index"]


def test_grid_is_the_product_of_the_axes_last_fastest():
    grid = expand_grid({"policy": "sum,backward", "layer_norm": ["tss_norm", "none"],
                        "step_size": 4})
    assert [(o.policy, o.layer_norm) for o in grid] == [
        ("sum", "tss_norm"), ("sum", "none"), ("backward", "tss_norm"), ("backward", "none")]
    assert {o.step_size for o in grid} == {4}
    assert [o.reshape_channel_axis for o in expand_grid({"reshape_channel_axis": "-2,1"})] \
        == [-2, 1]


@pytest.mark.parametrize("value", ["foo", "tss_norm,", "all,none"])
def test_bad_axis_values_are_refused(value):
    with pytest.raises(OptionError, match="--layer-norm"):
        axis_values("layer_norm", value)


@pytest.mark.parametrize("value", ["", ",", []])
def test_an_empty_ratio_list_is_refused(value):
    with pytest.raises(OptionError, match="at least one ratio"):
        parse_ratios(value)


@pytest.mark.parametrize("value", ["0.1,1.0", "-0.1", "0.2,x"])
def test_ratios_outside_the_range_are_refused(value):
    with pytest.raises(OptionError, match="0 <= ratio < 1"):
        parse_ratios(value)


@pytest.mark.parametrize("args, needle", [
    (["--layer-norm", "tss,none", "--ratio", "0.1"], "--layer-norm value 'tss'"),
    (["--criterion", "index", "--ratio", "0.1"], "--criterion value 'index'"),
    (["--ratio", ","], "at least one ratio"),
    (["--ratio", "0.2,1"], "0 <= ratio < 1"),
    (["--ratio", "0.2", "--workers", "0"], "--workers"),
    (["--ratio", "0.2", "--ray", "127.0.0.1:9"], "cannot reach a Ray cluster"),
])
def test_cli_bad_input_is_one_line(capfd, tmp_path, args, needle):
    out = tmp_path / "s.json"
    rc, _, err = cli(capfd, "sweep", "demo", "--eval-data", "demo", "--json", out, *args)
    assert rc == 2
    assert needle in one_error_line(err)
    assert not out.exists()


# ----------------------------------------------------------------------- the points
@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep.json"
    report = sweep("demo", {"layer_norm": "tss_norm,linear_scaling"}, [0.2, 0.4],
                   eval_data="demo", workers=1, out_json=out)
    return report, out


def test_a_point_equals_the_matching_prune_run(demo_sweep):
    report, out = demo_sweep
    x, y = load_demo_eval()
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["complete"] and len(report["points"]) == 4
    assert report["original"] == pytest.approx(_accuracy(engine.analyze("demo").gm, x, y))
    for point in report["points"][1::2]:
        result = engine.prune("demo", options=point["options"], ratio=point["ratio"])
        assert point["params"] == result.after["params"]
        assert point["flops"] == result.after["flops"]
        assert point["metric"] == _accuracy(result.module, x, y)


@pytest.fixture
def pool_starts(monkeypatch) -> list[str]:
    """How each process pool of the test started its workers (fork or spawn)."""
    starts: list[str] = []
    get_context = multiprocessing.get_context

    def recording(method=None):
        starts.append(method)
        return get_context(method)

    monkeypatch.setattr(executors.multiprocessing, "get_context", recording)
    return starts


@contextlib.contextmanager
def another_thread():
    """A thread of this process's own, as under Streamlit: the pool must spawn."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# A fresh process: in this one, earlier test files (the dashboard's AppTests) may have left
# threads of their own (Netron servers, the session sweeper), and with any thread but
# tqdm's monitor alive the pool must spawn, as it does under Streamlit.
_POOL_AFTER_A_PRUNE = r"""
import json, multiprocessing, os, sys, threading
import engine
from engine.quality import executors
from engine.quality.sweep import sweep

starts = []
get_context = multiprocessing.get_context
def recording(method=None):
    starts.append(method)
    return get_context(method)
executors.multiprocessing.get_context = recording
engine.prune("demo", ratio=0.2)  # its verification runs torch.fx's Interpreter: a tqdm bar
monitor = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
pooled = sweep("demo", {"layer_norm": "tss_norm,linear_scaling"}, [0.2, 0.4],
               eval_data="demo", workers=2)
print(json.dumps({"threads": monitor, "starts": starts, "pid": os.getpid(), "report": pooled}))
"""


@pytest.mark.slow
def test_process_pool_and_serial_give_identical_results(demo_sweep):
    """In a process that pruned something (tqdm's monitor thread running) the pool still
    forks, its workers inheriting the analysis, and gives the serial sweep's points."""
    report, _ = demo_sweep
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _POOL_AFTER_A_PRUNE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["threads"] == ["tqdm_monitor"]
    assert child["starts"] == ["fork"]
    pooled = child["report"]
    assert _without_seconds(pooled) == _without_seconds(json.loads(json.dumps(report)))
    # the points really ran in the pool's worker processes (the serial ones ran here)
    assert {p["pid"] for p in report["points"]} == {os.getpid()}
    assert child["pid"] not in {p["pid"] for p in pooled["points"]}
    assert len({p["pid"] for p in pooled["points"]}) >= 1


@pytest.mark.slow
def test_ray_gives_the_same_results_as_the_process_pool(demo_sweep):
    import ray

    report, _ = demo_sweep
    assert not ray.is_initialized()
    cpus = []  # what the Ray instance the sweep started offers, asked while it runs

    def ask_ray(done, total, record):
        cpus.append(ray.cluster_resources().get("CPU"))

    try:
        # `local`: the sweep starts a real local Ray instance (one CPU: one Ray worker
        # process, which imports torch and loads the model once for all four points)
        on_ray = sweep("demo", {"layer_norm": "tss_norm,linear_scaling"}, [0.2, 0.4],
                       eval_data="demo", ray="local", workers=1, progress=ask_ray)
        assert not ray.is_initialized()  # and shuts down what it started
    finally:
        ray.shutdown()
    assert cpus == [1.0] * 4
    assert _without_seconds(on_ray) == _without_seconds(report)
    # each point was its own Ray task, run in a Ray worker process
    tasks = [p["ray_task_id"] for p in on_ray["points"]]
    assert all(isinstance(t, str) and t for t in tasks) and len(set(tasks)) == len(tasks)
    assert os.getpid() not in {p["pid"] for p in on_ray["points"]}


def test_a_local_ray_gets_no_more_cpus_than_points():
    assert executors.local_ray_cpus(None, 1) == 1
    assert executors.local_ray_cpus(8, 3) == 3
    assert executors.local_ray_cpus(2, 5) == 2
    assert executors.local_ray_cpus(None, 10_000) == os.cpu_count()


def test_a_built_in_model_travels_by_name_to_ray_workers():
    # a Ray worker on another machine loads a built-in model from its own engine install
    for name in ("demo", "demo-lm"):
        source = ModelSource(name, name)
        assert source.with_bytes() is source


@pytest.mark.slow
def test_an_interrupted_sweep_keeps_the_finished_points(tmp_path):
    out = tmp_path / "partial.json"
    seen = []

    def stop_after_two(done, total, record):
        seen.append(record)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep("demo", {"layer_norm": "all"}, [0.1, 0.3], eval_data="demo", workers=2,
              out_json=out, progress=stop_after_two)
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and saved["total"] == 10
    assert len(saved["points"]) == 2
    assert {p["index"] for p in saved["points"]} == {r["index"] for r in seen}


def test_cli_writes_json_csv_and_a_table(capfd, tmp_path):
    rc, out, err = cli(capfd, "sweep", "demo", "--layer-norm", "none", "--policy", "sum,average",
                       "--ratio", "0.1", "--eval-data", "demo", "--workers", "1",
                       "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv")
    assert rc == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["axes"] == {"policy": ["sum", "average"], "layer_norm": ["none"]}
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert len(lines) == 3 and "metric" in lines[0].split(",")
    rows = [ln for ln in out.splitlines() if ln.startswith(("sum", "average"))]
    assert [float(r.split(" | ")[1]) for r in rows] == pytest.approx(
        [p["metric"] for p in report["points"]], abs=5e-4)


@pytest.mark.slow
def test_an_in_memory_model_reaches_the_workers(pool_starts):
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    from engine.quality.evaluate import EvalData

    data = EvalData((x.numpy(),), np.arange(40) % 3, "memory")
    serial = sweep(model, {}, [0.25, 0.5], eval_data=data, example_inputs=(x,), workers=1)
    with another_thread():  # spawned workers load the model from the .pt2 bytes they get
        pooled = sweep(model, {}, [0.25, 0.5], eval_data=data, example_inputs=(x,),
                       workers=2)
    assert pool_starts == ["spawn"]
    assert _without_seconds(serial) == _without_seconds(pooled)
    assert [p["params"] for p in serial["points"]] == [6 * 6 + 6 + 6 * 3 + 3, 4 * 6 + 4 + 4 * 3 + 3]


def test_a_point_equals_what_prune_eval_data_reports(capfd, tmp_path, demo_sweep):
    report, _ = demo_sweep
    point = report["points"][3]  # linear_scaling at 0.4
    rc, _, err = cli(capfd, "prune", "demo", "--layer-norm", point["options"]["layer_norm"],
                     "--ratio", point["ratio"], "--eval-data", "demo", "--no-onnx",
                     "--out", tmp_path)
    assert rc == 0, err
    pruned = json.loads((tmp_path / "report.json").read_text())
    assert pruned["quality"]["metric"] == report["metric"] == "accuracy"
    assert pruned["quality"]["original"] == report["original"]
    assert pruned["quality"]["pruned"] == point["metric"]
    assert (pruned["after"]["params"], pruned["after"]["flops"]) == \
        (point["params"], point["flops"])


# ----------------------------------------------------------------------- targets


@pytest.mark.parametrize("args, needle", [
    (["--target-flops", "1.5"], "--target-flops='1.5' is out of range"),
    (["--target-params", "0"], "0 < target < 1"),
    (["--target-flops", "0.5"], "needs data to measure each group's sensitivity"),
    (["--target-flops", "0.5", "--sensitivity", ASSETS / "demo_meta.json"], "no sensitivity"),
])
def test_bad_targets_are_one_line(capfd, tmp_path, args, needle):
    rc, _, err = cli(capfd, "prune", "demo", "--out", tmp_path, "--no-onnx", *args)
    assert rc == 2
    assert needle in one_error_line(err)
    assert not (tmp_path / "report.json").exists()


@pytest.mark.slow
def test_target_flops_from_stored_curves_writes_reusable_ratios(capfd, tmp_path):
    rc, out, err = cli(capfd, "prune", "demo", "--target-flops", "0.4", "--sensitivity",
                       ASSETS / "demo_sensitivity.json", "--eval-data", "demo", "--no-onnx",
                       "--out", tmp_path / "auto")
    assert rc == 0, err
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    auto = report["auto_ratios"]
    removed = 1 - report["after"]["flops"] / report["before"]["flops"]
    assert removed >= 0.4 and auto["removed"] == pytest.approx(removed)
    assert auto["uniform"]["removed"] >= 0.4
    assert report["ratios"] == auto["ratios"]
    assert set(auto["ratios"]) == {g["name"] for g in report["groups"]}
    assert auto["comparison"]["auto"] == report["quality"]["pruned"]
    assert "auto ratios for 40% of the flops removed" in out
    # the ratios are usable again with --ratios: the same model comes out
    (tmp_path / "ratios.json").write_text(json.dumps(report["ratios"]))
    rc, _, err = cli(capfd, "prune", "demo", "--ratios", tmp_path / "ratios.json", "--no-onnx",
                     "--out", tmp_path / "again")
    assert rc == 0, err
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["after"] == report["after"]
    assert [g["pruned"] for g in again["groups"]] == [g["pruned"] for g in report["groups"]]


@pytest.mark.slow
def test_recovered_points_are_measured_like_a_recovery_run(tmp_path):
    # the first 256 of the demo's 1,347 calibration samples, as a file of the user's: the
    # recovery's passes over them are most of this test's time
    calibration = tmp_path / "calibration.npz"
    with np.load(ASSETS / "demo_calib.npz") as demo:
        np.savez(calibration, x=demo["x"][:256], y=demo["y"][:256])
    report = sweep("demo", {}, [0.5], eval_data="demo", recover="bn,bias,lsq,norm",
                   calibration=calibration, workers=1)
    point = report["points"][0]
    x, y = load_demo_eval()
    result = engine.prune("demo", ratio=0.5)
    recovered = engine.recover(result, calibration, methods="bn,bias,lsq,norm")
    assert point["metric"] == _accuracy(result.module, x, y)
    assert point["recovered"] == _accuracy(recovered.module, x, y)
    assert point["recovered"] > point["metric"] + 0.3  # data-light recovery at 0.5


def test_a_missing_ray_extra_is_one_line(capfd, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    rc, _, err = cli(capfd, "sweep", "demo", "--eval-data", "demo", "--ratio", "0.1",
                     "--ray", "local", "--json", tmp_path / "s.json")
    assert rc == 2
    assert "pip install 'prunescope[ray]'" in one_error_line(err)
