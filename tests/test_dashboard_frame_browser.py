"""The page frame in a real browser (Debian's Chromium via Playwright) at 1440x900: private
by default (no request leaves the machine, no cookie banner), the ratio slider above the fold,
no glyph that needs a font the machine may lack, a quiet server log, every tab drawn (screenshots
in test-artifacts/frame-*.png). Four sessions opening at once on a fresh server: in
test_dashboard_safety.py, whose server is fresh for its first test.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from dashboard.tabs import TABS
from tests.helpers import (
    STEP_TIMEOUT_MS,
    netron_laid_out,
    new_page,
    screenshot,
    settle,
    wait_for,
)

VIEWPORT = {"width": 1440, "height": 900}
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
TABS_TOP_MAX = 220  # px from the top of a 1440x900 window
CHART_VISIBLE_MIN = 350  # px of the Scores tab's first chart inside the first screen

pytestmark = pytest.mark.slow

# Characters every text font covers (the page ships Source Sans; Netron uses the system's):
# Latin, Greek, general punctuation and a few maths signs. Emoji, dingbats and symbols such
# as ≡ or ❮ need fonts a bare machine lacks and show as boxes there.
SAFE_SYMBOLS = set("−≤≥≈→←×÷‖")


def _unsafe_glyphs(text: str) -> set[str]:
    return {c for c in text
            if not (ord(c) < 0x250 or 0x370 <= ord(c) < 0x400 or 0x2000 <= ord(c) < 0x2070
                    or c in SAFE_SYMBOLS)}


PAGE_TEXT = """() => document.title + ' ' + document.body.innerText + ' ' +
    Array.from(document.querySelectorAll('svg text')).map(t => t.textContent).join(' ')"""


FULL_HEIGHT_MAX = 12_000
# The drawn Plotly charts' sizes, and whether they equal those of the previous call.
CHARTS_STILL = """() => {
    const sizes = JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot'))
        .map(p => p._fullLayout ? [p._fullLayout.width, p._fullLayout.height] : null));
    const still = window.__chartSizes === sizes;
    window.__chartSizes = sizes;
    return still;
}"""


def _full_shot(page, name: str) -> Path:
    """The whole of the open tab, not only the first screen: Streamlit scrolls its own main
    container (the document does not grow), so the window is made as tall as the container's
    content for the screenshot and put back after."""
    settle(page)
    height = page.evaluate("""() => Math.max(...['stMain', 'stAppViewContainer',
        'stMainBlockContainer'].map(id => document.querySelector(`[data-testid=${id}]`))
        .filter(e => e).map(e => e.scrollHeight))""")
    page.set_viewport_size({"width": VIEWPORT["width"],
                            "height": min(max(height + 40, VIEWPORT["height"]), FULL_HEIGHT_MAX)})
    # the charts lay themselves out again at the new size: their sizes stay put 0.2 s
    page.wait_for_function(CHARTS_STILL, polling=200)
    try:
        return screenshot(page, name, full_page=False)
    finally:
        page.set_viewport_size(VIEWPORT)


def _no_errors(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0
    errors = page.locator("[data-testid='stAlertContentError']").all_inner_texts()
    assert not errors, errors


# Every table (Streamlit's data grid) of the open tab whose columns are wider than the table:
# the user would scroll sideways to read them. Its first column's header names it.
WIDE_TABLES = """() => Array.from(document.querySelectorAll('[data-testid=stDataFrame]'))
    .filter(t => t.offsetParent !== null)
    .map(t => [t.querySelector('.dvn-scroller'), t])
    .filter(([s, t]) => s && s.scrollWidth > s.clientWidth + 1)
    .map(([s, t]) => `${s.scrollWidth} > ${s.clientWidth} px`)"""


def _open(context, url: str):
    page = new_page(context)
    page.goto(url)
    page.wait_for_selector(".js-plotly-plot .boxlayer")
    settle(page)
    return page


def _prune(page) -> None:
    page.get_by_role("tab", name="Prune & compare").click()
    settle(page)  # a click during the tab's own rerun can be lost
    page.locator(".st-key-prune button").click()
    page.get_by_text("Pruned and saved").wait_for(timeout=3 * STEP_TIMEOUT_MS)
    settle(page)


LATE_REQUEST_S = 3.0  # how long the drawn frames are watched for a late outside request
NETRON_BLOCKERS = re.compile(r"uses cookies|Accept|Please update")  # netron's start-up walls


@dataclass
class PrunedSession:
    page: object  # a Playwright page at 1440x900 whose session has pruned the demo
    requests: list[str]  # every request of the page and its frames since it opened
    log_mark: int  # where the server's log stood before the page opened


@pytest.fixture(scope="module")
def pruned_session(dashboard_server, browser):
    """One session that has pruned the demo with the default options, for the tests that
    look at the results (a session's first run and a prune cost seconds of CPU each)."""
    mark = dashboard_server.log_mark()
    context = browser.new_context(viewport=VIEWPORT)
    requests: list[str] = []
    context.on("request", lambda r: requests.append(r.url))  # the page and every frame
    page = _open(context, dashboard_server.url)
    _prune(page)
    yield PrunedSession(page, requests, mark)
    context.close()


def test_graphs_tab_calls_nothing_outside_and_shows_no_banner(dashboard_server,
                                                               pruned_session):
    page, requests, mark = pruned_session.page, pruned_session.requests, pruned_session.log_mark
    page.get_by_role("tab", name="Graphs").click()
    frames = page.locator("iframe[src^='http://127.0.0.1']")
    frames.nth(1).wait_for()
    assert frames.count() == 2
    texts = []
    for i in range(2):
        # Netron replaces window.eval, so the frame is read through locators only
        frame = page.frame_locator("iframe[src^='http://127.0.0.1']").nth(i)
        ready = frame.locator("svg#canvas g.node").or_(frame.get_by_text(NETRON_BLOCKERS))
        ready.first.wait_for()
        body = frame.locator("body").inner_text()
        assert not NETRON_BLOCKERS.search(body), body[:300]
        assert frame.locator("svg#canvas g.node").count() > 5
        texts.append(frame.locator("svg#canvas").text_content())
        # Netron's own buttons and labels: no glyph that is a box without a symbol font
        shown = body + "".join(frame.locator(css).first.text_content() or "" for css in
                               ("#menu-button", "#toolbar-path-back-button"))
        assert not _unsafe_glyphs(shown), _unsafe_glyphs(shown)
    assert texts[0] != texts[1]  # the original and the pruned graph
    # 3 s for any late start-up request (netron asked ipinfo.io at once), the shot among them
    drawn = time.monotonic()
    screenshot(page, "frame-graphs-private.png", full_page=False)
    page.wait_for_timeout(max(0.0, LATE_REQUEST_S - (time.monotonic() - drawn)) * 1000)
    outside = sorted({urlparse(u).hostname for u in requests
                      if urlparse(u).scheme in ("http", "https", "ws", "wss")}
                     - LOCAL_HOSTS)
    assert not outside, f"requests left the machine: {outside}"
    netron_ports = {urlparse(frames.nth(i).get_attribute("src")).port for i in range(2)}
    assert any(urlparse(u).port in netron_ports for u in requests)  # the frames are recorded
    # Exporting both graphs to ONNX and pruning left no exporter chatter in the server log
    # (its start-up banner and what this test made it write: the server is shared).
    log = dashboard_server.startup_log() + dashboard_server.log_since(mark)
    chatter = [ln for ln in log.splitlines()
               if re.search(r"onnx|torch\.export|Translate the graph|Obtain model graph", ln,
                            re.IGNORECASE) and "Serving '" not in ln]
    assert len(chatter) == 0, chatter[:10]
    assert len(log.splitlines()) < 40, log[-3000:]


def test_layout_at_1440x900_and_a_chart_click(dashboard_server, browser):
    mark = dashboard_server.log_mark()
    context = browser.new_context(viewport=VIEWPORT)
    page = _open(context, dashboard_server.url)
    sidebar = page.get_by_test_id("stSidebar")
    slider = sidebar.get_by_test_id("stSlider").filter(has_text="Pruning ratio").first
    box = slider.bounding_box()
    scrolled = page.evaluate("() => (document.querySelector('[data-testid=stSidebarContent]')"
                             " || document.body).scrollTop")
    screenshot(page, "frame-layout-1440x900.png", full_page=False)
    assert scrolled == 0
    assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= VIEWPORT["height"], (
        f"the ratio slider is at y={box and box['y']:.0f}..{box and box['y'] + box['height']:.0f}"
        f", below the {VIEWPORT['height']} px fold")
    # The first screen shows the tab's content: the tabs near the top and most of the
    # first chart above the fold (the old header pushed them down by about 300 px).
    tabs = page.get_by_role("tablist").first.bounding_box()
    chart = page.locator(".js-plotly-plot").first.bounding_box()
    print(f"tabs at y={tabs['y']:.0f}, first chart at y={chart['y']:.0f}")
    assert tabs["y"] <= TABS_TOP_MAX, f"the tabs start at y={tabs['y']:.0f}"
    visible = VIEWPORT["height"] - chart["y"]
    assert visible >= CHART_VISIBLE_MIN, f"only {visible:.0f} px of the first chart show"
    text = page.evaluate(PAGE_TEXT)
    assert not _unsafe_glyphs(text), _unsafe_glyphs(text)

    # A click on a point of the comparison chart sets the sidebar without a Streamlit warning.
    page.get_by_role("tab", name="Compare on accuracy").click()
    chart = """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .find(p => p.data && p.data.some(t => t.name === 'Pareto front'))"""
    wait_for(lambda: page.evaluate(f"() => !!({chart})()"))
    settle(page)
    page.locator(".js-plotly-plot").filter(has=page.locator("g.scatterlayer")).first \
        .scroll_into_view_if_needed()
    where = page.evaluate(f"""() => {{
        const trace = ({chart})().querySelectorAll('g.scatterlayer g.trace')[1];
        const r = trace.querySelectorAll('path.point')[2].getBoundingClientRect();
        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
    }}""")
    page.mouse.move(where["x"] - 30, where["y"] - 30)  # plotly clicks what it hovers
    page.mouse.move(where["x"], where["y"], steps=5)
    page.wait_for_selector(".js-plotly-plot .hoverlayer .hovertext")
    wait_for(lambda: page.evaluate(f"() => (({chart})()._hoverdata || [])"
                                   ".some(d => d.curveNumber === 1 && d.pointNumber === 2)"))
    page.mouse.click(where["x"], where["y"])
    wait_for(lambda: "0.30" in slider.evaluate(
        "e => e.textContent + Array.from(e.querySelectorAll('input')).map(i => i.value)"))
    settle(page)
    _no_errors(page)
    log = dashboard_server.log_since(mark)
    assert "set via the Session State API" not in log, log[-3000:]
    context.close()


# The Scores tab's static copy of the first chart (a Markdown image, dashboard/charts_static.py).
STATIC_CHART = ".st-key-ps_static_chart img"
# Records when the static score chart and Plotly's chart first appear (performance.now()).
ORDER = """window.__firstSeen = {};
new MutationObserver(() => {
  const seen = window.__firstSeen, has = (css) => document.querySelector(css) !== null;
  if (!seen.static && has('STATIC_CHART')) seen.static = performance.now();
  if (!seen.plotly && has('.js-plotly-plot .main-svg')) seen.plotly = performance.now();
}).observe(document, {subtree: true, childList: true});""".replace("STATIC_CHART", STATIC_CHART)
# Streamlit's lazily loaded script chunks (requested six at a time, behind those of every
# sidebar widget) that the static chart must not wait for: `st.html`'s and its sanitiser's,
# the HTML parser Markdown loads for raw HTML, Plotly's.
LAZY_CHUNKS = re.compile(r"/(Html|purify\.es|rehype-raw|PlotlyChart)\.[^/]+\.js$")


def test_first_visit_paints_the_static_chart_before_plotly_then_swaps(dashboard_server,
                                                                        browser):
    """A first visit (empty browser cache) sees the score chart while the lazily loaded
    script chunks of `st.html`, Markdown's HTML parser and Plotly are still held back (the
    chart needs none of them); once Plotly has drawn, only its interactive chart shows."""
    context = browser.new_context(viewport=VIEWPORT)
    page = new_page(context)
    page.add_init_script(ORDER)
    held, released = [], threading.Event()

    def hold(route) -> None:  # requested, not answered until released below
        if released.is_set():
            route.continue_()
        else:
            held.append(route)

    page.route(LAZY_CHUNKS, hold)
    page.goto(dashboard_server.url)
    static = page.locator(STATIC_CHART)
    static.wait_for()
    wait_for(lambda: static.evaluate("img => img.complete && img.naturalWidth > 0"))  # drawn

    def chunks_held() -> list[str]:
        return sorted({urlparse(r.request.url).path.rsplit("/", 1)[-1].split(".")[0]
                       for r in list(held)})

    # on a busy machine the chart can be drawn before React even asks for Plotly's chunk:
    # the claim is about the moment that chunk is asked for and held
    wait_for(lambda: "PlotlyChart" in chunks_held())
    requested = chunks_held()
    print(f"static chart drawn while these chunks were held: {requested}")
    assert static.is_visible() and static.evaluate("img => img.naturalWidth > 0")
    assert page.locator(".js-plotly-plot").count() == 0
    released.set()
    for route in held:
        route.continue_()
    page.wait_for_selector(".js-plotly-plot .boxlayer")
    settle(page)
    seen = page.evaluate("window.__firstSeen")
    assert seen["static"] < seen["plotly"], seen
    assert not static.is_visible()  # swapped, not both
    assert page.locator(".js-plotly-plot").first.is_visible()
    # and the hidden copy leaves no gap: Plotly's chart starts where their container does
    both = page.locator(".st-key-ps_overview").bounding_box()
    chart = page.locator(".js-plotly-plot").first.bounding_box()
    assert abs(chart["y"] - both["y"]) <= 1, (chart, both)
    context.close()


def test_every_tab_drawn_at_1440x900(pruned_session):
    page = pruned_session.page
    for number, tab in enumerate(TABS, start=1):
        page.get_by_role("tab", name=tab.title).click()
        settle(page)
        if tab.module == "graphs":
            netron_laid_out(page.frame_locator("iframe[src^='http://127.0.0.1']").nth(1))
        _no_errors(page)
        text = page.evaluate(PAGE_TEXT)
        assert not _unsafe_glyphs(text), (tab.title, _unsafe_glyphs(text))
        wide = page.evaluate(WIDE_TABLES)
        assert not wide, f"{tab.title}: tables scroll sideways at 1440 px: {wide}"
        slug = re.sub(r"[^a-z]+", "-", tab.title.lower()).strip("-")
        screenshot(page, f"frame-tab-{number}-{slug}.png", full_page=False)  # first screen
        _full_shot(page, f"frame-tab-{number}-{slug}-full.png")  # all of the tab


def test_unsafe_glyphs_are_found():
    """The glyph rule itself: the old title's emoji and Netron's menu glyph are caught."""
    assert _unsafe_glyphs("✂️ PruneScope · 0 ≤ ratio < 1 — “x”") == {"✂", "\ufe0f"}
    assert _unsafe_glyphs("\u2261 \u276e \U0001f4be") == {"\u2261", "\u276e", "\U0001f4be"}
    assert not _unsafe_glyphs("MainThread Ωμ −0.5 → ‖x‖")
