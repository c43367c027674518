"""Helpers shared by several test files: the CLI in-process, a Streamlit server, Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def cli(capfd, *argv: object) -> tuple[int, str, str]:
    """The real CLI entry point in this process; stdout/stderr captured at the fd level."""
    capfd.readouterr()
    rc = main([str(a) for a in argv])
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


def start_dashboard(log_path: Path, timeout_s: float = 120) -> DashboardServer:
    """`streamlit run dashboard/app.py` on a free loopback port, healthy when returned."""
    port = free_port()
    streamlit = Path(sys.executable).with_name("streamlit")
    cmd = [str(streamlit), "run", "dashboard/app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port)]
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path, timeout_s)
    except BaseException:
        stop(proc)
        raise
    return DashboardServer(url, log_path, proc)


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
