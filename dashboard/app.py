"""PruneScope dashboard: score, plan, prune and compare a PyTorch model in the browser.

Run with ``make run`` (or ``streamlit run dashboard/app.py``). Opens on the built-in demo
model with its scores drawn. All pruning is done by the engine's public API; this page only
collects options, draws the engine's numbers and shows the results. Each tab lives in its own
module under dashboard/tabs/, listed once in the tab registry `dashboard.tabs.TABS`; each
tab's ``render`` takes the one `dashboard.page.PageState` that dashboard/body.py builds from
the sidebar (dashboard/sidebar.py). This script draws the header, then runs the body.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ (not the repository) on sys.path.
_ROOT = Path(__file__).resolve().parent.parent
FAVICON = Path(__file__).resolve().parent / "favicon.png"
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from engine.offline import stay_offline  # noqa: E402

stay_offline()

import streamlit as st  # noqa: E402

from dashboard.guide import header  # noqa: E402 - streamlit only: light

# The frame first: Streamlit sends elements as the script runs, so the header is on the page
# while the import below loads torch and the engine (seconds on a fresh server, unless the
# warm-up of dashboard/serve.py did it already).
# A local icon: a material or emoji icon makes the browser fetch it from Google's fonts.
st.set_page_config(page_title="PruneScope", page_icon=str(FAVICON), layout="wide")
header()

from dashboard.body import run_page  # noqa: E402 - torch, the engine and the tabs

run_page()
