"""Where sweep points run: in this process, in a local process pool, or on a Ray cluster.

Every executor runs the same `run_point(job, point)` with one torch thread, so the
numbers are identical whichever runs them. The job (model source, evaluation data) goes to
each worker once; each worker analyses the model once and keeps it for all its points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import socket
import sys
import threading
import types
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from engine.device import resolve_device
from engine.errors import OptionError, one_line
from engine.quality.sweep_job import SweepJob, run_point
from engine.threads import one_torch_thread

Point = dict[str, Any]  # {"options", "ratio"} or {"options", "ratios"}


def execute(job: SweepJob, points: list[Point], *, workers: int | None = None,
            ray: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (index, record) for every point as it finishes; close() stops the rest."""
    if ray is not None:
        return _on_ray(job, points, ray, workers)
    workers = min(int(workers or os.cpu_count() or 1), len(points))
    if workers <= 1:
        return _serial(job, points)
    return _in_pool(job, points, workers)


def _serial(job: SweepJob, points: list[Point]) -> Iterator[tuple[int, dict]]:
    with one_torch_thread():
        for index, point in enumerate(points):
            yield index, run_point(job, point)


# ------------------------------------------------------------------------- process pool
_POOL_JOB: SweepJob | None = None


def _pool_init(job: SweepJob | None) -> None:
    global _POOL_JOB
    # Ctrl-C is the parent's to handle: it stops the pool and keeps what finished
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)
    if job is not None:  # spawned workers get the job here; forked ones inherit it
        _POOL_JOB = job


def _pool_point(index: int, point: Point) -> tuple[int, dict]:
    assert _POOL_JOB is not None
    return index, run_point(_POOL_JOB, point)


def _context(job: SweepJob) -> tuple[Any, bool]:
    """fork when it is safe (Linux, no other threads, no GPU: CUDA does not survive a fork):
    the workers inherit the analysis already in memory; otherwise spawn, and each worker
    analyses the model itself."""
    on_cpu = job.device is None or resolve_device(job.device).type == "cpu"
    if on_cpu and sys.platform.startswith("linux"):
        _stop_progress_monitors()
        if threading.active_count() == 1:
            return multiprocessing.get_context("fork"), True
    return multiprocessing.get_context("spawn"), False


def _stop_progress_monitors() -> None:
    """Stop tqdm's monitor thread when it is this process's only other thread.

    Every pruned model's verification starts one (torch.fx's Interpreter.run opens a
    disabled tqdm bar), so without this a process that pruned anything before sweeping
    would spawn its workers, and each would import torch and analyse the model again.
    The monitor only re-tunes bars that are drawing; tqdm starts a new one with its next
    bar. A monitor stopped here holds no lock a forked worker could inherit."""
    monitor_module = sys.modules.get("tqdm._monitor")  # never imported here for this
    if monitor_module is None:
        return
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    if others and all(isinstance(t, monitor_module.TMonitor) for t in others):
        for monitor in others:
            monitor.exit()  # wakes it and joins it: it is gone before the fork


_MAIN_SWAP = threading.Lock()


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """While spawned workers start: a bare ``__main__`` (no file, no module name), so that
    multiprocessing does not re-import the parent's main script in each worker. Under
    Streamlit that script is the dashboard page, which would run again (and a script
    without an ``if __name__ == "__main__"`` guard would start the sweep again). The
    workers need nothing from it: the job and `_pool_point` come from engine modules."""
    with _MAIN_SWAP:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


def _in_pool(job: SweepJob, points: list[Point], workers: int) -> Iterator[tuple[int, dict]]:
    global _POOL_JOB
    context, forked = _context(job)
    _POOL_JOB = job
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_pool_init,
                               initargs=(None if forked else job,))
    pending = set()
    try:
        # a spawning pool starts its workers as points are submitted: all of them here
        with contextlib.nullcontext() if forked else _without_main():
            pending = {pool.submit(_pool_point, i, p) for i, p in enumerate(points)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        if pending:
            for future in pending:
                future.cancel()
            # points still running are abandoned: stop their processes now
            for process in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(Exception):
                    process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        _POOL_JOB = None


# ------------------------------------------------------------------------------- Ray
def _ray_point(job: SweepJob, index: int, point: Point) -> tuple[int, dict]:
    import ray  # inside a Ray worker, where the extra is installed

    with one_torch_thread():
        record = run_point(job, point)
    record["ray_task_id"] = ray.get_runtime_context().get_task_id()
    return index, record


def import_ray():
    try:
        import ray
    except ImportError:
        raise OptionError(
            "--ray needs the Ray extra: pip install 'prunescope[ray]'"
        ) from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in one line, quickly, when nothing listens at host:port (ray.init would retry)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (ValueError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise OptionError(
            f"--ray {address}: cannot reach a Ray cluster there ({reason}); "
            "give HOST:PORT of a running cluster, or `local`"
        ) from None


def check_executor(ray: str | None) -> None:
    """Before any work: the Ray extra is installed and the cluster answers."""
    if ray is not None:
        import_ray()
        if ray != "local":
            _check_reachable(ray)


def local_ray_cpus(workers: int | None, points: int) -> int:
    """The CPUs of a Ray instance a sweep starts here: `workers` (default: the cores), but
    no more than there are points. Each Ray worker process imports torch and the engine and
    loads the model before its first point; a CPU no point can use would only start one."""
    return max(1, min(int(workers or os.cpu_count() or 1), points))


def _on_ray(job: SweepJob, points: list[Point], address: str,
            workers: int | None) -> Iterator[tuple[int, dict]]:
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=local_ray_cpus(workers, len(points)), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except Exception as exc:  # noqa: BLE001 - any failure to connect is one line
                raise OptionError(f"--ray {address}: cannot connect: {one_line(exc)}") from None
        started = True
    # a GPU run: Ray gives each worker one GPU of its own (it sees it as cuda:0)
    gpus = 1 if job.device is not None and resolve_device(job.device).type == "cuda" else 0
    if gpus and job.device != "auto":
        job = dataclasses.replace(job, device="cuda")
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_ray_point)
    # a remote worker may not see this machine's files: the model travels as bytes
    job_ref = ray.put(_shippable(job))
    pending: dict = {}
    try:
        pending = {task.remote(job_ref, i, p): i for i, p in enumerate(points)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                del pending[ref]
                yield ray.get(ref)
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _shippable(job: SweepJob) -> SweepJob:
    from dataclasses import replace

    return replace(job, model=job.model.with_bytes())
