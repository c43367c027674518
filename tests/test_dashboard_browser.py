"""The dashboard in a real browser: `streamlit run` + Debian's Chromium driven by Playwright.

Screenshots of every step land in test-artifacts/ (01-open.png ... 07-graphs.png).
Uses /usr/bin/chromium (never `playwright install`); the test fails, not skips, without it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from engine.demo import load_demo_eval
from tests.helpers import choose, netron_laid_out, new_page, screenshot, wait_for

pytestmark = pytest.mark.slow


def _overview_data(page) -> dict:
    """Trace names and kept-box medians of the first Plotly chart, read from the DOM."""
    return page.evaluate(
        """() => {
            const plot = document.querySelector('.js-plotly-plot');
            if (!plot || !plot.data) return null;
            const kept = plot.data.find(t => t.name === 'kept');
            return {names: plot.data.map(t => t.name),
                    median: kept ? Array.from(kept.median) : null,
                    x: kept ? Array.from(kept.x) : null};
        }"""
    )


def _changed(data: dict | None, before: dict) -> dict | None:
    return data if data and data["median"] and data["median"] != before["median"] else None


def test_dashboard_in_chromium(dashboard_url, browser, tmp_path):
    page = new_page(browser, viewport={"width": 1440, "height": 2200}, accept_downloads=True)

    # 1. Opens on the demo with the score chart drawn.
    page.goto(dashboard_url)
    page.get_by_text("PruneScope").first.wait_for()
    page.wait_for_selector(".js-plotly-plot .boxlayer")
    page.wait_for_function("() => document.querySelector('.js-plotly-plot').data")
    before = _overview_data(page)
    assert {"kept", "pruned", "global cut"} <= set(before["names"])
    assert page.get_by_text("built-in demo").first.is_visible()
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "01-open.png")

    # 2. A layer-norm change redraws the chart from cached scores.
    choose(page, "Layer norm", "tss_norm")
    page.get_by_text("layer norm tss_norm").first.wait_for()
    after = wait_for(lambda: _changed(_overview_data(page), before))
    assert after["x"] == before["x"]  # same groups, same network order
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "02-norm-tss.png")

    # 3. Compare layer norms: one subplot per norm.
    page.get_by_text("Compare layer norms", exact=True).click()
    page.get_by_text("The same groups under all five layer norms").wait_for()
    norms = wait_for(lambda: page.evaluate(
        """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
                 .map(p => (p.data || []).filter(t => t.type === 'box').map(t => t.name))
                 .find(n => n.length === 5)"""))
    assert norms == ["standard_score", "tss_norm", "linear_scaling", "softmax_norm", "none"]
    screenshot(page, "03-compare-norms.png")

    # 4. The per-group plan table.
    page.get_by_role("tab", name="Plan").click()
    page.get_by_text("Frozen layers").wait_for()
    page.get_by_text("reaches a model output").first.wait_for(state="attached")
    screenshot(page, "04-plan.png")

    # 5. Prune runs with a status display and shows before/after numbers.
    page.get_by_role("tab", name="Prune & compare").click()
    page.locator(".st-key-prune button").click()
    page.get_by_text("Pruned and saved").wait_for()
    page.get_by_text("Before / after").wait_for()
    page.get_by_text("Accuracy before").first.wait_for(state="attached")  # canvas grid cell
    assert page.locator("[data-testid='stException']").count() == 0
    screenshot(page, "05-pruned.png")

    # 6. A download arrives and loads with torch.export.load.
    with page.expect_download() as info:
        page.locator(".st-key-dl_model_pt2 button").click()
    download = info.value
    assert download.suggested_filename == "model.pt2"
    saved = tmp_path / "model.pt2"
    download.save_as(saved)
    program = torch.export.load(str(saved))
    x, y = load_demo_eval()
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(x[:64]))
    assert logits.shape[0] == 64
    assert float(np.mean(logits.argmax(1).numpy() == y[:64])) > 0.2  # still a classifier
    # model.onnx is made on request; its download then takes the button's place
    page.get_by_role("button", name="Make model.onnx").click()
    with page.expect_download() as info:
        page.locator(".st-key-dl_model_onnx button").click()
    assert info.value.suggested_filename == "model.onnx"
    info.value.save_as(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x[:64]})[0]
    np.testing.assert_allclose(onnx_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
    assert page.get_by_role("button", name="Make model.onnx").count() == 0
    screenshot(page, "06-download.png")

    # 7. The Netron frames show the original and the pruned graph.
    page.get_by_role("tab", name="Graphs").click()
    frames = page.locator("iframe[src^='http://127.0.0.1']")
    frames.nth(1).wait_for()
    assert frames.count() == 2
    texts = []
    for i in range(2):
        frame = page.frame_locator("iframe[src^='http://127.0.0.1']").nth(i)
        # netron's cookie banner is cut out (dashboard/netron_server.py): the graph comes
        # first, no banner waits for a click
        banner = frame.get_by_text("Accept", exact=True)
        node = frame.locator("svg#canvas g.node").first
        node.or_(banner).first.wait_for()
        assert not banner.is_visible(), "netron asks for cookie consent"
        assert frame.locator("svg#canvas g.node").count() > 5
        texts.append(frame.locator("svg#canvas").text_content())
    # Two different graphs: the original's layer shapes are not the pruned ones.
    assert texts[0] != texts[1]
    netron_laid_out(page.frame_locator("iframe[src^='http://127.0.0.1']").nth(1))
    screenshot(page, "07-graphs.png")
    page.close()
