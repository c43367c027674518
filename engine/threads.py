"""Threads and torch: running a stretch of torch work on one thread; one lock for torch.export."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

# torch.export keeps process-global state while it runs: `torch.export.load` sets a module
# global deserializer and asserts that none is set yet, so two loads at once fail with
# "AssertionError: _CURRENT_DESERIALIZER is already set"; export and save swap global tracing
# and serialisation state the same way. Every Streamlit session is a thread, and the Python
# API may be called from threads, so every engine call into torch.export (export, load, save,
# run_decompositions, the ONNX exporter, which calls torch.export itself) holds this lock.
# Re-entrant: an ONNX export (locked) may re-export inside the same thread.
TORCH_EXPORT_LOCK = threading.RLock()

_F = TypeVar("_F", bound=Callable[..., Any])


def exclusive(fn: _F) -> _F:
    """`fn` (a public engine entry point) run under TORCH_EXPORT_LOCK from start to end.

    Locking only the calls into torch.export is not enough: while one thread exports,
    `torch.compiler.is_exporting()` is true process-wide, and then every function torch wraps
    with its dynamo-disable decorator, which forwards of exported modules and unlifting
    call, writes torch.fx's global node meta in any thread. Two threads doing that at once
    fail ("KeyError: 'custom'"). So the engine's entry points that capture, run or save a
    model take turns; nested calls re-enter the lock."""

    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with TORCH_EXPORT_LOCK:
            return fn(*args, **kwargs)

    return locked  # type: ignore[return-value]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the duration (same arithmetic). Sweep points run side by side
    and must not oversubscribe the cores; small chunked kernels gain nothing from a second
    thread, and on a busy machine each of thousands of parallel regions waits for a thread the
    OS has descheduled (the l2 scores of a 3B model took 59 s instead of 6 with two threads
    and other processes running)."""
    import torch  # lazily: the CLI imports this module for --help

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
