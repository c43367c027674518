"""`prunescope dashboard`: serve the Streamlit dashboard on loopback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="open the Streamlit dashboard")
    p.add_argument("model", nargs="?", default="demo")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[2]
    model = args.model if args.model == "demo" else str(Path(args.model).resolve())
    env = dict(os.environ, PRUNESCOPE_MODEL=model)
    return subprocess.call(
        [sys.executable, "-m", "dashboard.serve",
         "--server.headless", "true", "--server.address", "127.0.0.1",
         "--server.port", str(args.port), "--server.maxUploadSize", "2048"],
        env=env, cwd=root,
    )
