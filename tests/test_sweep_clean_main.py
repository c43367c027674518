"""A sweep's spawned workers do not import the parent's main script again (multiprocessing's
spawn does by default): under Streamlit that script is the dashboard page, which would run
once more in every worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# No `if __name__ == "__main__"` guard: imported again (as __mp_main__), the script records it
# and fails, and would start the sweep once more. The thread makes the pool spawn its workers,
# as it does under Streamlit (a process with threads is not forked).
SCRIPT = textwrap.dedent("""
    import json, os, sys, threading
    with open(os.environ["SEEN_AS"], "a") as seen:
        seen.write(__name__ + "\\n")
    if __name__ != "__main__":
        raise SystemExit("the parent's main script was imported again")
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
    import numpy as np
    import torch
    import engine
    from engine.quality.evaluate import EvalData

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(24, 6)
    data = EvalData((x.numpy(),), np.arange(24) % 3, "memory")
    report = engine.sweep(model, {}, [0.25, 0.5], eval_data=data, example_inputs=(x,),
                          workers=2)
    stop.set()
    print(json.dumps({"pids": [p["pid"] for p in report["points"]],
                      "errors": [p.get("error") for p in report["points"]],
                      "me": os.getpid()}))
""")


@pytest.mark.slow
def test_spawned_sweep_workers_leave_the_main_script_alone(tmp_path: Path):
    script = tmp_path / "page.py"
    script.write_text(SCRIPT)
    seen_as = tmp_path / "seen_as.txt"
    env = {**os.environ, "SEEN_AS": str(seen_as), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert seen_as.read_text().split() == ["__main__"]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["errors"] == [None, None]
    assert result["me"] not in result["pids"]  # the points ran in the pool's workers
