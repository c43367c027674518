"""Issue 21 (dashboard v3), the pure parts: chart builders (DataFrame in, figure out), frames,
the words the page uses, and the engine's stop callbacks on the real demo model."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

import engine
from dashboard import charts, frames
from dashboard.charts_results import AFTER_NAME, BEFORE_NAME, widths_figure
from dashboard.charts_sweep import (
    CURRENT_NAME,
    comparison_figure,
    sensitivity_frame,
    sensitivity_heatmap,
)
from dashboard.common import page_words
from dashboard.long_run import eta_text
from dashboard.prune_run import history_row, latency_rows, quality_section
from dashboard.sidebar import index_example, parse_indices
from dashboard.tabs.compare import auto_summary, current_point
from dashboard.tabs.plan import parse_own_ratio
from dashboard.tabs.prune import points, ratio_explanation, signature_changes
from engine.errors import PruneScopeError
from engine.options import PruningOptions


@pytest.fixture(scope="module")
def demo():
    return engine.analyze("demo")


# ------------------------------------------------------------------ item 6: charts


def _lab(hex_color: str) -> tuple[float, float, float]:
    """sRGB hex -> CIELAB (D65), written out here so the test does not trust the palette."""
    rgb = [int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in rgb]
    x = (lin[0] * 0.4124 + lin[1] * 0.3576 + lin[2] * 0.1805) / 0.95047
    y = lin[0] * 0.2126 + lin[1] * 0.7152 + lin[2] * 0.0722
    z = (lin[0] * 0.0193 + lin[1] * 0.1192 + lin[2] * 0.9505) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_series_colours_are_far_apart_and_markers_differ():
    # five curves (the five layer norms) must not share nearly one colour
    five = charts.SERIES_COLORS[:5]
    closest = min(math.dist(_lab(a), _lab(b)) for a, b in itertools.combinations(five, 2))
    assert closest > 45
    assert len(set(charts.SERIES_SYMBOLS)) == len(charts.SERIES_SYMBOLS)


def _sweep_frame() -> pd.DataFrame:
    rows = []
    for i, (norm, ratio) in enumerate(itertools.product(["standard_score", "tss_norm"],
                                                        [0.1, 0.3, 0.5])):
        rows.append({"index": i, "layer_norm": norm, "policy": "average", "ratio": ratio,
                     "params_kept": 1 - ratio, "flops_kept": 1 - ratio,
                     "metric": 0.99 - ratio * (1 if norm == "tss_norm" else 0.5)})
    return pd.DataFrame(rows)


def test_comparison_marks_current_setting_and_names_original_in_the_legend():
    frame = _sweep_frame()
    fig = comparison_figure(frame, "layer_norm", original=0.9933, current=4)
    names = charts.trace_names(fig)
    star = [t for t in fig.data if t.name == CURRENT_NAME]
    assert len(star) == 1 and star[0].marker.symbol == "star"
    assert list(star[0].x) == [0.3] and list(star[0].customdata) == [4]
    # the original is a legend entry, not a text label that markers can hide
    assert "original 0.9933" in names and not fig.layout.annotations
    # each curve has its own colour and its own marker shape
    curves = [t for t in fig.data if t.name in ("standard_score", "tss_norm")]
    assert len({t.line.color for t in curves}) == 2
    assert len({t.marker.symbol for t in curves}) == 2
    # the toolbar stands upright in a right margin; the legend lies above the plot
    assert fig.layout.modebar.orientation == "v"
    assert fig.layout.margin.r >= 40 and fig.layout.legend.orientation == "h"
    assert fig.layout.legend.y >= 1
    # no current setting among the points: no star
    assert CURRENT_NAME not in charts.trace_names(comparison_figure(frame, "layer_norm"))


def test_current_point_matches_sidebar_options_and_ratio():
    frame = _sweep_frame()
    chosen = {"layer_norm": "tss_norm", "policy": "average"}
    assert current_point(frame, chosen, 0.3) == 4
    assert current_point(frame, chosen, 0.35) is None
    assert current_point(frame, {"layer_norm": "none", "policy": "average"}, 0.3) is None


def _sensitivity_report(metric: str) -> dict:
    higher = metric == "accuracy"
    groups = []
    for g, scale in (("a", 0.01), ("b", 10.0)):
        curve = [{"ratio": 0.0, "metric": 1.0, "drop": 0.0}]
        for r in (0.1, 0.5):
            change = scale * r
            curve.append({"ratio": r, "metric": 1 - change if higher else 1 + change,
                          "drop": change})
        groups.append({"name": g, "curve": curve})
    return {"metric": metric, "groups": groups}


def test_sensitivity_heatmap_says_rise_for_perplexity_and_offers_log():
    frame = sensitivity_frame(_sensitivity_report("perplexity"))
    fig = sensitivity_heatmap(frame, "perplexity", higher_is_better=False)
    title = fig.data[0].colorbar.title.text
    assert "rise" in title and "drop" not in title
    assert "rise" in fig.data[0].hovertemplate
    acc = sensitivity_heatmap(sensitivity_frame(_sensitivity_report("accuracy")), "accuracy")
    assert "accuracy drop" in acc.data[0].colorbar.title.text
    # log scale: colours follow log10 of the change; the colour bar reads in real units
    log = sensitivity_heatmap(frame, "perplexity", higher_is_better=False, log=True)
    z = np.array(log.data[0].z, dtype=float)
    assert z == pytest.approx(np.log10([[0.001, 0.005], [1.0, 5.0]]))
    assert "log" in log.data[0].colorbar.title.text
    assert "0.001" in log.data[0].colorbar.ticktext and "1" in log.data[0].colorbar.ticktext
    # the hover still gives the change itself
    assert np.array(log.data[0].customdata, dtype=float)[1, 1] == pytest.approx(5.0)


def test_widths_figure_before_and_after_in_network_order():
    widths = pd.DataFrame({"order": [1, 0], "group": ["b", "a"], "before": [64, 32],
                           "after": [16, 32]})
    fig = widths_figure(widths)
    before, after = fig.data
    assert (before.name, after.name) == (BEFORE_NAME, AFTER_NAME)
    assert list(before.x) == ["a", "b"] and list(before.y) == [32, 64]
    assert list(after.y) == [32, 16]
    assert [c[0] for c in after.customdata] == [1.0, 0.25]
    with pytest.raises(ValueError, match="after"):
        widths_figure(widths.drop(columns="after"))


def test_overview_and_detail_keep_legend_clear_of_the_toolbar(demo):
    plan = engine.plan(demo, {}, ratio=0.5)
    for fig in (charts.score_overview(frames.stats_frame(plan), plan.threshold),
                charts.group_detail(frames.detail_frame(plan.groups[0], "average"),
                                    plan.threshold)):
        assert fig.layout.modebar.orientation == "v"
        assert fig.layout.margin.r >= 40
        assert fig.layout.legend.orientation == "h" and fig.layout.legend.xanchor == "left"


# ------------------------------------------------------------------ frames


def test_cut_crossings_count_channels_on_the_wrong_side(demo):
    plan = engine.plan(demo, {}, ratio=0.5)
    above, below = frames.cut_crossings(plan)
    scores = np.concatenate([g.scores for g in plan.groups])
    mask = np.concatenate([frames.pruned_mask(g) for g in plan.groups])
    assert above == int((scores[mask] > plan.threshold).sum())
    assert below == int((scores[~mask] < plan.threshold).sum())
    assert above + below > 0  # on the demo the block and step rules do move channels
    per_group = engine.plan(demo, {}, ratios={g.name: 0.5 for g in demo.groups})
    assert frames.cut_crossings(per_group) == (0, 0)  # no global cut, nothing to explain


def test_widths_and_history_frames():
    report = {"groups": [{"name": "a", "channels": 8, "kept": [0, 1, 2]},
                         {"name": "b", "channels": 4, "kept": [0, 1, 2, 3]}]}
    widths = frames.widths_frame(report)
    assert widths.to_dict("records") == [
        {"order": 0, "group": "a", "before": 8, "after": 3},
        {"order": 1, "group": "b", "before": 4, "after": 4}]
    table = frames.history_frame([{"run": 1, "ratio": 0.5}, {"run": 2, "metric after": 0.9}])
    assert list(table.columns) == ["run", "ratio", "metric after"]
    assert table["ratio"].isna().tolist() == [False, True]


# ------------------------------------------------------------------ item 7/8: words


def test_signature_changes_list_the_real_differences():
    old = json.dumps({"model": "m", "options": {"policy": "average", "layer_norm": "none"},
                      "ratio": 0.5, "uniform": False, "pinned": []})
    new = json.dumps({"model": "m", "options": {"policy": "average", "layer_norm": "none"},
                      "ratio": 0.5, "uniform": True, "pinned": []})
    assert signature_changes(old, new) == ["uniform: off → on"]
    newer = json.dumps({"model": "m", "options": {"policy": "sum", "layer_norm": "none"},
                        "ratio": 0.4, "uniform": False, "pinned": ["g"]})
    assert signature_changes(old, newer) == ["pruning ratio: 0.5 → 0.4",
                                             "pinned groups: none → g",
                                             "policy: average → sum"]


def test_points_and_ratio_explanation(demo):
    assert points(0.2533 - 0.9933) == "-74.0 points"
    plan = engine.plan(demo, {}, ratio=0.5)
    share = plan.total_pruned / plan.total_channels
    text = ratio_explanation(0.5, share, plan, False, False, True)
    assert f"{share:.1%}" in text and "step rule" in text and "multiple of 2" in text
    assert "equal blocks" in text
    assert ratio_explanation(0.5, 0.5, plan, False, False, True) == ""


def test_auto_summary_says_overshoot_and_accuracy():
    section = {"target": {"resource": "flops", "remove": 0.5}, "removed": 0.571,
               "uniform": {"ratio": 0.43},
               "comparison": {"metric": "accuracy", "data": "demo evaluation set",
                              "auto": 0.91, "uniform": 0.62, "original": 0.9933}}
    text = auto_summary(section, "flops", 0.544)
    assert "57.1%" in text and "7.1 points more" in text
    assert "54.4% of the channels" in text and "sidebar" in text
    assert "chosen ratios 91.00%" in text and "uniform ratio 62.00%" in text
    no_data = auto_summary({**section, "removed": 0.5, "comparison": None}, "flops", 0.5)
    assert "points more" not in no_data and "Not measured" in no_data


def test_quality_section_is_what_the_page_shows():
    fid = {"samples": 450, "metric": "accuracy", "accuracy_before": 0.99,
           "accuracy_after": 0.25, "top1_agreement": 0.26, "relative_error": 0.8}
    q = quality_section(fid, "demo evaluation set")
    assert q == {"metric": "accuracy", "original": 0.99, "pruned": 0.25, "samples": 450,
                 "data": "demo evaluation set", "top1_agreement": 0.26,
                 "relative_error": 0.8}
    assert quality_section({"samples": 3, "top1_agreement": 0.5, "relative_error": 0.1},
                           "x")["metric"] == "agreement"


def test_latency_rows_show_whatever_the_engine_measured():
    assert latency_rows({}) == []
    rows = latency_rows({"latency": {"device": "cpu", "before_s": 0.002, "after_s": 0.001,
                                     "speedup": 2.0}})
    values = {r["Measure"]: r["Value"] for r in rows}
    assert values == {"device": "cpu", "before s": "2 ms", "after s": "1 ms",
                      "speedup": "2.00×"}


def test_history_row_has_options_size_metric_latency():
    from dashboard.prune_run import PruneRun

    run = PruneRun(model_key="demo:1", signature="s", options={"policy": "sum", "seed": 0},
                   ratio=0.5, files={}, before={"params": 100, "latency_s": 0.002},
                   after={"params": 25, "latency_s": 0.001},
                   fidelity={"samples": 4, "metric": "accuracy", "accuracy_before": 1.0,
                             "accuracy_after": 0.5}, fidelity_on="demo evaluation set",
                   channels_pruned=3, channels_total=8, model_label="built-in demo")
    row = history_row(run, 2)
    assert row["run"] == 2 and row["policy"] == "sum" and "seed" not in row
    assert row["params after"] == 25 and row["params kept"] == 0.25
    assert row["metric before"] == 1.0 and row["metric after"] == 0.5
    assert row["latency before (ms)"] == 2.0 and row["latency after (ms)"] == 1.0


def test_history_view_fits_the_page_and_keeps_what_differs():
    from dashboard.prune_run import PruneRun

    def run(options, ratio, after):
        return PruneRun(model_key="demo:1", signature="s", options=options, ratio=ratio,
                        files={}, before={"params": 100, "flops": 1000, "latency_s": 0.002},
                        after={"params": 25, "flops": 300, "latency_s": 0.001},
                        fidelity={"samples": 4, "metric": "accuracy", "accuracy_before": 0.9933,
                                  "accuracy_after": after}, fidelity_on="demo evaluation set",
                        channels_pruned=3, channels_total=8, model_label="built-in demo")

    defaults = PruningOptions().to_dict()
    table = frames.history_frame([
        history_row(run(defaults, 0.5, 0.2533), 1),
        history_row(run({**defaults, "policy": "sum", "step_size": 4}, 0.3, 0.9), 2)])
    assert len(table.columns) > 15  # the CSV keeps every option and number
    view = frames.history_view(table, defaults)
    assert list(view.columns) == ["run", "model", "options", "ratio", "channels pruned",
                                  "params kept", "FLOPs kept", "metric", "before → after",
                                  "latency (ms)"]
    assert list(view["options"]) == ["defaults", "policy=sum, step_size=4"]
    assert list(view["params kept"]) == ["25%", "25%"]
    assert list(view["before → after"]) == ["0.9933 → 0.2533", "0.9933 → 0.9"]
    assert list(view["latency (ms)"]) == ["2 → 1", "2 → 1"]


def test_a_large_fall_before_recovery_is_explained_and_points_to_recover():
    from dashboard.tabs.prune import before_recovery_note

    note = before_recovery_note({"accuracy_before": 0.9933, "accuracy_after": 0.2533})
    assert "before any recovery" in note and "99.3% to 25.3%" in note
    assert "-74.0 points" in note and "**Recover**" in note and "smaller" in note
    assert before_recovery_note({"accuracy_before": 0.9933, "accuracy_after": 0.97}) == ""
    rise = before_recovery_note({"perplexity_before": 4.0, "perplexity_after": 9.0})
    assert "perplexity rose from 4.000 to 9.000 (2.25×)" in rise
    assert before_recovery_note({"perplexity_before": 4.0, "perplexity_after": 4.1}) == ""
    assert before_recovery_note({"relative_error": 0.5}) == ""


# ------------------------------------------------------------------ item 3, 9: inputs


def test_index_example_is_valid_on_the_demo(demo):
    example = index_example(demo)
    plan = engine.plan(demo, {"criterion": "index"}, indices=parse_indices(example))
    assert plan.total_pruned > 0
    # the old example breaks the grouped layers' per-block rule
    with pytest.raises(PruneScopeError, match="same number of indices from every block"):
        engine.plan(demo, {"criterion": "index"}, indices={"block1.conv1": [0, 3, 5]})


def test_page_words_replace_cli_flags():
    message = "--indices names layer 'x', which is not a prunable layer"
    assert page_words(message).startswith("“Channel indices to remove” names layer")
    assert "--" not in page_words("criterion index needs --indices FILE.json (layer -> "
                                  "indices)")


def test_own_ratio_cells():
    assert parse_own_ratio("", "g") is None and parse_own_ratio(None, "g") is None
    assert parse_own_ratio("0.3", "g") == 0.3 and parse_own_ratio("30%", "g") == 0.3
    with pytest.raises(PruneScopeError, match="Own ratio of group 'g'"):
        parse_own_ratio("half", "g")
    with pytest.raises(PruneScopeError, match="allowed 0 <= ratio < 1"):
        parse_own_ratio("1.5", "g")


# ------------------------------------------------------------------ item 5: stop


def test_eta_text():
    assert eta_text(0, 8, 0.0, "points") == "0 of 8 points · estimating the time left…"
    assert eta_text(2, 8, 10.0, "points") == "2 of 8 points · about 30 s left"
    assert eta_text(0.25, 1.0, 30.0) == "25% · about 1 min 30 s left"
    assert eta_text(8, 8, 12.0, "points").endswith("done in 12 s")


def test_engine_sensitivity_stops_and_keeps_finished_points(demo):
    from engine.quality.sensitivity import sensitivity

    seen = []
    report = sensitivity(demo, {}, ratios=[0.2, 0.6], eval_data="demo", workers=1,
                         progress=lambda d, n, r: seen.append(d),
                         stop=lambda: len(seen) >= 3)
    assert report["complete"] is False and len(report["points"]) == 3
    assert report["total"] == 2 * len(demo.groups)
    finished = [c for g in report["groups"] for c in g["curve"] if c["ratio"] > 0]
    assert len(finished) == 3  # the curves hold exactly what finished


def test_engine_recover_stops_and_keeps_what_is_done(demo):
    result = engine.apply(demo, engine.plan(demo, {}, ratio=0.5))
    # stopped before anything started: nothing runs
    stopped = engine.recover(result, "demo", ["bias", "distill"], budget_s=60,
                             stop=lambda: True)
    info = stopped.report["recovery"]
    assert info["stopped"] is True and info["methods"] == []
    assert {"bias", "distill"} <= set(info["skipped"])
    # stopped after the first method: it is kept, the next one never starts
    calls = []
    stopped = engine.recover(result, "demo", ["bias", "distill"], budget_s=60,
                             stop=lambda: calls.append(1) or len(calls) > 1)
    info = stopped.report["recovery"]
    assert info["stopped"] is True
    assert info["methods"] == ["bias"] and "distill" in info["skipped"]
    # stopped while distilling: the steps so far are kept, the 60 s budget is not spent
    asked = []
    during = engine.recover(result, "demo", ["distill"], budget_s=60,
                            stop=lambda: asked.append(1) or len(asked) > 20)
    info = during.report["recovery"]
    assert info["stopped"] is True and info["methods"] == ["distill"]
    assert info["distill"]["stopped"] is True and 0 < info["distill"]["steps"] < 25
    assert info["seconds"] < 30
