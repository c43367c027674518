"""Fixtures shared by several test files."""

from __future__ import annotations

import os
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

def pytest_configure(config: pytest.Config) -> None:
    # `--dist loadfile` hands out whole files in collection order (the order below); xdist's
    # own reordering (by number of tests per file) would put the one-test browser and
    # training files last, where one worker ends up with several of them while the other idles.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with a test marked slow run first, then the rest by number of tests (most
    first): longest first is what keeps two workers busy to the end. A file's tests stay
    together and in their order (module fixtures and in-file sequences rely on that)."""
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item)

    def heavy_first(path: str) -> tuple[bool, int]:
        tests = by_file[path]
        return (not any(t.get_closest_marker("slow") for t in tests), -len(tests))

    items[:] = [item for path in sorted(by_file, key=heavy_first) for item in by_file[path]]


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch thread each, not two competing
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _main_module_restored():
    """Streamlit's script runner (AppTest) installs the page as sys.modules["__main__"] and
    leaves it there; a later test whose engine call starts spawned workers would make each
    worker run that page. Every test starts with the real main module."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture(scope="module")
def tiny_pt2(tmp_path_factory) -> Path:
    """tests.zoo.Tiny saved as a .pt2 (example inputs of shape (2, 3, 6, 6) inside)."""
    model, inputs = tiny()
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt2"
    torch.export.save(torch.export.export(model, inputs), path)
    return path


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (which never downloads a browser here); one per
    xdist worker: each test opens its own page or context (its own cookies and session)."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    assert Path(CHROMIUM).is_file(), (
        f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium"
    )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def dashboard_server(tmp_path_factory):
    """`streamlit run dashboard/app.py` on a free loopback port, for the browser tests:
    ``.url`` and ``.log`` (the server's stdout and stderr). One server per xdist worker,
    shared by every browser test that needs no fresh one (a new page is a new Streamlit
    session; starting a server and its first script run cost tens of CPU seconds). A test
    that reads the log reads its own part: ``log_mark()`` / ``log_since(mark)``."""
    from tests.helpers import start_dashboard, stop

    server = start_dashboard(tmp_path_factory.mktemp("streamlit") / "streamlit.log")
    try:
        yield server
    finally:
        stop(server.proc)


@pytest.fixture(scope="session")
def dashboard_url(dashboard_server):
    return dashboard_server.url
