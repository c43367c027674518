"""The "Compare on accuracy" tab, driven by AppTest on the real demo and its stored sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.charts_sweep import PARETO_NAME
from dashboard.common import short
from engine.options import LAYER_NORMS
from tests.helpers import app_ok, chart_spec

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")
SWEEP = json.loads((ROOT / "assets" / "demo_sweep.json").read_text())


@pytest.fixture(scope="module")
def compare_tab():
    at = AppTest.from_file(APP, default_timeout=240).run()
    app_ok(at)
    at.session_state["main_tab"] = "Compare on accuracy"
    at.run()
    app_ok(at)
    return at


def test_one_trace_per_layer_norm_with_the_original_level(compare_tab):
    spec = chart_spec(compare_tab, "cmp_chart")
    curves = [t for t in spec["data"] if t.get("mode") == "lines+markers"]
    names = [t["name"] for t in spec["data"]]
    assert [t["name"] for t in curves] == list(LAYER_NORMS) and PARETO_NAME in names
    # the other options as in the sidebar (defaults): each trace is the stored sweep's points
    for trace in curves:
        expected = sorted(
            (p["ratio"], p["metric"]) for p in SWEEP["points"]
            if p["options"]["layer_norm"] == trace["name"]
            and p["options"]["policy"] == "average" and p["options"]["criterion"] == "l2"
            and p["options"]["group_policy"] == "average")
        assert list(zip(trace["x"], trace["y"])) == expected
    original = next(t for t in spec["data"] if t["name"].startswith("original "))
    assert original["y"] == pytest.approx([SWEEP["original"]] * 2)
    heat = chart_spec(compare_tab, "sens_heatmap")
    assert heat["data"][0]["type"] == "heatmap"


def test_choosing_a_point_sets_its_options_and_ratio(compare_tab):
    at = compare_tab
    target = next(p for p in SWEEP["points"] if p["options"]["layer_norm"] == "tss_norm"
                  and p["ratio"] == 0.3 and p["options"]["policy"] == "average"
                  and p["options"]["criterion"] == "l2"
                  and p["options"]["group_policy"] == "average")
    at.selectbox(key="cmp_pick").set_value(target["index"])
    at.button(key="cmp_use").click().run()
    app_ok(at)
    assert at.selectbox(key="opt_layer_norm").value == "tss_norm"
    assert at.slider(key="opt_ratio").value == pytest.approx(0.3)
    # comparing policies now: the other options follow the sidebar (tss_norm)
    at.selectbox(key="cmp_axis").set_value("policy").run()
    app_ok(at)
    spec = chart_spec(at, "cmp_chart")
    assert [t["name"] for t in spec["data"] if t.get("mode") == "lines+markers"] == [
        "sum", "average", "backward"]
    average = next(t for t in spec["data"] if t["name"] == "average")
    assert target["metric"] in average["y"]


def test_auto_ratios_fill_the_plan_table(compare_tab):
    at = compare_tab
    at.button(key="auto_run").click().run()
    app_ok(at)
    chosen = at.session_state[f"auto_ratios_{short(at.session_state['_ps_active_model'])}"]
    assert set(chosen) == {g["name"] for g in
                           json.loads((ROOT / "assets" / "demo_sensitivity.json").read_text())
                           ["groups"]}
    at.session_state["main_tab"] = "Plan"
    at.run()
    app_ok(at)
    table = at.data_editor[0].value
    assert dict(zip(table["Group"], table["Own ratio"].astype(float))) == pytest.approx(
        {k: round(v, 2) for k, v in chosen.items()})
