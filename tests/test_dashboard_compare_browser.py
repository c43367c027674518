"""The "Compare on accuracy" chart in a real browser: it renders, and clicking a point sets
that point's options and ratio in the sidebar. Screenshots: test-artifacts/compare-*.png."""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, new_page, screenshot, settle, wait_for

SWEEP = json.loads((ROOT / "assets" / "demo_sweep.json").read_text())

pytestmark = pytest.mark.slow


def _shown(locator) -> str:
    """A widget's visible text and the values of its inputs (a selectbox shows its value in
    an input)."""
    return locator.evaluate("e => e.textContent + ' ' + Array.from(e.querySelectorAll('input'))"
                            ".map(i => i.value).join(' ')")


CHART = """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
    .find(p => p.data && p.data.some(t => t.name === 'Pareto front'))"""


def test_comparison_chart_renders_and_a_click_chooses_a_point(dashboard_url, browser):
    page = new_page(browser, viewport={"width": 1440, "height": 2000})
    page.goto(dashboard_url)
    page.get_by_text("PruneScope").first.wait_for()
    settle(page)
    page.get_by_role("tab", name="Compare on accuracy").click()
    names = wait_for(lambda: page.evaluate(
        f"() => {{ const p = ({CHART})(); return p ? p.data.map(t => t.name) : null; }}"))
    assert names[:6] == ["standard_score", "tss_norm", "linear_scaling", "softmax_norm", "none",
                         "Pareto front"]
    # then the sidebar's current setting (a star) and the original's level, both in the legend
    assert names[6] == "sidebar setting" and names[7].startswith("original ")
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "compare-01-chart.png")

    # tss_norm (trace 1) at ratio 0.3 (its third point): click its marker
    target = next(p for p in SWEEP["points"] if p["options"] == {
        **p["options"], "layer_norm": "tss_norm", "policy": "average", "criterion": "l2",
        "group_policy": "average"} and p["ratio"] == 0.3)
    where = page.evaluate(f"""() => {{
        const p = ({CHART})();
        const trace = p.querySelectorAll('g.scatterlayer g.trace')[1];
        const r = trace.querySelectorAll('path.point')[2].getBoundingClientRect();
        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
    }}""")
    # plotly picks the clicked point from its hover state: hover first, then click
    page.mouse.move(where["x"] - 30, where["y"] - 30)
    page.mouse.move(where["x"], where["y"], steps=5)
    page.wait_for_selector(".js-plotly-plot .hoverlayer .hovertext")
    wait_for(lambda: page.evaluate(f"() => (({CHART})()._hoverdata || [])"
                                   ".some(d => d.curveNumber === 1 && d.pointNumber === 2)"))
    page.mouse.click(where["x"], where["y"])
    sidebar = page.get_by_test_id("stSidebar")
    layer_norm = sidebar.get_by_test_id("stSelectbox").filter(has_text="Layer norm").first
    wait_for(lambda: "tss_norm" in _shown(layer_norm))
    slider = sidebar.get_by_test_id("stSlider").filter(has_text="Pruning ratio").first
    wait_for(lambda: "0.30" in _shown(slider))
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "compare-02-point-chosen.png")
    assert target["metric"] > 0  # the point clicked is a measured point of the stored sweep
