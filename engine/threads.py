"""Running a stretch of torch work on one thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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
