"""The Blocks tab and its chart builder: residual block scores, removed ones marked."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboard.block_chart import block_scores
from engine.demo import BUILTIN_NAMES
from engine.transform.depth import plan_depth
from tests.helpers import app_ok

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def test_chart_has_one_bar_per_block_in_network_order():
    frame = pd.DataFrame({"block": ["b0", "b1", "b2", "b3"], "score": [0.5, 0.1, 0.9, 0.2],
                          "removed": [False, True, False, True]})
    fig = block_scores(frame, "relative branch norm")
    bars = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert bars["kept"] == (["b0", "b2"], [0.5, 0.9])
    assert bars["removed"] == (["b1", "b3"], [0.1, 0.2])
    assert list(fig.layout.xaxis.categoryarray) == ["b0", "b1", "b2", "b3"]
    assert fig.layout.yaxis.title.text == "relative branch norm"
    assert fig.data[0].marker.color != fig.data[1].marker.color


def test_chart_refuses_a_frame_without_its_columns():
    with pytest.raises(ValueError, match="removed"):
        block_scores(pd.DataFrame({"block": ["b0"], "score": [1.0]}))


def test_blocks_tab_shows_the_engine_scores_and_marks_the_lowest():
    at = AppTest.from_file(APP, default_timeout=240).run()
    app_ok(at)
    at.session_state["main_tab"] = "Blocks"
    at.run()
    app_ok(at)
    model = at.session_state["_ps_models"][at.session_state["_ps_active_model"]]
    calibration = None  # what the page scores on: a built-in model's own calibration set
    if "_ps_eval" in at.session_state:
        name, data = at.session_state["_ps_eval"][:2]
        calibration = name if name in BUILTIN_NAMES else data
    _blocks, expected = plan_depth(model.analysis, calibration=calibration)
    table = at.dataframe[0].value
    assert list(table["block"]) == [b["name"] for b in expected["blocks"]] == \
        ["block1", "block2", "attn"]
    assert list(table["score"]) == pytest.approx([b["score"] for b in expected["blocks"]])
    assert not table["removed"].any()
    # the slider starts at 0: the page says that nothing goes then, and what to try
    lowest = min(expected["blocks"], key=lambda b: b["score"])["name"]
    hint = next(c.value for c in at.caption if "At 0 no block is removed" in c.value)
    assert f"Try 1: the lowest-scoring block, **{lowest}**" in hint
    at.slider(key="blocks_to_remove").set_value(1)
    at.run()
    app_ok(at)
    table = at.dataframe[0].value
    assert not any("At 0 no block" in c.value for c in at.caption)
    assert list(table.loc[table["removed"], "block"]) == [lowest]
    chart = [el for el in at.get("plotly_chart") if getattr(el, "key", None) == "block_chart"]
    spec = json.loads(chart[0].proto.spec)
    removed = [t for t in spec["data"] if t["name"] == "removed"]
    assert removed[0]["x"] == [lowest]
