"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.zoo import tiny

try:  # a required dependency: a broken install fails the run instead of skipping whole files
    import transformers  # noqa: F401
except Exception as exc:  # noqa: BLE001 - whatever breaks the import
    raise pytest.UsageError(f"transformers does not import ({type(exc).__name__}: {exc}); "
                            "it is required (pip install -e '.[test]')") from exc

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch thread each, not two competing
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_pt2(tmp_path_factory) -> Path:
    """tests.zoo.Tiny saved as a .pt2 (example inputs of shape (2, 3, 6, 6) inside)."""
    model, inputs = tiny()
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt2"
    torch.export.save(torch.export.export(model, inputs), path)
    return path


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (which never downloads a browser here)."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    assert Path(CHROMIUM).is_file(), (
        f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium"
    )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory):
    """`streamlit run dashboard/app.py` on a free loopback port, for the browser tests."""
    from tests.helpers import free_port, stop, wait_healthy

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    streamlit = Path(sys.executable).with_name("streamlit")
    cmd = [str(streamlit), "run", "dashboard/app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port)]
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path, 120)
        yield url
    finally:
        stop(proc)
