"""Long work on the page (sweep, sensitivity, recovery): a progress bar with a time estimate
and a Stop button that keeps what is done.

How Stop works: a click on any widget while the script runs makes Streamlit raise a
control exception in the running script at its next call into Streamlit, which here is the
progress update (a rerun request, or a stop request when Streamlit has already started the
new run in another thread). ``LongRun`` catches it there, tells the engine to stop (the
engine functions ask a ``stop()`` callback between points or steps and return what
finished), stores the partial result, and raises the exception again. The new run waits in
``wait_for_stopped_run`` until the stopped one has stored its result, then shows it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

T = TypeVar("T")


def eta_text(done: float, total: float, elapsed_s: float, unit: str = "") -> str:
    """"3 of 8 points · about 40 s left" from the work done so far (a linear estimate);
    with ``total`` 1, ``done`` is a fraction: "30% · about 1 min 10 s left"."""
    fraction = min(max(done / total, 0.0), 1.0) if total else 0.0
    if total > 1 and float(done).is_integer():
        head = f"{int(done)} of {int(total)}" + (f" {unit}" if unit else "")
    else:
        head = f"{fraction:.0%}"
    if fraction <= 0:
        return f"{head} · estimating the time left…"
    if fraction >= 1:
        return f"{head} · done in {_duration(elapsed_s)}"
    left = elapsed_s * (1 - fraction) / fraction
    return f"{head} · about {_duration(left)} left"


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


# session id -> key of the long run in progress. A plain dict, not st.session_state: every
# session_state access in a stopped script raises the stop again, so the stopped run could
# never clear a flag kept there (nor store its result there: results go to plain dicts too).
_RUNNING: dict[str, str] = {}
_RUNNING_LOCK = threading.Lock()
WAIT_S = 600.0


def _session_id() -> str:
    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx.session_id if ctx is not None else ""


def wait_for_stopped_run(key: str, timeout_s: float = WAIT_S) -> None:
    """Block while this session's run ``key`` is still finishing its current step after a
    Stop, so that the page shows what it kept."""
    session = _session_id()
    if _RUNNING.get(session) != key:
        return
    deadline = time.monotonic() + timeout_s
    with st.spinner("Stopping: finishing the current step, keeping what is done…"):
        while _RUNNING.get(session) == key and time.monotonic() < deadline:
            time.sleep(0.2)


class LongRun:
    """One long engine call with a progress bar, a time estimate and a Stop button."""

    def __init__(self, what: str, key: str) -> None:
        self.what = what
        self.key = key
        self.start = time.monotonic()
        self.stopped = False
        self._control: ScriptControlException | None = None
        cols = st.columns([5, 1])
        self._bar = cols[0].progress(0.0, text=f"{what}: starting…")
        # Any click while the work runs stops it; this button says so and is the one to use.
        cols[1].button("Stop", key=f"{key}_stop", icon=":material/stop_circle:", width="stretch",
                       help="Stop now and keep what is finished")

    def update(self, done: float, total: float, unit: str = "", message: str = "") -> None:
        """Show progress (``done`` of ``total`` ``unit``, or a fraction with ``total`` 1); a
        click on Stop (or any widget) is noticed here."""
        if self._control is not None:
            return
        fraction = min(max(done / total if total else 0.0, 0.0), 1.0)
        text = f"{self.what}: {eta_text(done, total, time.monotonic() - self.start, unit)}"
        try:
            self._bar.progress(fraction, text=text + (f" · {message}" if message else ""))
        except ScriptControlException as control:  # the user clicked: stop, keep what is done
            self._control = control
            self.stopped = True

    def stop(self) -> bool:
        """The engine's ``stop`` callback."""
        return self.stopped

    def run(self, work: Callable[[], T], keep: Callable[[T], Any]) -> T:
        """``work()``, then ``keep(result)`` (store it, in a plain dict such as the model's
        cache), then the rerun a click asked for, if any."""
        session = _session_id()
        with _RUNNING_LOCK:
            _RUNNING[session] = self.key
        try:
            result = work()
            keep(result)  # must not touch st.session_state (see _RUNNING)
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(session, None)
        if self._control is not None:
            raise self._control
        self._bar.progress(1.0, text=f"{self.what}: done in "
                           f"{_duration(time.monotonic() - self.start)}")
        return result
