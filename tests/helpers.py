"""Helpers shared by several test files: the CLI in-process, a Streamlit server, Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"  # the browser tests' screenshots
STEP_TIMEOUT_MS = 120_000  # one browser step (a first prune on a loaded machine takes a while)
APP = str(ROOT / "dashboard" / "app.py")


def cli(capfd, *argv: object) -> tuple[int, str, str]:
    """The real CLI entry point in this process; stdout/stderr captured at the fd level.
    `prune` runs with --no-latency unless the test asks for --latency (timing both models
    costs seconds that only the latency tests need)."""
    capfd.readouterr()
    args = [str(a) for a in argv]
    if args[:1] == ["prune"] and "--latency" not in args and "--no-latency" not in args:
        args.append("--no-latency")
    rc = main(args)
    out, err = capfd.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """stderr must be exactly the tool's own one-line error."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("prunescope: error: ")
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Wait for a Streamlit server's health endpoint; fail with its log if it dies or stalls."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited early:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"streamlit did not become healthy:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


@dataclass
class DashboardServer:
    url: str
    log: Path  # the server's stdout and stderr
    proc: subprocess.Popen
    startup_bytes: int = 0  # the log's size when the server became healthy

    def log_mark(self) -> int:
        """Where the log ends now: `log_since(mark)` reads what a test made the server write
        (the server is shared by the browser tests of one worker)."""
        return self.log.stat().st_size

    def log_since(self, mark: int) -> str:
        with open(self.log, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def startup_log(self) -> str:
        """What the server wrote before it became healthy (its start-up banner)."""
        return self.log.read_bytes()[: self.startup_bytes].decode(errors="replace")


def start_dashboard(log_path: Path, timeout_s: float = 300, args: tuple[str, ...] = (),
                    env: dict[str, str] | None = None) -> DashboardServer:
    """The dashboard as `make run` starts it (`python -m dashboard.serve`: `streamlit run
    dashboard/app.py` with the demo warmed up) on a free loopback port, healthy when returned;
    ``args``: more Streamlit options, ``env``: the server's environment (default: ours)."""
    port = free_port()
    cmd = [sys.executable, "-m", "dashboard.serve", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), *args]
    env = {**(os.environ if env is None else env), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path, timeout_s)
    except BaseException:
        stop(proc)
        raise
    return DashboardServer(url, log_path, proc, startup_bytes=log_path.stat().st_size)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder nobody can create files in, root included (chmod alone does not stop root)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked, Path("/sys")):
        try:
            (candidate / "probe").touch()
        except OSError:
            return candidate
        (candidate / "probe").unlink()
    pytest.fail("found no unwritable folder to test with")


def wait_for(probe, timeout_s: float = 60.0):
    """Poll ``probe`` until it returns something truthy (Streamlit swaps elements in place)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError("the page did not reach the expected state in time")


def assert_equals_mask_mode(result, rtol: float = 1e-4) -> None:
    """The pruned model's outputs equal mask mode's (`engine.masked`: the original graph with
    the pruned channels zeroed) on the example inputs, compared here rather than read from
    report["verification"], so a broken verifier cannot make an exactness test vacuous.
    `rtol` is relative to the largest masked output."""
    import torch
    from torch.utils import _pytree as pytree

    import engine

    assert not result.analysis.captured.example_kwargs, "mask mode takes positional inputs"
    inputs = result.example_inputs

    def floats(out):
        return [t for t in pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.is_floating_point()]

    with torch.no_grad():
        want = floats(engine.masked(result.analysis, result.plan)(*inputs))
        got = floats(result.module(*inputs))
    assert want and len(want) == len(got)
    scale = max(float(w.abs().max()) for w in want if w.numel())
    for w, g in zip(want, got):
        assert w.shape == g.shape
        diff = float((w.double() - g.double()).abs().max()) if w.numel() else 0.0
        assert diff <= rtol * scale, f"pruned vs mask mode: {diff:.3g} (scale {scale:.3g})"


# ----------------------------------------------------------------------------- browser pages


class ScriptRuns:
    """One page's Streamlit session as its websocket shows it: the runs the page asked for
    (``rerun_script`` messages), the runs the server started (``new_session``) and finished
    (``script_finished``, not counting a run cut short for the next one), when the last
    frame went either way, and the file uploads in flight (an upload's rerun is asked for
    once its PUT is answered; a file the uploader refuses is never sent)."""

    def __init__(self, page) -> None:
        self.events: list[str] = []  # "asked", "started", "finished", in arrival order
        self.last_frame = time.monotonic()
        self.uploads = 0
        page.on("websocket", self._watch)
        page.on("request", self._upload_started)
        page.on("requestfinished", self._upload_ended)
        page.on("requestfailed", self._upload_ended)

    @staticmethod
    def _is_upload(request) -> bool:
        return request.method == "PUT" and "/_stcore/upload_file/" in request.url

    def _upload_started(self, request) -> None:
        if self._is_upload(request):
            self.uploads += 1

    def _upload_ended(self, request) -> None:
        if self._is_upload(request):
            self.uploads -= 1
            self.last_frame = time.monotonic()

    def _watch(self, ws) -> None:
        if ws.url.endswith("/_stcore/stream"):
            ws.on("framesent", self._sent)
            ws.on("framereceived", self._received)

    def _sent(self, payload) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        self.last_frame = time.monotonic()
        if isinstance(payload, bytes):
            kind = BackMsg.FromString(payload).WhichOneof("type")
            if kind == "rerun_script":
                self.events.append("asked")

    def _received(self, payload) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.last_frame = time.monotonic()
        if isinstance(payload, bytes):
            msg = ForwardMsg.FromString(payload)
            kind = msg.WhichOneof("type")
            if kind == "new_session":
                self.events.append("started")
            elif (kind == "script_finished"
                  and msg.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN):
                self.events.append("finished")

    def settled(self) -> bool:
        """The last run asked for has started and finished (a request the server merged into
        a run already going counts as answered by that run's successor)."""
        last = {e: max((i for i, x in enumerate(self.events) if x == e), default=-1)
                for e in ("asked", "started", "finished")}
        return self.uploads == 0 and last["asked"] < last["started"] < last["finished"]


_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # page -> its ScriptRuns
QUIET_S = 0.15  # a widget may send its rerun this long after the action (Streamlit debounces)
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def new_page(owner, **kwargs):
    """``owner.new_page(**kwargs)`` (a browser or a context) whose Streamlit runs settle()
    follows on the page's websocket, with STEP_TIMEOUT_MS for every step."""
    page = owner.new_page(**kwargs)
    page.set_default_timeout(STEP_TIMEOUT_MS)
    _RUNS[page] = ScriptRuns(page)
    return page


def settle(page, pause_s: float = 0.4, timeout_ms: int = STEP_TIMEOUT_MS) -> None:
    """Wait until Streamlit has finished its script run (stale elements are then gone).

    On a page of new_page(): no upload is in flight, every run the page asked for has
    finished, the websocket has been quiet for QUIET_S (a debounced widget or a finished
    upload asks a little after the action), the page shows it is idle, and it has drawn a
    frame since. Elsewhere: the idle state twice, ``pause_s`` apart (a run can start right
    after the first idle sighting)."""
    runs = _RUNS.get(page)
    if runs is None:
        for _ in range(2):
            page.wait_for_selector(IDLE, timeout=timeout_ms)
            time.sleep(pause_s)
        return
    deadline = time.monotonic() + timeout_ms / 1000
    quiet_from = time.monotonic()
    while not (runs.settled()
               and time.monotonic() - max(runs.last_frame, quiet_from) >= QUIET_S):
        if time.monotonic() > deadline:
            raise AssertionError(f"Streamlit's runs did not settle: {runs.events[-8:]}")
        page.wait_for_timeout(50)  # lets Playwright deliver the websocket's frames
    page.wait_for_selector(IDLE, timeout=timeout_ms)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def netron_laid_out(frame, timeout_s: float = STEP_TIMEOUT_MS / 1000) -> None:
    """Wait until Netron, in ``frame`` (a frame locator), has drawn its graph and stopped
    moving it: the canvas' box and node count equal in two readings 0.2 s apart (Netron
    replaces window.eval, so the frame is read through locators only)."""
    canvas, nodes = frame.locator("svg#canvas"), frame.locator("svg#canvas g.node")
    nodes.first.wait_for(timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        now = (canvas.bounding_box(), nodes.count())
        if now == seen:
            return
        seen = now
        time.sleep(0.2)
    raise AssertionError("Netron kept moving its graph")


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """test-artifacts/NAME once the page has settled; a real rendering, not a blank page."""
    settle(page)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 10_000
    return path


def choose(page, label: str, value: str) -> None:
    """Pick `value` in the selectbox labelled `label`."""
    box = page.get_by_test_id("stSelectbox").filter(has_text=label).first
    box.click()
    page.get_by_role("option", name=value, exact=True).click()


# ----------------------------------------------------------------------------- AppTest


def open_app(timeout_s: float = 300):
    """dashboard/app.py under streamlit.testing AppTest, run once, without an error."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=timeout_s).run()
    app_ok(at)
    return at


def app_ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def active_model(at):
    """The session's active model entry."""
    return at.session_state["_ps_models"][at.session_state["_ps_active_model"]]


def chart_spec(at, key: str) -> dict:
    """The Plotly figure of the chart with widget key `key`, as a dict."""
    import json

    found = [el for el in at.get("plotly_chart") if getattr(el, "key", None) == key]
    assert found, f"no chart {key!r} on the page"
    return json.loads(found[0].proto.spec)


def ridge_reference(x, y, w, b, ridge: float):
    """The recovery `lsq` fit worked out independently, in numpy:
    min ||X W^T + b - Y||^2 + lam ||W - W0||^2 (+ a negligible pull on b)."""
    x, y, w, b = (np.asarray(t, dtype=np.float64) for t in (x, y, w, b))
    a = np.hstack([x, np.ones((len(x), 1))])
    gram = a.T @ a
    lam = np.full(x.shape[1] + 1, ridge * np.mean(np.diag(gram)[:-1]))
    lam[-1] = 1e-10 * max(len(x), 1.0)
    prior = np.vstack([w.T, b[None, :]])
    theta = np.linalg.solve(gram + np.diag(lam), a.T @ y + lam[:, None] * prior)
    return theta[:-1].T, theta[-1]
