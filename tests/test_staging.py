"""A run killed mid-way leaves OUT/.prunescope-* behind; the next run into OUT removes the
staging folders of runs no longer alive and says so (engine/io/staging.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.io.staging import OWNER_FILE, new_staging, remove_dead_staging
from tests.helpers import cli

ROOT = Path(__file__).resolve().parents[1]


def _staging(out: Path) -> list[Path]:
    return sorted(out.glob(".prunescope-*")) if out.exists() else []


def test_a_killed_run_leaves_staging_and_the_next_run_removes_it(capfd, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "prune", "demo", "--ratio", "0.5",
                             "--no-latency", "--out", str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        # kill it once it is writing its outputs: its staging folder holds model.pt2
        while not any((s / "model.pt2").exists() for s in _staging(out)):
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    left = _staging(out)
    assert len(left) == 1 and json.loads((left[0] / OWNER_FILE).read_text())["pid"] == proc.pid
    assert not (out / "report.json").exists()  # nothing half-written in OUT itself

    rc, stdout, err = cli(capfd, "prune", "demo", "--ratio", "0.5", "--no-onnx", "--out", out)
    assert rc == 0, err
    assert f"removed 1 staging folder(s) of runs no longer alive in {out}: {left[0].name}" in err
    assert _staging(out) == []
    assert (out / "report.json").exists() and (out / "model.pt2").exists()


def test_live_runs_and_unknown_folders_are_kept_and_a_recycled_pid_is_not_alive(
        tmp_path: Path) -> None:
    live = new_staging(tmp_path)  # this process: alive
    foreign = tmp_path / ".prunescope-foreign"  # no owner record: not ours to judge
    foreign.mkdir()
    recycled = tmp_path / ".prunescope-recycled"  # this pid, but a process started earlier
    recycled.mkdir()
    (recycled / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start": "1"}))
    dead = tmp_path / ".prunescope-dead"
    dead.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that existed and is gone
    (dead / OWNER_FILE).write_text(json.dumps({"pid": child.pid, "start": None}))
    (dead / "model.pt2").write_bytes(b"x" * 1000)
    assert sorted(remove_dead_staging(tmp_path)) == sorted([recycled, dead])
    assert live.exists() and foreign.exists()
    assert not recycled.exists() and not dead.exists()
