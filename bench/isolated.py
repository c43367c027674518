"""What the large-model benches (bench/large.py, bench/large_hf.py) share: their cache
folder, the Llama configs they build, and the measurement of one command in a fresh
subprocess (seconds, peak resident memory, a watchdog that kills it above a memory cap)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common import REPO

LOW_MEMORY = int(1.5 * 2**30)  # the machine's available memory at which a run is killed


def cache_dir() -> Path:
    """``$PRUNESCOPE_BENCH_CACHE`` (default ``~/.cache/prunescope-bench``), created."""
    path = Path(os.environ.get("PRUNESCOPE_BENCH_CACHE",
                               Path.home() / ".cache" / "prunescope-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_config(spec: Mapping[str, Any], **extra: Any):
    """A LlamaConfig from a bench's model spec (hidden, intermediate, layers, heads,
    kv_heads, vocab)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                       num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                       num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"], **extra)


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 16 * 2**30


def default_cap() -> int:
    """The watchdog's cap: ``PRUNESCOPE_BENCH_RSS_CAP_GIB``, or the available memory minus
    3 GiB, at most 18 GiB."""
    cap = os.environ.get("PRUNESCOPE_BENCH_RSS_CAP_GIB")
    if cap:
        return int(float(cap) * 2**30)
    return int(min(available_memory() - 3 * 2**30, 18 * 2**30))


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (/proc; 0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def measured(cmd: list[str], cap: int, timeout: float = 3600, root: Path = REPO) -> dict:
    """Run `cmd` from the repository root (or `root`, another checkout of it, whose code
    it then runs) with a watchdog; its seconds, peak RSS (``ru_maxrss`` from ``os.wait4``:
    the largest of the process and its waited-for descendants), exit status, stdout, stderr
    and, if it failed, an ``error`` line."""
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed: list[str] = []
    seen = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            rss = _tree_rss(proc.pid)
            seen[0] = max(seen[0], rss)
            why = None
            if rss > cap:
                why = f"killed by the bench at {rss / 2**30:.1f} GiB (cap {cap / 2**30:.1f})"
            elif available_memory() < LOW_MEMORY:
                why = "killed by the bench: the machine ran low on memory"
            elif time.perf_counter() - start > timeout:
                why = f"killed by the bench after {timeout:.0f} s"
            if why:
                killed.append(why)
                proc.kill()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
    readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
               for s, c in ((proc.stdout, chunks["stdout"]), (proc.stderr, chunks["stderr"]))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = "".join(chunks["stderr"])
    result = {"seconds": seconds, "peak_rss": max(usage.ru_maxrss * 1024, seen[0]),
              "exit": proc.returncode, "stdout": "".join(chunks["stdout"]), "stderr": err}
    if killed:
        result["error"] = killed[0]
    elif proc.returncode != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        result["error"] = f"exit {proc.returncode}: {lines[-1][:300] if lines else 'no output'}"
    return result
