"""Threads and torch: running a stretch of torch work on one thread; one lock for torch.export."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

# torch.export keeps process-global state while it runs: `torch.export.load` sets a module
# global deserializer and asserts that none is set yet, so two loads at once fail with
# "AssertionError: _CURRENT_DESERIALIZER is already set"; export and save swap global tracing
# and serialisation state the same way. Every Streamlit session is a thread, and the Python
# API may be called from threads, so every engine call into torch.export (export, load, save,
# run_decompositions, the ONNX exporter, which calls torch.export itself) holds this lock.
# Re-entrant: an ONNX export (locked) may re-export inside the same thread.
TORCH_EXPORT_LOCK = threading.RLock()


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
