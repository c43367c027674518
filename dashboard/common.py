"""What the dashboard's views share: session files, one-line errors, model loading and the
plan call. No pruning logic: every number comes from the engine."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import streamlit as st

import engine
from dashboard import charts, netron_server, sources, state
from engine.demo import BUILTIN_NAMES, is_builtin
from engine.errors import PruneScopeError
from engine.io.data import DataSet
from engine.options import PruningOptions

RESULT_KEY = "_ps_result"
FAILED_KEY = "_ps_failed"
EVAL_KEY = "_ps_eval"


def short(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def session_files() -> sources.SessionFiles:
    """The session's temp folder; also removes the folders of sessions that have closed."""
    session_id = None
    try:
        from streamlit.runtime import Runtime
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        session_id = ctx.session_id if ctx else None
        if Runtime.exists():
            runtime = Runtime.instance()
            alive = _session_alive_check(runtime)
            if sources.start_sweeper(alive, netron_server.stop_under, _sweep_interval_s()):
                sources.remove_orphans()
            sources.sweep(alive, netron_server.stop_under)
    except Exception:  # cleanup is best effort; the folders also go at process exit
        pass
    return state.session_files(st.session_state, session_id)


def _session_alive_check(runtime: Any):
    """A session still exists while it is connected or kept for a reconnect.

    A briefly disconnected browser (network blip, laptop lid) reconnects to its session for
    ``server.disconnectedSessionTTL`` seconds; its uploads must still be there then.
    """
    manager = getattr(runtime, "_session_mgr", None)
    get_info = getattr(manager, "get_session_info", None)

    def alive(session_id: str) -> bool:
        if runtime.is_active_session(session_id):
            return True
        return get_info is not None and get_info(session_id) is not None

    return alive


def _sweep_interval_s() -> float:
    try:
        return max(0.2, float(os.environ.get("PRUNESCOPE_SWEEP_S", "30")))
    except ValueError:
        return 30.0


# The engine's messages name its command-line flags; the page names its own controls.
PAGE_WORDS = {
    "--indices FILE.json (layer -> indices)": "“Channel indices to remove” in the sidebar",
    "--indices": "“Channel indices to remove”",
    "--ratio": "“Pruning ratio”",
    "--calibration F": "calibration data",
    "--calibration": "calibration data",
    "--eval-data F": "evaluation data",
    "--eval-data": "evaluation data",
    "--recover-budget": "“Budget (s)”",
    "--remove-blocks": "“Blocks to remove”",
    "--expert-ratio": "“Share of experts to remove”",
    "--target-flops": "the FLOPs target",
    "--target-params": "the parameters target",
}


def page_words(message: str) -> str:
    """``message`` with the engine's CLI flags replaced by the page's names for them."""
    for flag, words in PAGE_WORDS.items():  # longest forms first (dict order)
        message = message.replace(flag, words)
    return message


def show_error(error: BaseException, what: str = "") -> None:
    prefix = f"{what}: " if what else ""
    st.error(prefix + page_words(sources.one_line(error)), icon=":material/warning:")


def upload_limit_mb() -> int:
    try:
        return int(st.get_option("server.maxUploadSize"))
    except Exception:
        return 200


def upload_limit_note(limit_mb: int) -> None:
    # The browser refuses a file over the limit before the page sees it (the file's name
    # turns red, the reason is in its tooltip), so the limit is stated up front.
    st.sidebar.caption(f"Uploads up to {limit_mb} MB: a larger file is refused (its name "
                       "turns red; hover it for the reason). Larger models: use “Local file "
                       "path”, which reads the file in place.")


def _load(request: sources.ModelRequest) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {}
    if request.trust_pickle:
        kwargs["trust_pickle"] = True
    if request.input_shapes:
        kwargs["input_shapes"] = [tuple(s) for s in request.input_shapes]
    captured = engine.load_model(request.source, **kwargs)
    analysis = engine.analyze(captured)
    return captured, analysis


_SHARED_LOCK = threading.Lock()
_SHARED: dict[str, tuple[Any, Any]] = {}  # built-in model key -> (captured, analysis)
MAX_SHARED = 4


def shared_builtin(key: str, source: str) -> tuple[Any, Any]:
    """A built-in model (demo, demo-lm), loaded and analysed once per process and shared by
    every session (read-only: the engine's score cache inside the analysis only grows).

    A plain process-wide cache rather than ``st.cache_resource`` so that the server's warm-up
    thread (dashboard/serve.py), which runs outside any session, fills the same cache the
    sessions read; one lock, so a session that arrives during the warm-up waits for it
    instead of loading a second copy. ``key`` holds the file's stamp, so a retrained demo is
    loaded afresh."""
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = _load(sources.ModelRequest(key=key, label=key, source=source))
            while len(_SHARED) > MAX_SHARED:
                del _SHARED[next(iter(_SHARED))]
        return _SHARED[key]


def clear_shared_models() -> None:
    """Forget the shared built-in models (tests that count a first load)."""
    with _SHARED_LOCK:
        _SHARED.clear()


@st.cache_resource(show_spinner=False, max_entries=64)
def cached_figure(builder: str, frame: Any, *args: Any) -> Any:
    """``dashboard.charts.<builder>(frame, *args)``, built once per process for equal frames
    and arguments (a rerun or another session with the same options redraws without
    rebuilding the Plotly figure). Shared read-only: ``st.plotly_chart`` only serialises it."""
    return getattr(charts, builder)(frame, *args)


def get_model(request: sources.ModelRequest) -> state.LoadedModel:
    ss = st.session_state
    failed: dict[str, str] = ss.setdefault(FAILED_KEY, {})
    if request.key in failed:
        # The same failing request is not retried on every rerun; the message stays.
        raise PruneScopeError(failed[request.key])
    try:
        if is_builtin(request.source):
            def load() -> tuple[Any, Any]:
                return shared_builtin(request.key, request.source)
        else:
            def load() -> tuple[Any, Any]:
                return _load(request)
        with st.spinner(f"Loading and analysing {request.label}…"):
            return state.get_model(ss, request.key, request.label, load)
    except Exception as e:
        failed[request.key] = sources.readable(sources.one_line(e), request)
        raise PruneScopeError(failed[request.key]) from None


def editor_key(model: state.LoadedModel) -> str:
    return f"layers_{short(model.key)}"


def make_plan(model: state.LoadedModel, options: PruningOptions, ratio: float,
              ratios: dict[str, float], pinned: list[str], calibration: Any,
              indices: dict[str, list[int]] | None, uniform: bool = False) -> Any:
    return engine.plan(model.analysis, options, ratio=ratio, ratios=ratios or None,
                       pinned=tuple(pinned), calibration=calibration, indices=indices,
                       uniform=uniform)


def calibration_for(eval_data: DataSet | None) -> Any:
    """The data the calibration criteria score on: a built-in model's own calibration set
    (its training split, so the evaluation set the page measures on stays held out), else
    the uploaded data (inputs x and labels y, which taylor uses). The engine's raw-score cache
    is keyed by the data's content, so every rerun hits it."""
    cached = st.session_state.get(EVAL_KEY)
    if eval_data is not None and cached is not None and cached[0] in BUILTIN_NAMES \
            and cached[1] is eval_data:
        return cached[0]  # the built-in name: engine loads its calibration set
    return eval_data

