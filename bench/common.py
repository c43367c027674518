"""Shared helpers: sections and goals, timing, machine description, tables, profiles."""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Goal:
    """One goal of the issue and whether this run met it (None: not measured)."""

    benchmark: str
    goal: str
    measured: str
    met: bool | None

    @property
    def mark(self) -> str:
        return {True: "met", False: "**missed**", None: "n/a"}[self.met]


@dataclass
class Section:
    name: str
    title: str
    body: str
    goals: list[Goal] = field(default_factory=list)
    seconds: float = 0.0


def quiet() -> None:
    """Silence library chatter (export/ONNX warnings, transformers notices) in bench output."""
    warnings.filterwarnings("ignore")
    for name in ("transformers", "torch.onnx", "torch._export", "torch.export", "torch_pruning",
                 "onnxscript", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is in the test extra
        pass


# ----------------------------------------------------------------------- formatting
def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def one_line(exc: BaseException, limit: int = 140) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -------------------------------------------------------------------------- timing
class PhaseClock:
    """A ``progress`` callback for engine.prune/apply: timestamps every phase message.

    The engine reports "capturing the model", "analysing channel dependencies and scoring",
    "running the masked original", "removing channels", "verifying", "re-exporting" and
    "measuring"; the gaps between the messages are the phase durations, so nothing inside
    the engine needs instrumenting.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[tuple[str, float]] = []
        self.end: float | None = None

    def __call__(self, message: str) -> None:
        self.marks.append((message, time.perf_counter()))

    def stop(self) -> None:
        self.end = time.perf_counter()

    @property
    def total(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def phases(self) -> dict[str, float]:
        """Phase name -> seconds; the first phase starts at the clock's start."""
        out: dict[str, float] = {}
        end = self.end or time.perf_counter()
        for i, (name, at) in enumerate(self.marks):
            nxt = self.marks[i + 1][1] if i + 1 < len(self.marks) else end
            out[name] = out.get(name, 0.0) + nxt - at
        if self.marks:
            out["(before first message)"] = self.marks[0][1] - self.start
        return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def copy_weights_seconds(model: torch.nn.Module) -> float:
    """One plain copy of every parameter and buffer: the floor for work that reads each once."""
    tensors = list(model.state_dict().values())
    start = time.perf_counter()
    copies = [t.clone() for t in tensors]
    elapsed = time.perf_counter() - start
    del copies
    return elapsed


def collect() -> None:
    gc.collect()


def set_threads(n: int) -> None:
    """Use ``n`` threads here and in benchmark subprocesses (which read BENCH_THREADS)."""
    os.environ["BENCH_THREADS"] = str(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def threads() -> int:
    return int(os.environ.get("BENCH_THREADS", torch.get_num_threads()))


# ------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line() -> str:
    mem = _mem_total()
    versions = ", ".join(
        f"{p} {_version(p)}"
        for p in ("torch", "transformers", "torch-pruning", "onnxruntime", "numpy")
    )
    return (
        f"{_cpu_model()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
        f"{fmt_bytes(mem)} RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; {versions}"
    )


# ------------------------------------------------------------------------ memory
def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tensor_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def param_count(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------- profiles
@dataclass
class FrameStat:
    function: str
    where: str
    inclusive: float
    self_time: float
    passthrough: bool = False


def profile(fn: Callable[[], Any], interval: float = 0.002) -> tuple[Any, list[FrameStat], float]:
    """Run ``fn`` under pyinstrument; return its result, per-function stats and the total.

    Inclusive time counts a function once per call stack (recursion is not double counted);
    self time is the time spent in the function's own code, outside its profiled callees.
    """
    from pyinstrument import Profiler

    profiler = Profiler(interval=interval)
    profiler.start()
    try:
        result = fn()
    finally:
        profiler.stop()
    root = profiler.last_session.root_frame()
    stats: dict[tuple[str, str], FrameStat] = {}
    # engine function -> engine callee -> time spent there (to spot pass-through wrappers)
    callees: dict[tuple[str, str], dict[tuple[str, str], float]] = {}

    def walk(frame, active: frozenset, engine_parent: tuple[str, str] | None) -> None:
        if frame.is_synthetic:
            return
        function = frame.function
        if function.startswith("pybind11_detail_function_record"):
            function = "(torch C++ op called through pybind11)"
        key = (function, f"{_short_path(frame.file_path)}:{frame.line_no}")
        stat = stats.setdefault(key, FrameStat(key[0], key[1], 0.0, 0.0))
        if key not in active:
            stat.inclusive += frame.time
        children = [c for c in frame.children if not c.is_synthetic]
        stat.self_time += max(0.0, frame.time - sum(c.time for c in children))
        if key[1].startswith("engine/"):
            if engine_parent is not None and engine_parent != key:
                into = callees.setdefault(engine_parent, {})
                into[key] = into.get(key, 0.0) + frame.time
            engine_parent = key
        for child in children:
            walk(child, active | {key}, engine_parent)

    if root is not None:
        walk(root, frozenset(), None)
    for key, into in callees.items():
        stat = stats[key]
        # a wrapper whose time is almost all one engine callee adds no information
        stat.passthrough = bool(into) and max(into.values()) >= 0.97 * stat.inclusive
    total = root.time if root is not None else 0.0
    return result, sorted(stats.values(), key=lambda s: -s.inclusive), total


def _short_path(path: str | None) -> str:
    if not path:
        return "<built-in>"
    p = path.replace("\\", "/")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in p:
            return p.split(marker, 1)[1]
    repo = str(REPO).replace("\\", "/") + "/"
    return p[len(repo):] if p.startswith(repo) else p


def profile_tables(stats: list[FrameStat], total: float, top: int = 12) -> str:
    """Two tables: engine functions by inclusive time, and any function by self time."""
    engine_rows = [s for s in stats if s.where.startswith("engine/") and not s.passthrough][:top]
    self_rows = sorted(stats, key=lambda s: -s.self_time)[:top]

    def pct(x: float) -> str:
        return f"{100 * x / total:.0f}%" if total else "-"

    a = md_table(
        ["engine function (inclusive; pass-through wrappers left out)", "where", "s", "share"],
        [(f"`{s.function}`", f"`{s.where}`", f"{s.inclusive:.2f}", pct(s.inclusive))
         for s in engine_rows],
    )
    b = md_table(
        ["hottest function (self time)", "where", "s", "share"],
        [(f"`{s.function}`", f"`{s.where}`", f"{s.self_time:.2f}", pct(s.self_time))
         for s in self_rows],
    )
    return f"Profiled total {total:.2f} s.\n\n{a}\n\n{b}"
