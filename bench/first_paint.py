"""First paint of the dashboard in a real browser: `python -m bench.first_paint [--root DIR]`.

Starts the dashboard as `make run` does (`python -m dashboard.serve`, or `streamlit run
dashboard/app.py` in a checkout without it) of this checkout, or of ``--root`` (to compare two
checkouts on the same machine in the same run), and times, in Debian's Chromium at 1440x900,
from navigation to the score chart drawn: the first session of a fresh server, then
``--warm`` further sessions one after another, then four sessions opened at the same moment
on another fresh server.

Two times per session: "chart", the first score chart on screen (the static SVG copy of
dashboard/charts_static.py, or Plotly's chart where that comes first or the checkout has no
static copy), and "interactive", Plotly's chart drawn. Two kinds of warm session: a *first
visit* opens a new browser context (empty HTTP cache: Streamlit's and Plotly's scripts are
downloaded and compiled again, as for a newcomer), a *returning browser* opens a new tab in
one context that has visited the page before (the scripts come from its HTTP cache:
Streamlit serves its hashed bundles ``immutable, max-age=1 year``).

Needs /usr/bin/chromium and Playwright (the test extras). Prints one line per measurement
and the load average, since on a shared machine the load decides the numbers more than
anything else.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, free_port, stop, wait_healthy

CHART = ".js-plotly-plot .boxlayer"  # Plotly's score chart drawn
# The static copy: a Markdown image (since 2026-12-06) or an `st.html` image (before).
STATIC_CHART = ".st-key-ps_static_chart img, img.ps-static-chart"
FIRST_CHART = f"{STATIC_CHART}, {CHART}"  # whichever score chart is on screen first
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


def _paint(browser, url: str, count: int, context=None) -> list[tuple[float, float]]:
    """Open ``count`` sessions at once (new browser contexts, or tabs of ``context``); for
    each, the seconds until a score chart is on screen and until Plotly's chart is drawn."""
    contexts = ([browser.new_context(viewport=VIEWPORT) for _ in range(count)]
                if context is None else [context] * count)
    pages = [c.new_page() for c in contexts]
    start = time.monotonic()
    for page in pages:
        page.goto(url, wait_until="commit")
    firsts = []
    for page in pages:
        page.wait_for_selector(FIRST_CHART, state="attached", timeout=300_000)
        firsts.append(time.monotonic() - start)
    seconds = []
    for page, first in zip(pages, firsts):
        page.wait_for_selector(CHART, timeout=300_000)
        seconds.append((first, time.monotonic() - start))
    for page in pages:
        page.close()
    if context is None:
        for own in contexts:
            own.close()
    return seconds


# Records, in the page, when each step of the first paint is first seen (performance.now()).
MARKS = """window.__marks = {};
const mark = (k, css) => { if (!(k in window.__marks) && document.querySelector(css))
    window.__marks[k] = performance.now(); };
new MutationObserver(() => {
  mark('app', '[data-testid=stApp]'); mark('tabs', '[role=tablist]');
  mark('static chart', '.st-key-ps_static_chart img, img.ps-static-chart');
  mark('plotly element', '.js-plotly-plot');
  mark('plotly chart', '.js-plotly-plot .boxlayer');
}).observe(document, {subtree: true, childList: true, attributes: true});"""


def _profile(browser, url: str, context=None) -> dict[str, float]:
    """One session's first paint step by step (ms since navigation): the HTML, Streamlit's
    bundle run (the app element), the websocket, the script's elements (tabs, the static
    chart), the Plotly chunk's download, its compile and run (to Plotly's first element), and
    Plotly's drawing; plus Chromium's script time for the whole page (CDP Performance)."""
    own = context is None
    context = context or browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.add_init_script(MARKS)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    opened: list[float] = []
    start = time.monotonic()
    page.on("websocket", lambda ws: opened.append((time.monotonic() - start) * 1000))
    page.goto(url, wait_until="commit")
    page.wait_for_selector(CHART, timeout=300_000)
    time.sleep(0.3)
    marks = page.evaluate("window.__marks")
    timing = page.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource');
        const plotly = res.find(r => /PlotlyChart\\.[^/]*\\.js$/.test(r.name));
        const js = res.filter(r => r.name.endsWith('.js'));
        return {html: nav.responseEnd, dom: nav.domContentLoadedEventEnd,
                plotlyStart: plotly ? plotly.startTime : null,
                plotlyEnd: plotly ? plotly.responseEnd : null,
                plotlyBytes: plotly ? plotly.transferSize : null,
                jsFiles: js.length, jsBytes: js.reduce((n, r) => n + r.transferSize, 0)};
    }""")
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    page.close()
    if own:
        context.close()
    return {"HTML received": timing["html"], "DOMContentLoaded": timing["dom"],
            "Streamlit app element": marks.get("app"), "websocket open": opened[0]
            if opened else None, "tabs drawn": marks.get("tabs"),
            "static chart": marks.get("static chart"),
            "Plotly chunk requested": timing["plotlyStart"],
            "Plotly chunk received": timing["plotlyEnd"],
            "Plotly element (chunk compiled and run)": marks.get("plotly element"),
            "Plotly chart drawn": marks.get("plotly chart"),
            "script files": timing["jsFiles"], "script MB transferred": timing["jsBytes"] / 1e6,
            "Chromium script time (s)": metrics.get("ScriptDuration"),
            "Chromium task time (s)": metrics.get("TaskDuration")}


def _print_profile(what: str, steps: dict[str, float]) -> None:
    print(f"{what}:", flush=True)
    for name, value in steps.items():
        if value is not None:
            unit = "" if name.startswith(("script ", "Chromium ")) else " ms"
            print(f"  {name:42s} {value:9.1f}{unit}", flush=True)


def _line(what: str, times: list[tuple[float, float]]) -> str:
    return (f"{what}: chart " + ", ".join(f"{c:.2f}" for c, _ in times) + " s; interactive "
            + ", ".join(f"{i:.2f}" for _, i in times) + " s")


def _alternate(browser, roots: dict[str, Path], rounds: int, tmp: Path) -> None:
    """Warm sessions of two checkouts' servers, one after the other in turn, so that both
    meet the same load: per round a first visit and a returning browser for each."""
    servers = {name: _server(root, tmp / f"{name}.log")[:2] for name, root in roots.items()}
    try:
        returning = {}
        for name, (url, _proc) in servers.items():
            returning[name] = browser.new_context(viewport=VIEWPORT)
            _paint(browser, url, 1, returning[name])  # the server's first session
        for i in range(rounds):
            for name, (url, _proc) in servers.items():
                print(_line(f"{name} ({roots[name]}), warm server, first visit {i + 1}",
                            _paint(browser, url, 1)), flush=True)
                print(_line(f"{name} ({roots[name]}), warm server, returning browser {i + 1}",
                            _paint(browser, url, 1, returning[name])), flush=True)
        for context in returning.values():
            context.close()
    finally:
        for _url, proc in servers.values():
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="only the step-by-step timeline of a first visit and of a "
                        "returning browser on a warm server")
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout: only warm sessions, alternating between a "
                        "server of --root and one of DIR (same load for both)")
    parser.add_argument("--no-four", action="store_true",
                        help="skip the four sessions at once (a second fresh server)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        print(f"load average at the start: {os.getloadavg()[0]:.1f} (2 cores)", flush=True)
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=CHROMIUM_ARGS)
        if args.against is not None:
            _alternate(browser, {"root": args.root, "against": args.against}, args.warm,
                       Path(tmp))
            browser.close()
            print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores)", flush=True)
            return
        url, proc, started = _server(args.root, Path(tmp) / "fresh.log")
        if args.profile:
            try:
                _paint(browser, url, 1)  # the server's first session
                returning = browser.new_context(viewport=VIEWPORT)
                _print_profile("warm server, first visit", _profile(browser, url))
                _profile(browser, url, returning)
                _print_profile("warm server, returning browser",
                               _profile(browser, url, returning))
            finally:
                stop(proc)
            print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores)", flush=True)
            return
        try:
            returning = browser.new_context(viewport=VIEWPORT)  # its first visit is this one
            first = _paint(browser, url, 1, returning)
            print(_line("fresh server, first visit", first)
                  + f" ({time.monotonic() - started:.2f} s after the server was started)",
                  flush=True)
            for i in range(args.warm):
                print(_line(f"warm server, first visit {i + 1}", _paint(browser, url, 1)),
                      flush=True)
                print(_line(f"warm server, returning browser {i + 1}",
                            _paint(browser, url, 1, returning)), flush=True)
            returning.close()
        finally:
            stop(proc)
        if not args.no_four:
            url, proc, _started = _server(args.root, Path(tmp) / "four.log")
            try:
                print(_line("fresh server, 4 first visits at once", _paint(browser, url, 4)),
                      flush=True)
            finally:
                stop(proc)
        browser.close()
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores)", flush=True)


if __name__ == "__main__":
    main()
