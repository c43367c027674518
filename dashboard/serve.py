"""The dashboard's server, warmed up: `python -m dashboard.serve [streamlit options]`.

`make run`, `prunescope dashboard` and the tests start the page this way rather than with a
bare ``streamlit run dashboard/app.py`` (which still works, without the warm-up). Before
Streamlit's server listens, this process imports torch and the engine, loads and analyses the
built-in demo into the process-wide cache every session reads
(`dashboard.common.shared_builtin`), scores it under the default options and builds the first
chart once. Importing torch and ``torch.export``'s deserialiser is most of a fresh server's
first page (seconds of CPU); done before the server listens, the first visitor's page paints
as fast as any later one's.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
WARM_UP_WAIT_S = 120.0  # the longest the server waits for the warm-up before it listens
_logger = logging.getLogger(__name__)


def warm_up() -> None:
    """What the first session would otherwise do itself: imports, the demo, its scores."""
    try:
        import engine
        from dashboard import charts, frames, sources
        from dashboard.common import shared_builtin
        from dashboard.sidebar import DEFAULT_RATIO
        from engine.options import PruningOptions

        request = sources.demo_request()
        _captured, analysis = shared_builtin(request.key, request.source)
        plan = engine.plan(analysis, PruningOptions(), ratio=DEFAULT_RATIO)
        charts.score_overview(frames.stats_frame(plan), plan.threshold).to_json()
        import dashboard.body  # noqa: F401 - the page's modules, imported once
        import dashboard.tabs.scores  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the session that needs the demo shows the error
        _logger.debug("warm-up stopped: %s", e)


def main(argv: list[str] | None = None) -> None:
    """Warm up, then `streamlit run dashboard/app.py` with ``argv``.

    The server starts listening once the warm-up is done (at most ``WARM_UP_WAIT_S``): the
    URL it prints then opens on a page that paints at once, and the warm-up does not compete
    with Streamlit's own start for the interpreter. The warm-up runs in a thread so that a
    warm-up that takes too long (a machine far busier than usual) only delays the server by
    ``WARM_UP_WAIT_S`` and then finishes beside it.
    """
    args = sys.argv[1:] if argv is None else argv
    # Streamlit (with plotly and pandas) is imported before the thread starts: plotly peeks
    # at sys.modules for pandas, and a pandas half-imported by the other thread breaks it.
    import streamlit.web.bootstrap  # noqa: F401
    from streamlit.web import cli

    print("PruneScope: loading the built-in demo before the server starts…", flush=True)
    warming = threading.Thread(target=warm_up, name="prunescope-warm-up", daemon=True)
    warming.start()
    warming.join(WARM_UP_WAIT_S)
    sys.argv = ["streamlit", "run", str(APP), *args]
    cli.main()


if __name__ == "__main__":
    main()
