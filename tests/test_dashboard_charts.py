"""Chart builders on hand-made DataFrames: order, cut line, pruned vs kept, one trace per norm."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dashboard import charts, frames

NORMS = ("standard_score", "tss_norm", "linear_scaling", "softmax_norm", "none")


def _stats_rows(order: int, group: str, kept: list[float], pruned: list[float]) -> list[dict]:
    rows = []
    for subset, values in (("all", kept + pruned), ("kept", kept), ("pruned", pruned)):
        v = np.asarray(values, dtype=float)
        q = np.percentile(v, [25, 50, 75]) if v.size else [np.nan] * 3
        rows.append({
            "order": order, "group": group, "subset": subset, "n": int(v.size),
            "min": float(v.min()) if v.size else np.nan, "q1": q[0], "median": q[1],
            "q3": q[2], "max": float(v.max()) if v.size else np.nan,
        })
    return rows


@pytest.fixture
def stats() -> pd.DataFrame:
    # Names deliberately not in alphabetical order, and rows shuffled, so only the
    # ``order`` column can give the network order.
    rows = (
        _stats_rows(2, "alpha.conv", [0.9, 1.1, 1.4], [0.1])
        + _stats_rows(0, "zeta.stem", [0.5, 0.7], [0.2, 0.3])
        + _stats_rows(1, "mid.block", [0.8, 1.2, 1.3, 1.9], [])
    )
    return pd.DataFrame(rows).sample(frac=1.0, random_state=3).reset_index(drop=True)


def _by_name(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert found, f"no trace named {name!r} in {charts.trace_names(fig)}"
    return found


def test_overview_keeps_network_order(stats):
    fig = charts.score_overview(stats, threshold=0.45)
    expected = ["zeta.stem", "mid.block", "alpha.conv"]
    assert list(fig.layout.xaxis.categoryarray) == expected
    assert list(fig.layout.xaxis2.categoryarray) == expected
    kept = _by_name(fig, "kept")[0]
    assert list(kept.x) == expected
    # The box is drawn from the precomputed statistics, not raw points.
    assert list(kept.median) == pytest.approx([0.6, 1.25, 1.1])
    assert list(kept.lowerfence) == pytest.approx([0.5, 0.8, 0.9])
    assert list(kept.upperfence) == pytest.approx([0.7, 1.9, 1.4])
    assert kept.boxpoints is False


def test_overview_cut_line_at_threshold(stats):
    fig = charts.score_overview(stats, threshold=0.45)
    (cut,) = _by_name(fig, charts.CUT_NAME)
    assert set(cut.y) == {0.45}
    assert list(cut.x) == ["zeta.stem", "mid.block", "alpha.conv"]
    # ... and a full-width line at the same height.
    assert [(s.y0, s.y1) for s in fig.layout.shapes] == [(0.45, 0.45)]
    no_cut = charts.score_overview(stats, threshold=None)
    assert charts.CUT_NAME not in charts.trace_names(no_cut)
    assert not no_cut.layout.shapes


def test_overview_pruned_and_kept_are_separate_traces(stats):
    fig = charts.score_overview(stats, threshold=0.45)
    kept = [t for t in fig.data if t.type == "box" and t.name == "kept"]
    pruned = [t for t in fig.data if t.type == "box" and t.name == "pruned"]
    assert len(kept) == 1 and len(pruned) == 1
    assert kept[0].marker.color != pruned[0].marker.color
    # mid.block prunes nothing: it has no pruned box.
    assert list(pruned[0].x) == ["zeta.stem", "alpha.conv"]
    bars = {t.name: list(t.y) for t in fig.data if t.type == "bar"}
    assert bars["kept channels"] == [2, 4, 3]
    assert bars["pruned channels"] == [2, 0, 1]


def test_overview_is_light_with_many_layers():
    rows = []
    for i in range(200):
        rows += _stats_rows(i, f"layer{i:03d}", list(np.linspace(0, 1, 64)), [-1.0, -0.5])
    fig = charts.score_overview(pd.DataFrame(rows), threshold=0.0)
    # A fixed number of traces, whatever the number of layers.
    assert len(fig.data) == 5
    assert len(fig.layout.xaxis.categoryarray) == 200
    # The figure stays small: statistics only, no per-channel points.
    assert len(json.dumps(fig.to_plotly_json(), default=str)) < 200_000


def test_overview_rejects_a_frame_without_statistics():
    with pytest.raises(ValueError, match="q1"):
        charts.score_overview(pd.DataFrame({"order": [0], "group": ["a"]}), threshold=None)


def _detail() -> pd.DataFrame:
    rows = []
    member_a = [0.1, -1.2, 0.8, 1.5]
    member_b = [0.3, -0.9, -0.4, 1.0]
    combined = [(a + b) / 2 for a, b in zip(member_a, member_b)]
    pruned = [False, True, True, False]
    for name, values, kind in (("conv_a", member_a, "member"), ("conv_b", member_b, "member"),
                               ("combined (average)", combined, "combined")):
        for ch, v in enumerate(values):
            rows.append({"channel": ch, "series": name, "kind": kind, "score": v,
                         "pruned": pruned[ch]})
    return pd.DataFrame(rows)


def test_group_detail_members_combined_and_pruned():
    fig = charts.group_detail(_detail(), threshold=-0.2)
    names = charts.trace_names(fig)
    assert names[:2] == ["conv_a", "conv_b"]
    (marks,) = _by_name(fig, "pruned channel")
    assert sorted(set(marks.x)) == [1, 2]
    (kept,) = _by_name(fig, "combined · kept")
    (pruned,) = _by_name(fig, "combined · pruned")
    assert list(kept.x) == [0, 3] and list(pruned.x) == [1, 2]
    assert list(pruned.y) == pytest.approx([-1.05, 0.2])
    (cut,) = _by_name(fig, charts.CUT_NAME)
    assert set(cut.y) == {-0.2}


def _norm_stats() -> pd.DataFrame:
    parts = []
    for k, norm in enumerate(NORMS):
        rows = (_stats_rows(1, "b.second", [1.0 + k, 2.0 + k], [])
                + _stats_rows(0, "a.first", [0.5 * k, 3.0], []))
        frame = pd.DataFrame(rows)
        frame.insert(0, "norm", norm)
        parts.append(frame[frame["subset"] == "all"])
    return pd.concat(parts, ignore_index=True)


def test_norm_comparison_one_trace_per_norm():
    thresholds = {n: float(i) for i, n in enumerate(NORMS)}
    thresholds["none"] = None
    fig = charts.norm_comparison(_norm_stats(), thresholds)
    boxes = [t for t in fig.data if t.type == "box"]
    assert [t.name for t in boxes] == list(NORMS)
    # Each norm in its own subplot (own y axis), groups in network order in each.
    assert len({t.yaxis for t in boxes}) == len(NORMS)
    for t in boxes:
        assert list(t.x) == ["a.first", "b.second"]
    cuts = [t for t in fig.data if t.name == charts.CUT_NAME]
    assert [set(t.y) for t in cuts] == [{0.0}, {1.0}, {2.0}, {3.0}]
    assert [c.yaxis for c in cuts] == [b.yaxis for b in boxes[:4]]


def test_prune_count_comparison_one_bar_trace_per_variant():
    frame = pd.DataFrame([
        {"norm": n, "order": o, "group": g, "channels": 8, "pruned": p}
        for n, counts in zip(NORMS, ([1, 5], [2, 4], [3, 3], [0, 6], [6, 0]))
        for (o, g), p in zip(((1, "late"), (0, "early")), counts)
    ])
    fig = charts.prune_count_comparison(frame, by="norm")
    assert charts.trace_names(fig) == list(NORMS)
    assert list(fig.layout.xaxis.categoryarray) == ["early", "late"]
    first = fig.data[0]
    assert list(first.x) == ["early", "late"] and list(first.y) == [5, 1]


def test_policy_comparison_marks_pruned_channels():
    rows = []
    for policy, scores, pruned in (
        ("sum", [0.27, 0.25, 0.44], [False, True, False]),
        ("average", [0.13, 0.12, 0.22], [True, True, False]),
        ("backward", [0.12, 0.12, 0.23], [True, False, False]),
    ):
        rows += [{"policy": policy, "channel": c, "score": s, "pruned": p}
                 for c, (s, p) in enumerate(zip(scores, pruned))]
    fig = charts.policy_comparison(pd.DataFrame(rows), {"sum": 0.26, "average": None})
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["sum", "average", "backward"]
    colors = list(bars[1].marker.color)
    assert colors == [charts.PRUNED_COLOR, charts.PRUNED_COLOR, charts.KEPT_COLOR]
    cuts = [t for t in fig.data if t.name == charts.CUT_NAME]
    assert len(cuts) == 1 and set(cuts[0].y) == {0.26}


# frames: engine-shaped plan objects (plain namespaces) to DataFrames


def _plan():
    g1 = SimpleNamespace(
        name="add_0", layers=["conv_x", "conv_F"],
        normalized={"conv_x": np.array([-1.0, 0.0, 1.0]), "conv_F": np.array([1.0, -1.0, 0.0])},
        scores=np.array([0.0, -0.5, 0.5]), pruned=np.array([1]), kept=np.array([0, 2]),
    )
    g2 = SimpleNamespace(
        name="conv_G", layers=["conv_G"], normalized={"conv_G": np.array([3.0, 1.0, 2.0, 0.5])},
        scores=np.array([3.0, 1.0, 2.0, 0.5]),
        pruned=np.array([False, True, False, True]), kept=np.array([0, 2]),
    )
    return SimpleNamespace(groups=[g1, g2], threshold=1.2)


def test_stats_frame_quartiles_and_subsets():
    stats = frames.stats_frame(_plan())
    row = stats[(stats.group == "conv_G") & (stats.subset == "pruned")].iloc[0]
    assert row["n"] == 2 and row["min"] == 0.5 and row["max"] == 1.0
    allrow = stats[(stats.group == "conv_G") & (stats.subset == "all")].iloc[0]
    assert allrow["median"] == pytest.approx(np.median([3.0, 1.0, 2.0, 0.5]))
    assert allrow["q1"] == pytest.approx(np.percentile([3.0, 1.0, 2.0, 0.5], 25))
    assert list(stats.drop_duplicates("group").group) == ["add_0", "conv_G"]
    fig = charts.score_overview(stats, threshold=1.2)
    assert list(fig.layout.xaxis.categoryarray) == ["add_0", "conv_G"]


def test_detail_frame_marks_pruned_on_every_series():
    detail = frames.detail_frame(_plan().groups[0], policy="average")
    assert set(detail.series) == {"conv_x", "conv_F", "combined (average)"}
    assert set(detail[detail.pruned].channel) == {1}
    combined = detail[detail.kind == "combined"].sort_values("channel")
    assert list(combined.score) == [0.0, -0.5, 0.5]


def test_prune_counts_and_pivot():
    plans = {"sum": _plan(), "average": _plan()}
    counts = frames.prune_count_frame(plans, by="policy")
    assert list(counts[counts.policy == "sum"].pruned) == [1, 2]
    table = frames.pivot_counts(counts, by="policy")
    assert list(table.group) == ["add_0", "conv_G", "total"]
    assert list(table["sum"]) == [1, 2, 3]
    only = frames.prune_count_frame(plans, by="policy", only=["add_0"])
    assert set(only.group) == {"add_0"}


# ------------------------------------------------------------- the static first-screen chart


def _svg(markup: str):
    import xml.etree.ElementTree as ET

    return ET.fromstring(markup)  # well-formed XML, or it raises


def test_static_overview_draws_the_same_boxes_bars_and_cut(stats):
    from dashboard import charts_static

    ns = "{http://www.w3.org/2000/svg}"
    root = _svg(charts_static.score_overview_svg(stats, 0.25))
    boxes = [r for r in root.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    titles = [r.find(f"{ns}title").text for r in boxes]
    shown = stats[stats["subset"].isin(("kept", "pruned")) & (stats["n"] > 0)]
    assert len(boxes) == len(shown)  # one box per group and subset with channels
    assert sorted(titles) == sorted(f"{g} {s}: {n} channels" for g, s, n in
                                    zip(shown["group"], shown["subset"], shown["n"]))
    colours = {r.get("fill") for r in boxes}
    assert colours == {charts.KEPT_COLOR, charts.PRUNED_COLOR}
    # group names in network order along the bottom
    labels = [t.text for t in root.iter(f"{ns}text") if t.text in set(stats["group"])]
    assert labels == ["zeta.stem", "mid.block", "alpha.conv"]
    # the dashed cut sits between the tick lines of the values around it
    dashed = [ln for ln in root.iter(f"{ns}line") if ln.get("stroke-dasharray")
              and ln.get("x1") != ln.get("x2") and float(ln.get("x2")) - float(ln.get("x1")) > 100]
    assert len(dashed) == 1
    ticks = {float(t.text): float(t.get("y")) - 4 for t in root.iter(f"{ns}text")
             if t.text and t.get("text-anchor") == "end" and t.get("x") == "58"}
    below = max(v for v in ticks if v <= 0.25)
    above = min(v for v in ticks if v >= 0.25)
    y = float(dashed[0].get("y1"))
    assert ticks[above] <= y <= ticks[below]
    without = _svg(charts_static.score_overview_svg(stats, None))
    assert not [ln for ln in without.iter(f"{ns}line") if ln.get("stroke-dasharray")]


def test_static_overview_escapes_names_and_refuses_a_short_frame():
    from dashboard import charts_static

    hostile = pd.DataFrame(_stats_rows(0, "a<b>&\"c\"", [0.1, 0.2], [0.0]))
    root = _svg(charts_static.score_overview_svg(hostile, 0.05))
    assert any(t.text == "a<b>&\"c\"" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    with pytest.raises(ValueError, match="q1"):
        charts_static.score_overview_svg(hostile.drop(columns=["q1"]), None)


def test_static_overview_goes_out_as_a_markdown_image_without_html(stats):
    """Markdown image syntax with the SVG as a data URI: no raw HTML (Markdown would load its
    HTML parser, a lazily loaded script, first) and no URL to request."""
    import base64
    import re

    from dashboard import charts_static

    text = charts_static.static_markdown(stats, 0.25)
    found = re.fullmatch(r"!\[([^\]]+)\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", text)
    assert found, text[:120]
    assert "<" not in text
    root = _svg(base64.b64decode(found.group(2)).decode())
    ns = "{http://www.w3.org/2000/svg}"
    labels = [t.text for t in root.iter(f"{ns}text") if t.text in set(stats["group"])]
    assert labels == ["zeta.stem", "mid.block", "alpha.conv"]


def test_nice_ticks_cover_the_range_with_round_steps():
    from dashboard.charts_static import nice_ticks

    assert nice_ticks(-2.04, 3.26, 6) == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    assert nice_ticks(0, 64, 3) == [0, 50, 100]
    flat = nice_ticks(0.5, 0.5)  # one value: still a range around it
    assert flat[0] <= 0.5 < flat[-1]


def test_overview_count_bars_are_centred_under_their_group(stats):
    fig = charts.score_overview(stats, 0.5)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2
    for bar in bars:  # explicit: Plotly would otherwise put them in a slot beside the boxes
        assert bar.offset == -bar.width / 2 and 0 < bar.width <= 1
