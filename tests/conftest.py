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

# The files whose tests drive Chromium: one xdist worker runs them all, one after another, so
# that one Chromium and one Streamlit server (the session fixtures below, whose start and
# first script run cost tens of CPU seconds) serve every one of them.
BROWSER_FILES = (
    "tests/test_dashboard_safety.py",
    "tests/test_dashboard_frame_browser.py",
    "tests/test_dashboard_browser.py",
    "tests/test_dashboard_ux_browser.py",
    "tests/test_dashboard_compare_browser.py",
)
BROWSER_UNIT = "browser files"
# Seconds each file took in the last complete run here (pytest's cache, .pytest_cache/):
# the next run hands out the longest work first.
SECONDS_KEY = "prunescope/file_seconds"


def unit_of(nodeid: str) -> str:
    """The unit of work `--dist loadfile` hands to one worker: a file, or all browser files."""
    path = nodeid.split("::", 1)[0]
    return BROWSER_UNIT if path in BROWSER_FILES else path


def pytest_configure(config: pytest.Config) -> None:
    # `--dist loadfile` hands out whole units in collection order (the order below); xdist's
    # own reordering (by number of tests per file) would put the one-test browser and
    # training files last, where one worker ends up with several of them while the other idles.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _timed(config: pytest.Config) -> dict[str, float]:
    """The seconds per file of the last whole run; xdist workers get the controller's copy
    (workers that read the cache themselves could see different versions, hence orders)."""
    if hasattr(config, "workerinput"):
        return config.workerinput.get(SECONDS_KEY, {})
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    return cache.get(SECONDS_KEY, {}) if cache is not None else {}


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    node.workerinput[SECONDS_KEY] = _timed(node.config)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` with the browser files as one unit (unit_of)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest units of work first, which is what keeps every worker busy to the end: by
    the seconds each file took last time where every file has been timed here, else files
    with a test marked slow first (the browser files first of all), then by number of tests
    (most first). A file's tests stay together and in their order (module fixtures and
    in-file sequences rely on that)."""
    by_unit: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_unit.setdefault(unit_of(item.nodeid), []).append(item)
    timed = _timed(config)
    files = {unit: {item.nodeid.split("::", 1)[0] for item in tests}
             for unit, tests in by_unit.items()}
    all_timed = all(path in timed for paths in files.values() for path in paths)

    def heavy_first(unit: str) -> tuple:
        if all_timed:
            return (-sum(timed[path] for path in files[unit]),)
        tests = by_unit[unit]
        # untimed: the browser files are the largest unit by far
        return (unit != BROWSER_UNIT, not any(t.get_closest_marker("slow") for t in tests),
                -len(tests))

    items[:] = [item for unit in sorted(by_unit, key=heavy_first) for item in by_unit[unit]]


# seconds per file of this run (in the controller, the workers' reports arrive here too)
_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _SECONDS[path] = _SECONDS.get(path, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Keep each file's seconds for the next run's order, from runs of whole files only (a
    failed, stopped or filtered run leaves the cache as it was)."""
    config = session.config
    whole_files = not (config.option.keyword or config.option.markexpr
                       or any("::" in arg for arg in config.args))
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    if hasattr(config, "workerinput") or cache is None or exitstatus != 0 or not whole_files:
        return
    timed = dict(cache.get(SECONDS_KEY, {}))
    timed.update({path: round(s, 1) for path, s in _SECONDS.items()})
    cache.set(SECONDS_KEY, timed)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs three workers on two cores: one torch thread each, not several competing
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
    ``.url`` and ``.log`` (the server's stdout and stderr). One server per process (with
    xdist, the one worker that runs the browser files: BROWSER_FILES), shared by every
    browser test that needs no fresh one (a new page is a new Streamlit
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
