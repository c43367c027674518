"""Safety of the dashboard as a shared server: sessions, temp folders, Netron, limits, errors.

One real server as `make run` starts it (`python -m dashboard.serve`; upload limit lowered to
1 MB, its own TMPDIR so every session folder it makes can be seen, a short reconnect window
and sweep interval so a closed session's cleanup can be observed) driven by Debian's Chromium
through Playwright, with one browser context per session. Screenshots land in
test-artifacts/safety-*.png.

The browser tests run in file order and share the server: the first opens four sessions at
once on it while it is fresh, the last of them stops it.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import stat
import subprocess
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engine.demo import load_demo_eval
from tests.helpers import (
    ROOT,
    choose,
    new_page,
    screenshot,
    settle,
    start_dashboard,
    stop,
    wait_for,
)

STEP_TIMEOUT_MS = 60_000
UPLOAD_LIMIT_MB = 1
RECONNECT_TTL_S = 2  # how long a closed session is kept for a reconnect
SWEEP_S = 1  # the background sweeper's interval
FRAMES = "iframe[src^='http://127.0.0.1']"

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- server


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    temp: Path  # the server's TMPDIR: every session folder it makes is in here
    orphan: Path  # a folder left by a "killed" earlier server, to be removed at start
    live: Path  # a folder of a process that is still running: never touched
    log: Path
    sessions: int = 0  # browser sessions opened on it so far


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    temp = tmp_path_factory.mktemp("server-tmp")
    orphan = temp / f"prunescope-{_dead_pid()}-leftover"
    orphan.mkdir(mode=0o700)
    (orphan / "old-upload.pt2").write_bytes(b"left by a killed server")
    live = temp / f"prunescope-{os.getpid()}-live"
    live.mkdir(mode=0o700)
    log_path = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    env = {**os.environ, "TMPDIR": str(temp), "PRUNESCOPE_SWEEP_S": str(SWEEP_S)}
    env.pop("PRUNESCOPE_MODEL", None)
    started = start_dashboard(log_path, env=env, args=(
        "--server.maxUploadSize", str(UPLOAD_LIMIT_MB),
        "--server.disconnectedSessionTTL", str(RECONNECT_TTL_S)))
    try:
        yield Server(url=started.url, proc=started.proc, temp=temp, orphan=orphan, live=live,
                     log=log_path)
    finally:
        stop(started.proc)


# ----------------------------------------------------------------------------- page helpers


def _open_session(browser, server: Server):
    """A new browser context is a new Streamlit session (its own cookies and websocket)."""
    server.sessions += 1
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    page = new_page(context)
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(server.url)
    page.wait_for_selector(".js-plotly-plot .boxlayer")
    _settle(page)
    return context, page


def _settle(page) -> None:
    settle(page, pause_s=0.3, timeout_ms=STEP_TIMEOUT_MS)


def _shot(page, name: str) -> None:
    screenshot(page, f"safety-{name}.png")


def _choose(page, label: str, value: str) -> None:
    choose(page, label, value)
    _settle(page)


def _selected(page, label: str) -> str:
    return page.get_by_role("combobox", name=label, exact=True).input_value()


def _ratio(page) -> str:
    return page.locator(".st-key-opt_ratio").get_by_test_id("stSliderThumbValue").inner_text()


def _metric(page, label: str) -> str:
    box = page.get_by_test_id("stMetric").filter(has_text=label).first
    return box.get_by_test_id("stMetricValue").inner_text().strip()


def _rerun(page) -> None:
    """Make the session run its page again (a tab switch reruns) and come back to Scores."""
    page.get_by_role("tab", name="Plan").click()
    page.get_by_text("Frozen layers").wait_for()
    page.get_by_role("tab", name="Scores").click()
    page.wait_for_selector(".js-plotly-plot .boxlayer")
    _settle(page)


def _source(page, name: str) -> None:
    page.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()
    _settle(page)


def _model_caption(page) -> str:
    return page.get_by_text("prunable groups ·").first.inner_text()


def _overview_medians(page) -> list | None:
    return page.evaluate(
        """() => {
            const plot = document.querySelector('.st-key-chart_overview .js-plotly-plot')
                      || document.querySelector('.js-plotly-plot');
            const kept = plot && plot.data && plot.data.find(t => t.name === 'kept');
            return kept ? Array.from(kept.median) : null;
        }"""
    )


def _errors(page) -> list[str]:
    return [e.get_by_test_id("stMarkdownContainer").inner_text()
            for e in page.get_by_test_id("stAlertContentError").all()]


def _assert_one_readable_error(page, *words: str) -> str:
    """Exactly one error box, one line, no traceback, naming ``words``."""
    _settle(page)
    assert page.get_by_test_id("stException").count() == 0
    errors = _errors(page)
    assert len(errors) == 1, errors
    message = errors[0].strip()
    assert "Traceback" not in message and "\n" not in message, message
    assert 'File "' not in message, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    return message


def _upload(page, key: str, path: Path) -> None:
    page.locator(f".st-key-{key} input[type='file']").set_input_files(str(path))
    _settle(page)


# ----------------------------------------------------------------------------- process helpers


def _listeners(pid: int) -> dict[int, set[str]]:
    """Listening TCP ports of process ``pid``: port -> the addresses it is bound to."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found: dict[int, set[str]] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            host, port = cols[1].split(":")
            found.setdefault(int(port, 16), set()).add(_address(host, v6))
    return found


def _address(hex_host: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_host)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc stores an IPv6 address as four little-endian 32-bit words.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def _session_folders(server: Server) -> list[Path]:
    """The folders the server made (the planted ones excluded)."""
    return sorted(p for p in server.temp.iterdir()
                  if p.name.startswith("prunescope-") and p not in (server.orphan, server.live))


class _Tiny(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def _export_tiny(path: Path, width: int) -> Path:
    torch.manual_seed(width)
    program = torch.export.export(_Tiny(width).eval(), (torch.randn(2, 1, 8, 8),))
    torch.export.save(program, str(path))
    return path


def _served_conv_widths(frame_url: str) -> set[int]:
    """Output widths of the 4-D weights in the ONNX file a Netron server serves."""
    with urllib.request.urlopen(frame_url, timeout=10) as page:
        html = page.read().decode()
    name = html.split('<meta name="file" content="/data/', 1)[1].split('"', 1)[0]
    with urllib.request.urlopen(frame_url + "data/" + name, timeout=10) as data:
        model = onnx.load_from_string(data.read())
    return {int(t.dims[0]) for t in model.graph.initializer if len(t.dims) == 4}


# ----------------------------------------------------------------------------- 1-3: sessions


SESSIONS = 4


def test_four_sessions_open_at_once(server, browser):
    """Four people open a fresh server at the same moment: every page paints its chart.
    (The first test of this file: the server is fresh; its closed sessions then leave no
    folder behind.)"""
    assert server.sessions == 0, "the server is not fresh: this test must come first"
    server.sessions += SESSIONS
    contexts = [browser.new_context(viewport={"width": 1440, "height": 900})
                for _ in range(SESSIONS)]
    pages = [new_page(c) for c in contexts]
    start = time.monotonic()
    for page in pages:
        page.goto(server.url, wait_until="commit")
    painted = []
    for page in pages:  # first: does every session paint at all, without an error?
        page.wait_for_selector(".js-plotly-plot .boxlayer", timeout=STEP_TIMEOUT_MS)
        painted.append(round(time.monotonic() - start, 1))
    for page in pages:
        settle(page)
        assert page.locator("[data-testid='stException']").count() == 0
        errors = page.locator("[data-testid='stAlertContentError']").all_inner_texts()
        assert not errors, errors
    # How soon is a benchmark's question (bench/first_paint.py), not a wall-clock assert
    # on a shared machine; here each page has STEP_TIMEOUT_MS, a guard against a hang.
    print(f"seconds to the chart, four sessions at once: {painted}")
    log = server.log.read_text()
    assert "Traceback" not in log and "already set" not in log, log[-3000:]
    for context in contexts:
        context.close()
    wait_for(lambda: not _session_folders(server), timeout_s=30)


def test_two_sessions_are_isolated(server, browser, tmp_path):
    ctx_a, a = _open_session(browser, server)
    ctx_b, b = _open_session(browser, server)
    try:
        _check_two_sessions(server, a, b, ctx_a, tmp_path)
    finally:
        ctx_b.close()
        ctx_a.close()


def _check_two_sessions(server: Server, a, b, ctx_a, tmp_path: Path) -> None:
    b_medians = _overview_medians(b)
    assert b_medians

    # Session A changes its options; B keeps the defaults and its chart.
    _choose(a, "Layer norm", "tss_norm")
    a.locator(".st-key-opt_ratio input[type='range']").focus()
    a.keyboard.press("Home")  # ratio 0.00
    _settle(a)
    wait_for(lambda: _metric(a, "Channels to prune") == "0")
    assert _ratio(a) == "0.00"
    assert _selected(a, "Layer norm") == "tss_norm"
    a.get_by_text("layer norm tss_norm").first.wait_for()
    _shot(a, "session-a-options")
    _rerun(b)  # B's page runs again after A's changes
    assert _selected(b, "Layer norm") == "standard_score"
    assert _ratio(b) == "0.50"
    assert int(_metric(b, "Channels to prune")) > 0
    assert b.get_by_text("layer norm standard_score").first.is_visible()
    assert _overview_medians(b) == b_medians

    # Session B changes the policy; A keeps its own options.
    _choose(b, "Policy", "sum")
    assert _selected(b, "Policy") == "sum"
    _settle(a)
    assert _selected(a, "Policy") == "average" and _selected(a, "Layer norm") == "tss_norm"
    assert _ratio(a) == "0.00" and _metric(a, "Channels to prune") == "0"

    # A loads a model from a path; B uploads a different model under the same file name.
    path_a = _export_tiny(tmp_path / "tiny.pt2", width=8)
    upload_b = _export_tiny(_mkdir(tmp_path / "b") / "tiny.pt2", width=6)
    _source(a, "Local file path")
    a.locator(".st-key-local_path input").fill(str(path_a))
    a.locator(".st-key-local_path input").press("Enter")
    wait_for(lambda: "16 channels" in _model_caption(a))
    _source(b, "Upload .pt2")
    _upload(b, "upload_pt2", upload_b)
    wait_for(lambda: "12 channels" in _model_caption(b))
    assert "upload tiny.pt2" in _model_caption(b)
    _settle(a)
    assert "16 channels" in _model_caption(a) and str(path_a) in _model_caption(a)
    assert a.get_by_test_id("stException").count() == b.get_by_test_id("stException").count() == 0
    _shot(a, "session-a-path-model")
    _shot(b, "session-b-upload")

    # Each session's Graphs tab gets its own Netron server on 127.0.0.1 serving its own file.
    urls = {}
    for name, page in (("a", a), ("b", b)):
        page.get_by_role("tab", name="Graphs").click()
        page.locator(FRAMES).first.wait_for()
        _settle(page)
        assert page.locator(FRAMES).count() == 1  # not pruned yet: the original only
        urls[name] = page.locator(FRAMES).first.get_attribute("src")
    assert urls["a"] != urls["b"]
    assert _served_conv_widths(urls["a"]) == {8}
    assert _served_conv_widths(urls["b"]) == {6}
    _shot(b, "session-b-graphs")

    listening = _listeners(server.proc.pid)
    streamlit_port = _port(server.url)
    netron_ports = {_port(u) for u in urls.values()}
    for port in netron_ports:
        assert listening.get(port) == {"127.0.0.1"}, listening  # loopback only, no 0.0.0.0/::
    assert set(listening) == {streamlit_port} | netron_ports, listening

    # Reruns (an option change with the Graphs tab open) reuse the servers: none are added.
    _choose(a, "Layer norm", "linear_scaling")
    a.locator(".st-key-opt_ratio input[type='range']").focus()
    a.keyboard.press("End")
    _settle(a)
    assert _ratio(a) == "0.95"
    assert a.locator(FRAMES).first.get_attribute("src") == urls["a"]
    assert set(_listeners(server.proc.pid)) == {streamlit_port} | netron_ports

    # One private folder per session under the server's temp dir; the killed server's
    # leftover folder is gone; B's upload is in one of them, A's path model is not copied.
    folders = _session_folders(server)
    assert not server.orphan.exists()
    assert server.live.is_dir()  # another live process's folder is left alone
    assert len(folders) == 2, folders
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert folder.stat().st_uid == os.getuid()
    uploads = [p for f in folders for p in f.rglob("tiny.pt2")]
    assert len(uploads) == 1 and uploads[0].read_bytes() == upload_b.read_bytes()
    (folder_b,) = [f for f in folders if uploads[0].is_relative_to(f)]
    (folder_a,) = [f for f in folders if f != folder_b]

    # A closes its tab: its folder and its Netron server go, with no other session active.
    ctx_a.close()
    wait_for(lambda: not folder_a.exists(), timeout_s=30)
    wait_for(lambda: _port(urls["a"]) not in _listeners(server.proc.pid), timeout_s=10)
    assert folder_b.exists() and uploads[0].exists()
    assert _port(urls["b"]) in _listeners(server.proc.pid)
    # B is untouched and still works.
    b.get_by_role("tab", name="Scores").click()
    _choose(b, "Layer norm", "none")
    b.get_by_text("layer norm none").first.wait_for()
    assert "12 channels" in _model_caption(b)
    assert b.get_by_test_id("stException").count() == 0
    _shot(b, "session-b-after-a-closed")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- 4-5: input


def _payload(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is unpickled (what a hostile .pt could do)."""

    class Payload:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).touch()",))

    buf = io.BytesIO()
    torch.save({"model": Payload()}, buf)
    return buf.getvalue()


def test_payload_would_run_if_loaded(tmp_path):
    """The control for the pickle checks below: loading this payload does run its code."""
    marker = tmp_path / "control-marker"
    torch.load(io.BytesIO(_payload(marker)), weights_only=False)
    assert marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(_payload(tmp_path / "other")), weights_only=True)


def test_limit_and_bad_inputs_are_one_readable_message(server, browser, tmp_path):
    context, page = _open_session(browser, server)
    try:
        _check_bad_inputs(server, page, tmp_path)
    finally:
        context.close()


def _check_bad_inputs(server: Server, page, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    # 4. The upload limit is stated, and a file over it is refused with a readable message.
    _source(page, "Upload .pt2")
    limit_text = f"Uploads up to {UPLOAD_LIMIT_MB} MB"
    assert page.get_by_text(limit_text).first.is_visible()
    big = tmp_path / "big.pt2"
    big.write_bytes(os.urandom(2 * 1024 * 1024))
    page.locator(".st-key-upload_pt2 input[type='file']").set_input_files(str(big))
    _settle(page)
    chip = page.locator(".st-key-upload_pt2").get_by_test_id("stFileChip")
    assert chip.get_attribute("aria-invalid") == "true"  # refused, shown in red
    chip.hover()
    reason = page.get_by_test_id("stTooltipErrorContent")
    reason.wait_for()
    assert f"{UPLOAD_LIMIT_MB}.0MB or smaller" in reason.inner_text()
    _shot(page, "upload-too-large")
    assert page.get_by_test_id("stException").count() == 0
    assert _errors(page) == []
    assert "built-in demo" in _model_caption(page)  # nothing was loaded
    assert not [p for f in _session_folders(server) for p in f.rglob("big.pt2")]
    _choose(page, "Layer norm", "tss_norm")  # and the page still works
    page.get_by_text("layer norm tss_norm").first.wait_for()

    # 5a. Random bytes as a .pt2.
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    _upload(page, "upload_pt2", junk)
    message = _assert_one_readable_error(page, "junk.pt2", "not a readable")
    assert "prunescope-" not in message  # the upload's name, not the server's temp path
    _shot(page, "random-pt2")

    # 5b. A pickle payload renamed .pt2 is not unpickled.
    disguised = tmp_path / "disguised.pt2"
    disguised.write_bytes(_payload(marker))
    _upload(page, "upload_pt2", disguised)
    _assert_one_readable_error(page, "disguised.pt2")
    assert not marker.exists()
    _shot(page, "pickle-as-pt2")

    # 5c. A pickle .pt upload: no upload at all until the trust box is ticked.
    _source(page, "Upload .pt (pickle)")
    assert page.locator(".st-key-upload_pt input[type='file']").is_disabled()
    payload = tmp_path / "payload.pt"
    payload.write_bytes(_payload(marker))
    try:  # a disabled uploader refuses the file; either way the code must not run
        page.locator(".st-key-upload_pt input[type='file']").set_input_files(
            str(payload), timeout=5_000)
    except Exception:
        pass
    _settle(page)
    assert not marker.exists()
    assert page.get_by_test_id("stException").count() == 0
    assert "built-in demo" in _model_caption(page)

    # 5d. The same pickle through a local path without the tick: refused, not run.
    _source(page, "Local file path")
    page.locator(".st-key-local_path input").fill(str(payload))
    page.locator(".st-key-local_path input").press("Enter")
    _assert_one_readable_error(page, "payload.pt", "pickle", "trust")
    assert not marker.exists()
    _shot(page, "pickle-untrusted")

    # 5e. Calibration data of the wrong shape for nuclear_norm (demo takes (N, 1, 8, 8)).
    _source(page, "Demo model")
    _settle(page)
    assert _errors(page) == []
    _choose(page, "Criterion", "nuclear_norm")
    bad = tmp_path / "calib.npz"
    np.savez(bad, x=np.zeros((4, 3, 5, 5), np.float32))
    _upload(page, "upload_eval", bad)
    message = _assert_one_readable_error(page, "shape", "(4, 3, 5, 5)")
    assert "8, 8" in message
    _shot(page, "calibration-wrong-shape")
    # The page stays usable: matching data scores and draws.
    good = tmp_path / "calib-ok.npz"
    x, y = load_demo_eval()
    np.savez(good, x=x[:32], y=y[:32])
    _upload(page, "upload_eval", good)
    _settle(page)
    assert _errors(page) == []
    assert page.get_by_text("criterion nuclear_norm").first.is_visible()
    assert "calib-ok.npz (32 samples)" in _model_caption(page)
    assert page.get_by_test_id("stException").count() == 0


def test_configured_upload_limit_is_stated_on_the_page(monkeypatch):
    """The limit the page states is the one .streamlit/config.toml sets for `make run`."""
    from streamlit.testing.v1 import AppTest

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    limit = int(config["server"]["maxUploadSize"])
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=240)
    at.session_state["source"] = "Upload .pt2"
    at.run()
    assert not at.exception
    captions = [c.value for c in at.sidebar.caption]
    assert any(f"Uploads up to {limit} MB" in c for c in captions), captions


def test_unexpected_page_error_is_one_line_not_a_traceback():
    """Page-level code outside the tabs: a broken value in the session (here: evaluation
    data that is not EvalData) must end as one message, not Streamlit's traceback box."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=240)
    at.session_state["_ps_eval"] = ("demo", "not evaluation data")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    (error,) = at.error
    assert error.value.startswith("Something went wrong: AttributeError")
    assert "\n" not in error.value and "Traceback" not in error.value


# ----------------------------------------------------------------------------- 3: app stop


def test_stopping_the_server_removes_every_session_folder(server, browser):
    context, page = _open_session(browser, server)
    _source(page, "Upload .pt2")  # a session folder exists once the page has run
    folders = _session_folders(server)
    assert folders and all(f.is_dir() for f in folders)
    context.close()
    server.proc.terminate()
    server.proc.wait(timeout=30)
    assert _session_folders(server) == [], server.log.read_text()[-2000:]
    assert server.live.is_dir()


# ----------------------------------------------------------------------------- cache keys


def test_rewritten_file_gets_a_new_cache_key_even_with_same_size_and_mtime(tmp_path):
    """Model and Netron keys must change when a file's content is replaced, even if the
    rewrite keeps its name, its size and (via os.utime) its modification time."""
    from dashboard import netron_server, sources

    path = tmp_path / "model.pt2"
    path.write_bytes(b"A" * 64)
    before = os.stat(path)
    model_key = sources.path_request(path).key
    netron_key = netron_server._key(path)
    time.sleep(0.01)  # let the clock move on, so the rewrite's ctime differs
    path.write_bytes(b"B" * 64)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert sources.path_request(path).key != model_key
    assert netron_server._key(path) != netron_key
    # Unchanged files keep their key (reruns must hit the caches).
    assert sources.path_request(path).key == sources.path_request(path).key
