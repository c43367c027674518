"""One place that builds the architectures of the coverage set (``tests/architectures.py``)
for the benchmarks that measure each of them (``coverage_v2``, ``hf``) and runs them in
batches of child processes: a crash or a hang costs one row, and memory is returned.

A benchmark module gives ``measure(row, model, inputs) -> None`` (it fills the row) and
calls :func:`main_one` from ``python -m bench.NAME --one NAME ...``; the parent calls
:func:`run_batches` with its module name.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

from bench.common import REPO

BATCH = 6


def line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line: type and the first line of its message."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def measure_one(name: str, measure: Callable[[dict, object, tuple], None]) -> dict:
    """Build architecture `name` (seeded, one thread) and let `measure` fill its row; a
    failure while building or measuring is the row's ``error``."""
    sys.path.insert(0, str(REPO))
    import torch  # noqa: PLC0415

    from tests.architectures import ARCHITECTURES, build  # noqa: PLC0415

    torch.set_num_threads(1)
    row: dict = {"name": name, "family": ARCHITECTURES[name][0]}
    start = time.perf_counter()
    try:
        model, inputs = build(name)
    except Exception as exc:  # noqa: BLE001 - a failure is the result
        row["error"] = f"build: {line(exc)}"
        return row
    try:
        measure(row, model, inputs)
    except Exception as exc:  # noqa: BLE001
        row.setdefault("error", line(exc))
    row["seconds"] = time.perf_counter() - start
    return row


def main_one(names: list[str], measure: Callable[[dict, object, tuple], None]) -> int:
    """``--one NAME ...``: one JSON row per architecture on stdout."""
    for name in names:
        print(json.dumps(measure_one(name, measure)), flush=True)
    return 0


def run_batches(module: str, names: list[str], timeout_s: float, batch: int = BATCH,
                progress: bool = True) -> list[dict]:
    """Rows of `names`, measured by ``python -m MODULE --one`` in batches; a model that kills
    or hangs its batch's process is retried alone, so it costs only its own row."""
    rows = []
    for start in range(0, len(names), batch):
        for row in _subprocess(module, names[start:start + batch], timeout_s):
            if progress:
                print(f"  {row['name']}: {json.dumps(row)[:300]}", flush=True)
            rows.append(row)
    return rows


def _subprocess(module: str, names: list[str], timeout_s: float) -> list[dict]:
    try:
        done = subprocess.run([sys.executable, "-m", module, "--one", *names],
                              capture_output=True, text=True, timeout=timeout_s * len(names),
                              cwd=REPO)
        stdout, error = done.stdout, f"process failed ({done.returncode})"
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        error, tail = f"timed out after {timeout_s * len(names):.0f} s", ""
    rows = {r["name"]: r for r in (json.loads(x) for x in stdout.splitlines()
                                   if x.startswith("{"))}
    missing = [n for n in names if n not in rows]
    if len(names) > 1 and missing:
        for row in _subprocess(module, missing, timeout_s):
            rows[row["name"]] = row
    elif missing:
        rows[names[0]] = {"name": names[0], "error": f"{error}: {tail}".rstrip(": ")}
    return [rows[n] for n in names]
