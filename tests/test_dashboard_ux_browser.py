"""Issue 21 (dashboard v3) in a real browser: `streamlit run` + Debian's Chromium (Playwright).

What only a browser shows: the Plotly toolbar against the legends, a click on a chart point,
a pin in one click, and Stop pressed while the sensitivity runs. Screenshots land in
test-artifacts/ (ux-*.png).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.helpers import new_page, screenshot, settle

pytestmark = pytest.mark.slow


def _no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0


def _overlaps(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


def _toolbar_clear_of_legend(page, plot) -> None:
    """Hover the chart (the toolbar shows on hover) and compare the boxes on screen."""
    plot.scroll_into_view_if_needed()
    plot.hover()
    bar = plot.locator(".modebar").first
    bar.wait_for(state="visible")
    box = bar.bounding_box()
    legends = plot.locator(".legend .traces")
    assert legends.count() > 0
    for i in range(legends.count()):
        entry = legends.nth(i).bounding_box()
        assert not _overlaps(box, entry), (box, entry)


def _pruned_bars(page) -> list[int] | None:
    return page.evaluate(
        """() => {
            const plot = document.querySelector('.js-plotly-plot');
            const bars = plot && plot.data && plot.data.find(t => t.name === 'pruned channels');
            return bars ? Array.from(bars.y) : null;
        }""")


def test_dashboard_v3_in_chromium(dashboard_url, browser):
    page = new_page(browser, viewport={"width": 1440, "height": 900})
    page.goto(dashboard_url)
    page.wait_for_selector(".js-plotly-plot .boxlayer")
    settle(page)
    assert page.get_by_text("Start here").first.is_visible()
    screenshot(page, "ux-01-start-scores.png")

    # Toolbar never covers a legend entry: the score overview.
    _toolbar_clear_of_legend(page, page.locator(".js-plotly-plot").first)

    # Pins take one click: the group's pruned bar drops to zero at once.
    before = _pruned_bars(page)
    assert before[0] > 0
    page.get_by_role("tab", name="Plan").click()
    page.get_by_text("Pinned groups").wait_for()
    first = page.locator("[data-testid='stButtonGroup'] button").first
    first.click()
    settle(page)
    _no_exception(page)
    page.get_by_role("tab", name="Scores").click()
    page.wait_for_selector(".js-plotly-plot .boxlayer")
    settle(page)
    after = _pruned_bars(page)
    assert after[0] == 0, after
    page.get_by_role("tab", name="Plan").click()
    screenshot(page, "ux-02-plan-pinned.png")
    page.get_by_role("button", name="Reset per-group settings").click()
    settle(page)

    # The comparison chart: toolbar clear of the legend, the sidebar setting starred, and
    # the Point picker follows a clicked point.
    page.get_by_role("tab", name="Compare on accuracy").click()
    page.get_by_text("The star marks the sidebar's current setting").wait_for()
    plot = page.locator(".stPlotlyChart .js-plotly-plot").first
    plot.wait_for()
    _toolbar_clear_of_legend(page, plot)
    target = plot.evaluate(
        """gd => {
            const t = gd.data.findIndex(d => d.mode === 'lines+markers');
            const d = gd.data[t], i = 2;
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const r = gd.getBoundingClientRect();
            return {x: r.left + xa._offset + xa.l2p(d.x[i]),
                    y: r.top + ya._offset + ya.l2p(d.y[i]),
                    ratio: d.text[i], name: d.name};
        }""")
    page.mouse.click(target["x"], target["y"])
    settle(page)
    picker = page.get_by_test_id("stSelectbox").filter(has_text="Point")
    pattern = re.compile(re.escape(f"{target['name']} @ ratio {target['ratio']}:"))
    shown = picker.locator("input")  # the chosen point is the combobox's value
    for _ in range(60):
        if pattern.search(shown.input_value()):
            break
        time.sleep(0.5)
    assert pattern.search(shown.input_value()), shown.input_value()
    slider = page.get_by_test_id("stSlider").filter(has_text="Pruning ratio")
    assert f"{float(target['ratio']):.2f}" in slider.inner_text()
    _no_exception(page)
    screenshot(page, "ux-03-compare.png")

    # Stop keeps what is done: demo-lm's sensitivity, stopped after its first points.
    page.get_by_text("Demo language model (demo-lm)").click()
    settle(page)
    page.get_by_role("tab", name="Compare on accuracy").click()
    page.get_by_role("button", name="Measure sensitivity").click()
    page.get_by_text(re.compile(r"Sensitivity: [1-9]\d* of \d+ points · about")).wait_for()
    page.locator(".st-key-sens_stop button").first.click()  # the page's own Stop
    page.get_by_text(re.compile(r"Stopped: [1-9]\d* of \d+ points finished")).wait_for()
    settle(page)
    _no_exception(page)
    title = page.evaluate(
        """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
                 .map(p => (p.data || [])[0]).filter(t => t && t.type === 'heatmap')
                 .map(t => t.colorbar.title.text)""")
    assert title and "perplexity rise" in title[0]
    screenshot(page, "ux-04-sensitivity-stopped.png")

    # Prune and the results in view.
    page.get_by_role("tab", name="Prune & compare").click()
    page.locator(".st-key-prune button").click()
    page.get_by_text("Pruned and saved").wait_for()
    page.get_by_text("Channels per group, before and after").wait_for()
    page.get_by_text("This session's runs", exact=True).wait_for()
    _no_exception(page)
    screenshot(page, "ux-05-prune-results.png")
    page.close()
