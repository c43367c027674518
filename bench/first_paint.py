"""First paint of the dashboard in a real browser: `python -m bench.first_paint [--root DIR]`.

Starts the dashboard as `make run` does (`python -m dashboard.serve`, or `streamlit run
dashboard/app.py` in a checkout without it) of this checkout, or of ``--root`` (to compare two
checkouts on the same machine in the same run), and times, in Debian's Chromium at 1440x900,
from navigation to the score chart drawn: the first session of a fresh server, then
``--warm`` further sessions one after another, then four sessions opened at the same moment
on another fresh server. Needs /usr/bin/chromium and Playwright (the test extras). Prints
one line per measurement and the load average, since on a shared machine the load decides
the numbers more than anything else.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, free_port, stop, wait_healthy

CHART = ".js-plotly-plot .boxlayer"
VIEWPORT = {"width": 1440, "height": 900}


def _server(root: Path, log: Path):
    import subprocess
    import sys

    port = free_port()
    # as `make run` starts it (the warm-up launcher) where the checkout has one
    launcher = (["-m", "dashboard.serve"] if (root / "dashboard" / "serve.py").is_file()
                else ["-m", "streamlit", "run", "dashboard/app.py"])
    cmd = [sys.executable, *launcher, "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port)]
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
           "PYTHONPATH": str(root)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    wait_healthy(url, proc, log, 180)
    print(f"server start to healthy: {time.monotonic() - started:.2f} s", flush=True)
    return url, proc, started


def _paint(browser, url: str, count: int) -> list[float]:
    """Open ``count`` sessions at once; seconds until each has drawn its chart."""
    contexts = [browser.new_context(viewport=VIEWPORT) for _ in range(count)]
    pages = [c.new_page() for c in contexts]
    start = time.monotonic()
    for page in pages:
        page.goto(url, wait_until="commit")
    seconds = []
    for page in pages:
        page.wait_for_selector(CHART, timeout=300_000)
        seconds.append(time.monotonic() - start)
    for context in contexts:
        context.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--warm", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=CHROMIUM_ARGS)
        url, proc, started = _server(args.root, Path(tmp) / "fresh.log")
        try:
            print(f"fresh server, first session: {_paint(browser, url, 1)[0]:.2f} s "
                  f"({time.monotonic() - started:.2f} s after the server was started)",
                  flush=True)
            for i in range(args.warm):
                print(f"warm session {i + 1}: {_paint(browser, url, 1)[0]:.2f} s", flush=True)
        finally:
            stop(proc)
        url, proc, _started = _server(args.root, Path(tmp) / "four.log")
        try:
            together = _paint(browser, url, 4)
            print("fresh server, 4 sessions at once: "
                  + ", ".join(f"{s:.2f}" for s in together) + " s", flush=True)
        finally:
            stop(proc)
        browser.close()
    print(f"load average: {os.getloadavg()[0]:.1f} (2 cores)")


if __name__ == "__main__":
    main()
