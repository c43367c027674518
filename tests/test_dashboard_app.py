"""The Streamlit page, driven by streamlit.testing AppTest on the real demo model and engine."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from streamlit.testing.v1 import AppTest

import engine
import engine.scoring.analysis
from dashboard import netron_server
from dashboard.common import clear_shared_models
from dashboard.serve import warm_up
from engine.demo import load_demo_eval
from engine.options import (
    CRITERIA,
    GROUP_POLICIES,
    LAYER_NORMS,
    POLICIES,
    RESHAPE_CHANNEL_AXES,
    STEP_OPS,
    PruningOptions,
)
from tests.helpers import ROOT, active_model, app_ok, chart_spec, open_app

TIMEOUT = 240

OPTION_WIDGETS = {
    "criterion": ("selectbox", "opt_criterion"),
    "policy": ("selectbox", "opt_policy"),
    "layer_norm": ("selectbox", "opt_layer_norm"),
    "group_policy": ("selectbox", "opt_group_policy"),
    "reshape_channel_axis": ("selectbox", "opt_reshape_channel_axis"),
    "step_size": ("number_input", "opt_step_size"),
    "step_op": ("selectbox", "opt_step_op"),
}


# ----------------------------------------------------------------------------- helpers


def _traces(spec: dict, name: str | None = None, kind: str | None = None) -> list[dict]:
    return [t for t in spec["data"]
            if (name is None or t.get("name") == name) and (kind is None or t.get("type") == kind)]


def _set(at: AppTest, option: str, value) -> None:
    kind, key = OPTION_WIDGETS[option]
    getattr(at, kind)(key=key).set_value(value)


def _calibration():
    return load_demo_eval()[0]


def _expected_plan(at: AppTest, options: PruningOptions, ratio: float, **kw):
    """The engine's own plan for the page's model, computed outside the page."""
    model = active_model(at)
    # a built-in model scores on its own calibration set (never the evaluation set the page
    # measures on); uploaded data is used as uploaded
    key, data = at.session_state["_ps_eval"]
    calibration = key if key in ("demo", "demo-lm") else data
    return engine.plan(model.analysis, options, ratio=ratio, calibration=calibration, **kw)


def _check_overview(at: AppTest, options: PruningOptions, ratio: float, **kw) -> None:
    """The overview chart shows exactly the engine's plan for these options."""
    expected = _expected_plan(at, options, ratio, **kw)
    spec = chart_spec(at, "chart_overview")
    names = [g.name for g in expected.groups]
    assert spec["layout"]["xaxis"]["categoryarray"] == names
    cut = _traces(spec, "global cut")
    if expected.threshold is None:
        assert not cut
    else:
        assert cut and cut[0]["y"] == pytest.approx([expected.threshold] * len(names))
    bars = {t["name"]: t["y"] for t in _traces(spec, kind="bar")}
    assert bars["pruned channels"] == [int(g.pruned.size) for g in expected.groups]
    assert bars["kept channels"] == [int(g.kept.size) for g in expected.groups]


# ----------------------------------------------------------------------------- opening


def test_opens_on_the_demo_with_scores_drawn():
    at = open_app(TIMEOUT)
    assert "**PruneScope**" in at.markdown[0].value  # the header, first on the page
    assert at.radio(key="source").value == "Demo model"
    model = active_model(at)
    assert model.captured.source == "demo"
    # Network order = the engine's group order.
    spec = chart_spec(at, "chart_overview")
    assert spec["layout"]["xaxis"]["categoryarray"] == [g.name for g in model.analysis.groups]
    assert {t["name"] for t in _traces(spec, kind="box")} == {"kept", "pruned"}
    _check_overview(at, PruningOptions(), 0.5)
    # The drill-down of the first group shows every member and the combined score.
    detail = chart_spec(at, "chart_detail")
    first = model.analysis.groups[0]
    assert [t["name"] for t in detail["data"][: len(first.layers)]] == list(first.layers)
    assert _traces(detail, "combined · pruned") and _traces(detail, "combined · kept")
    # Every option label of the spec is on the page, with a help text.
    labels = {w.label: w for w in [*at.selectbox, *at.number_input, *at.slider]}
    for label in ("Criterion", "Policy", "Layer norm", "Group policy", "Reshape channel axis",
                  "Step size", "Step op", "Pruning ratio"):
        assert label in labels, label
        assert labels[label].help, label
    defaults = PruningOptions()
    assert at.selectbox(key="opt_criterion").value == defaults.criterion
    assert at.selectbox(key="opt_policy").value == defaults.policy
    assert at.selectbox(key="opt_layer_norm").value == defaults.layer_norm
    assert at.selectbox(key="opt_group_policy").value == defaults.group_policy
    assert at.selectbox(key="opt_reshape_channel_axis").value == defaults.reshape_channel_axis
    assert at.number_input(key="opt_step_size").value == defaults.step_size
    assert at.selectbox(key="opt_step_op").value == defaults.step_op


def test_the_static_score_chart_is_a_markdown_image_of_the_plan():
    """The Scores tab's static copy of the overview is plain Markdown (image syntax, a data
    URI, no HTML: the browser draws it without a lazily loaded script chunk) showing the
    engine's plan: one box per group and kept/pruned subset, with its channel count."""
    at = open_app(TIMEOUT)
    static = [m for m in at.markdown if m.value.startswith("![")]
    assert len(static) == 1
    assert not static[0].proto.allow_html
    svg = base64.b64decode(static[0].value.split(";base64,", 1)[1].removesuffix(")"))
    root = ET.fromstring(svg)
    titles = sorted(t.text for t in root.iter("{http://www.w3.org/2000/svg}title"))
    expected = _expected_plan(at, PruningOptions(), 0.5)
    assert titles == sorted(f"{g.name} {subset}: {n} channels" for g in expected.groups
                            for subset, n in (("kept", g.kept.size), ("pruned", g.pruned.size))
                            if n)


# ----------------------------------------------------------------------------- caching


def test_server_warm_up_leaves_the_first_session_nothing_to_load(monkeypatch):
    """`python -m dashboard.serve` warms up before it listens: the first session then finds
    the demo loaded and analysed (no load of its own) and draws its scores."""
    clear_shared_models()
    warm_up()
    loads = []
    real = engine.load_model
    monkeypatch.setattr(engine, "load_model",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    at = open_app(TIMEOUT)
    assert loads == []
    assert active_model(at).captured.source == "demo"
    chart_spec(at, "chart_overview")


def test_norm_policy_ratio_changes_do_not_recompute_raw_scores(monkeypatch):
    calls = []
    real = engine.scoring.analysis.weight_scores_by_dim

    def counting(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("criterion"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.scoring.analysis, "weight_scores_by_dim", counting)
    # the demo's analysis is shared by every session of the process (an earlier test may
    # have scored it already): start from a fresh one so that its first scoring is counted
    clear_shared_models()
    at = open_app(TIMEOUT)
    model = active_model(at)
    analysis = model.analysis
    first_calls = len(calls)
    assert first_calls > 0 and set(calls) == {"l2"}
    cached = analysis.filter_scores("l2")
    arrays = {k: v for k, v in cached.items()}
    before = chart_spec(at, "chart_overview")

    for norm in LAYER_NORMS[1:]:
        _set(at, "layer_norm", norm)
        at.run()
        app_ok(at)
        _check_overview(at, PruningOptions(layer_norm=norm), 0.5)
    for policy in POLICIES:
        _set(at, "policy", policy)
        at.run()
        app_ok(at)
    at.slider(key="opt_ratio").set_value(0.3).run()
    app_ok(at)
    # The chart did change (a redraw), yet no criterion ran again and nothing was replaced.
    assert chart_spec(at, "chart_overview") != before
    assert len(calls) == first_calls
    assert active_model(at).analysis is analysis
    assert analysis.filter_scores("l2") is cached
    assert all(cached[k] is v for k, v in arrays.items())
    # The comparison views re-plan with every norm/policy: still no new raw scores.
    at.segmented_control(key="score_view").set_value("Compare layer norms").run()
    app_ok(at)
    at.segmented_control(key="score_view").set_value("Compare policies").run()
    app_ok(at)
    assert len(calls) == first_calls
    # A different criterion is computed once, then cached too (the counter does count).
    at.segmented_control(key="score_view").set_value("Overview").run()
    _set(at, "criterion", "l1")
    at.run()
    app_ok(at)
    assert len(calls) == 2 * first_calls and calls[-1] == "l1"
    _set(at, "layer_norm", "tss_norm")
    at.run()
    _set(at, "criterion", "l2")
    at.run()
    app_ok(at)
    assert len(calls) == 2 * first_calls


# ----------------------------------------------------------------------------- options


def _default_value(option: str):
    return getattr(PruningOptions(), option)


OPTION_VALUES = {
    "criterion": CRITERIA,
    "policy": POLICIES,
    "layer_norm": LAYER_NORMS,
    "group_policy": GROUP_POLICIES,
    "reshape_channel_axis": RESHAPE_CHANNEL_AXES,
    "step_size": (1, 3, 8),
    "step_op": STEP_OPS,
}


def _index_setup(at: AppTest) -> dict[str, list[int]]:
    # A single-member group; one index per block keeps the blocks equal in size.
    group = next(g for g in active_model(at).analysis.groups if len(g.layers) == 1)
    blocks, size = group.blocks or (1, group.channels)
    chosen = [k * size + 1 for k in range(blocks)]
    indices = {group.layers[0]: chosen}
    at.text_area(key="opt_indices").set_value(f"{group.layers[0]}: {', '.join(map(str, chosen))}")
    return indices


def test_index_criterion_asks_for_indices_first():
    at = open_app(TIMEOUT)
    _set(at, "criterion", "index")
    at.run()
    assert not at.exception and not at.error
    assert any("Channel indices to remove" in i.value for i in at.info)
    at.session_state["main_tab"] = "Plan"
    at.run()
    app_ok(at)
    names = list(at.data_editor[0].value["Group"])
    assert names == [g.name for g in active_model(at).analysis.groups]
    at.text_area(key="opt_indices").set_value("no_such_layer: 1").run()
    assert not at.exception
    assert len(at.error) == 1 and "no_such_layer" in at.error[0].value


def test_every_option_value_runs_one_at_a_time():
    at = open_app(TIMEOUT)
    for option, values in OPTION_VALUES.items():
        for value in values:
            _set(at, option, value)
            at.run()
            kw = {}
            if option == "criterion" and value == "index":
                kw["indices"] = _index_setup(at)
                at.run()
            app_ok(at)
            _check_overview(at, replace(PruningOptions(), **{option: value}), 0.5, **kw)
        _set(at, option, _default_value(option))
        at.run()
        app_ok(at)
    for ratio in (0.0, 0.05, 0.9, 0.95):
        at.slider(key="opt_ratio").set_value(ratio).run()
        app_ok(at)
        _check_overview(at, PruningOptions(), ratio)


@pytest.mark.parametrize(
    "combo",
    [
        {"criterion": "gm", "policy": "sum", "layer_norm": "tss_norm", "group_policy": "count",
         "reshape_channel_axis": -2, "step_size": 4, "step_op": "round_up"},
        {"criterion": "nuclear_norm", "policy": "backward", "layer_norm": "softmax_norm",
         "group_policy": "none", "reshape_channel_axis": 0, "step_size": 1, "step_op": "none"},
        {"criterion": "random", "policy": "average", "layer_norm": "linear_scaling",
         "group_policy": "sum", "reshape_channel_axis": 1, "step_size": 8,
         "step_op": "round_down"},
    ],
)
def test_option_combinations_on_every_view(combo):
    at = open_app(TIMEOUT)
    for option, value in combo.items():
        _set(at, option, value)
    at.slider(key="opt_ratio").set_value(0.7)
    at.run()
    app_ok(at)
    options = PruningOptions(**combo)
    _check_overview(at, options, 0.7)
    for view in ("Compare layer norms", "Compare policies", "Overview"):
        at.segmented_control(key="score_view").set_value(view).run()
        app_ok(at)
    at.session_state["main_tab"] = "Plan"
    at.run()
    app_ok(at)


# ----------------------------------------------------------------------------- comparisons


def test_compare_layer_norms_one_trace_per_norm_with_each_cut():
    at = open_app(TIMEOUT)
    at.slider(key="opt_ratio").set_value(0.4)
    at.segmented_control(key="score_view").set_value("Compare layer norms").run()
    app_ok(at)
    spec = chart_spec(at, "chart_norms")
    boxes = _traces(spec, kind="box")
    assert [b["name"] for b in boxes] == list(LAYER_NORMS)
    groups = [g.name for g in active_model(at).analysis.groups]
    cuts = _traces(spec, "global cut")
    for norm, box in zip(LAYER_NORMS, boxes):
        assert box["x"] == groups
        expected = _expected_plan(at, PruningOptions(layer_norm=norm), 0.4)
        axis_cuts = [c for c in cuts if c.get("yaxis") == box.get("yaxis")]
        assert len(axis_cuts) == 1
        assert axis_cuts[0]["y"] == pytest.approx([expected.threshold] * len(groups))
    counts = chart_spec(at, "chart_norm_counts")
    assert [t["name"] for t in counts["data"]] == list(LAYER_NORMS)
    for trace in counts["data"]:
        expected = _expected_plan(at, PruningOptions(layer_norm=trace["name"]), 0.4)
        assert trace["y"] == [int(g.pruned.size) for g in expected.groups]


def test_compare_policies_for_connected_groups():
    at = open_app(TIMEOUT)
    at.segmented_control(key="score_view").set_value("Compare policies").run()
    app_ok(at)
    connected = [g.name for g in active_model(at).analysis.groups if len(g.layers) > 1]
    assert connected, "the demo has residual (connected) groups"
    choose = [s for s in at.selectbox if s.label == "Connected group"][0]
    assert list(choose.options) == connected
    spec = chart_spec(at, "chart_policies")
    bars = _traces(spec, kind="bar")
    assert [b["name"] for b in bars] == list(POLICIES)
    for bar in bars:
        plan = _expected_plan(at, PruningOptions(policy=bar["name"]), 0.5)
        gp = plan.group(connected[0])
        assert bar["y"] == pytest.approx(gp.scores.tolist())
        red = [i for i, c in enumerate(bar["marker"]["color"]) if c == "#e03131"]
        assert red == gp.pruned.tolist()


# ----------------------------------------------------------------------------- plan tab


def test_plan_table_lists_groups_and_applies_own_ratio_and_pin():
    at = open_app(TIMEOUT)
    at.session_state["main_tab"] = "Plan"
    at.run()
    app_ok(at)
    model = active_model(at)
    editor = at.data_editor[0]
    table = editor.value
    assert list(table["Group"]) == [g.name for g in model.analysis.groups]
    assert list(table["Channels"]) == [g.channels for g in model.analysis.groups]
    assert list(table["To prune"] + table["Kept"]) == list(table["Channels"])
    frozen = at.dataframe[-1].value
    assert list(frozen["Reason"]) == [f.reason for f in model.analysis.frozen]

    groups = [g.name for g in model.analysis.groups]
    at.session_state[editor.key] = {
        "edited_rows": {1: {"Own ratio": "0.25"}},
        "added_rows": [], "deleted_rows": [],
    }
    at.get("button_group")[0].set_value([groups[0]])  # the pin: one pill
    at.run()
    app_ok(at)
    table = at.data_editor[0].value
    expected = _expected_plan(at, PruningOptions(), 0.5, ratios={groups[1]: 0.25},
                              pinned=(groups[0],))
    assert table["To prune"].iloc[0] == 0
    assert list(table["To prune"]) == [int(g.pruned.size) for g in expected.groups]
    # The Scores tab follows the table.
    at.session_state["main_tab"] = "Scores"
    at.run()
    _check_overview(at, PruningOptions(), 0.5, ratios={groups[1]: 0.25}, pinned=(groups[0],))


# ----------------------------------------------------------------------------- prune


def _prune(at: AppTest) -> None:
    at.session_state["main_tab"] = "Prune & compare"
    at.run()
    app_ok(at)
    at.button(key="prune").click().run()
    app_ok(at)


def _table(at: AppTest, first_column: str):
    for df in at.dataframe:
        value = df.value
        if first_column in value.columns:
            return value
    raise AssertionError(f"no table with column {first_column!r}")


def test_prune_shows_before_after_fidelity_and_downloads():
    at = open_app(TIMEOUT)
    _prune(at)
    run = at.session_state["_ps_result"]
    metrics = _table(at, "Metric").set_index("Metric")
    assert {"Parameters", "FLOPs", "Size", "CPU latency"} <= set(metrics.index)
    assert run.after["params"] < run.before["params"]
    assert run.after["flops"] < run.before["flops"]
    # Fidelity: accuracy before matches an independent run of the original demo program.
    x, y = load_demo_eval()
    with torch.no_grad():
        logits = engine.load_model("demo").program.module()(torch.from_numpy(x))
    accuracy = float((logits.argmax(1).numpy() == y).mean())
    assert run.fidelity["accuracy_before"] == pytest.approx(accuracy)
    assert 0.0 <= run.fidelity["accuracy_after"] <= 1.0
    assert 0.0 <= run.fidelity["top1_agreement"] <= 1.0
    assert run.fidelity["relative_error"] > 0.0  # half the channels went: outputs moved
    fidelity = _table(at, "Measure").set_index("Measure")
    assert fidelity.loc["Accuracy before", "Value"] == f"{accuracy:.2%}"
    labels = [b.label for b in at.download_button]
    assert {"Download model.pt2", "Download report.json"} <= set(labels)
    pt2 = next(p for p in run.files.values() if p.name == "model.pt2")
    program = torch.export.load(str(pt2))
    with torch.no_grad():
        out = program.module()(torch.from_numpy(x[:16]))
    assert out.shape == (16, logits.shape[1])
    report_path = next(p for p in run.files.values() if p.name == "report.json")
    assert json.loads(report_path.read_text())["after"]["params"] == run.after["params"]
    # model.onnx is made on request: a button until then, then the download of the pruned model
    assert "Download model.onnx" not in labels
    assert sorted(p.name for p in pt2.parent.iterdir()) == ["model.pt2", "report.json"]
    at.button(key="make_dl_model_onnx").click().run()
    app_ok(at)
    assert "Download model.onnx" in [b.label for b in at.download_button]
    assert not [b for b in at.button if b.key == "make_dl_model_onnx"]
    session = onnxruntime.InferenceSession(str(pt2.parent / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x[:16]})[0]
    np.testing.assert_allclose(onnx_out, out.numpy(), rtol=1e-4, atol=1e-4)
    assert json.loads(report_path.read_text())["onnx"]["max_abs_diff_vs_torch"] < 1e-3
    # Changing an option marks the result as stale instead of silently mixing them.
    at.slider(key="opt_ratio").set_value(0.2).run()
    app_ok(at)
    assert any("earlier settings" in w.value and "ratio" in w.value for w in at.warning)


# ----------------------------------------------------------------------------- graphs


def _iframes(at: AppTest) -> list[str]:
    return [el.proto.src for el in at.get("iframe")]


def test_graphs_tab_serves_netron_once_per_file():
    at = open_app(TIMEOUT)
    at.session_state["main_tab"] = "Graphs"
    at.run()
    app_ok(at)
    (url,) = _iframes(at)
    assert url.startswith("http://127.0.0.1:")
    servers = len(netron_server.running())
    at.run()
    at.run()
    assert _iframes(at) == [url]
    assert len(netron_server.running()) == servers
    with urllib.request.urlopen(url, timeout=10) as page:
        assert b"Netron" in page.read()
    with urllib.request.urlopen(url + "data/original.onnx", timeout=10) as data:
        body = data.read()
    import onnx

    assert onnx.load_from_string(body).graph.node
    _prune(at)
    at.session_state["main_tab"] = "Graphs"
    at.run()
    app_ok(at)
    urls = _iframes(at)
    assert len(urls) == 2 and urls[0] == url and urls[1] != url
    # Each frame serves its own file (netron keeps the served file on a shared class).
    for frame_url, name in zip(urls, ("original.onnx", "model.onnx")):
        with urllib.request.urlopen(frame_url, timeout=10) as page:
            assert f'content="/data/{name}"'.encode() in page.read()
    with urllib.request.urlopen(urls[1] + "data/model.onnx", timeout=10) as data:
        pruned = onnx.load_from_string(data.read())
    with urllib.request.urlopen(url + "data/original.onnx", timeout=10) as data:
        original = onnx.load_from_string(data.read())
    size = sum(int(np.prod(t.dims)) for t in pruned.graph.initializer)
    assert size < sum(int(np.prod(t.dims)) for t in original.graph.initializer)


# ----------------------------------------------------------------------------- bad input


def test_bad_upload_shows_error_and_demo_stays_usable():
    at = open_app(TIMEOUT)
    at.radio(key="source").set_value("Upload .pt2").run()
    assert not at.exception
    at.file_uploader(key="upload_pt2").upload("broken.pt2", b"this is not a zip archive").run()
    assert not at.exception
    assert len(at.error) == 1
    message = at.error[0].value
    assert "broken.pt2" in message and "Traceback" not in message and "\n" not in message
    # The demo is still there and still works.
    assert active_model(at).captured.source == "demo"
    _check_overview(at, PruningOptions(), 0.5)
    _set(at, "layer_norm", "tss_norm")
    at.run()
    assert not at.exception
    _check_overview(at, PruningOptions(layer_norm="tss_norm"), 0.5)
    at.radio(key="source").set_value("Demo model").run()
    app_ok(at)


def test_bad_paths_and_data_show_one_line_errors(tmp_path):
    at = open_app(TIMEOUT)
    at.radio(key="source").set_value("Local file path").run()
    cases = {
        str(tmp_path / "missing.pt2"): "not found",
        str(_write(tmp_path / "notes.txt", b"hello")): "unsupported",
        str(_write(tmp_path / "empty.pt2", b"")): "empty",
        str(_write(tmp_path / "model.pt", b"junk")): "pickle",
    }
    for path, words in cases.items():
        at.text_input(key="local_path").set_value(path).run()
        assert not at.exception
        assert len(at.error) == 1, path
        assert words in at.error[0].value.lower()
        assert "\n" not in at.error[0].value
        assert chart_spec(at, "chart_overview")  # the demo is still drawn
    bad = io.BytesIO()
    np.savez(bad, inputs=np.zeros((2, 1, 8, 8), np.float32))
    at.radio(key="source").set_value("Demo model").run()
    at.file_uploader(key="upload_eval").upload("data.npz", bad.getvalue()).run()
    assert not at.exception
    assert any("data.npz has no array 'x' (found: inputs)" in e.value for e in at.error)
    assert chart_spec(at, "chart_overview")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_local_pt2_path_loads_and_plans(tmp_path):
    torch.manual_seed(0)
    model = _Tiny().eval()
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 1, 8, 8),)), str(path))
    at = open_app(TIMEOUT)
    at.radio(key="source").set_value("Local file path").run()
    at.text_input(key="local_path").set_value(str(path)).run()
    app_ok(at)
    loaded = active_model(at)
    assert loaded.captured.source == str(path.resolve())
    assert {layer for g in loaded.analysis.groups for layer in g.layers} == {"conv1", "conv2"}
    spec = chart_spec(at, "chart_overview")
    assert spec["layout"]["xaxis"]["categoryarray"] == [g.name for g in loaded.analysis.groups]
    # Without evaluation data there is nothing to calibrate nuclear_norm with: say so.
    _set(at, "criterion", "nuclear_norm")
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "calibration data" in at.error[0].value
    # With an .npz of matching inputs it scores, and the scores change.
    data = _npz(x=torch.randn(16, 1, 8, 8).numpy(), y=np.arange(16) % 3)
    at.file_uploader(key="upload_eval").upload("calib.npz", data).run()
    app_ok(at)
    assert len(at.session_state["_ps_eval"][1]) == 16
    _check_overview(at, PruningOptions(criterion="nuclear_norm"), 0.5)


def test_trusted_pickle_upload_with_input_shape(tmp_path):
    buf = io.BytesIO()
    torch.save(_Tiny().eval(), buf)
    at = open_app(TIMEOUT)
    at.radio(key="source").set_value("Upload .pt (pickle)").run()
    assert at.file_uploader(key="upload_pt").proto.disabled  # no upload before the box is ticked
    at.checkbox(key="trust_pickle").check()
    at.text_input(key="pt_shapes").set_value("1,1,8,8")
    at.run()
    at.file_uploader(key="upload_pt").upload("tiny.pt", buf.getvalue()).run()
    app_ok(at)
    loaded = active_model(at)
    assert loaded.captured.source.endswith("tiny.pt")
    assert tuple(loaded.captured.example_inputs[0].shape) == (1, 1, 8, 8)
    # A bad shape is a readable error, and the loaded model stays.
    at.text_input(key="pt_shapes").set_value("1,a,8").run()
    assert not at.exception
    assert len(at.error) == 1 and "input shape" in at.error[0].value
    assert active_model(at) is loaded


# ----------------------------------------------------------------------------- helpers


def test_uploads_go_to_a_private_session_folder_that_is_removed():
    import os
    import stat
    import subprocess
    import sys

    from dashboard import sources

    at = open_app(TIMEOUT)
    at.radio(key="source").set_value("Upload .pt2").run()
    at.file_uploader(key="upload_pt2").upload("first.pt2", b"not a model").run()
    files = at.session_state["_ps_files"]
    root = files.root
    stored = list(root.rglob("first.pt2"))
    assert len(stored) == 1 and stored[0].read_bytes() == b"not a model"
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700  # private to this user
    # A new upload replaces the previous one instead of piling up.
    at.file_uploader(key="upload_pt2").set_value(("second.pt2", b"still not", "x")).run()
    assert [p.name for p in root.rglob("*.pt2")] == ["second.pt2"]
    # Once the runtime no longer knows the session, the next page run's sweep removes it.
    (session_id,) = [sid for sid, f in sources._by_session.items() if f is files]
    assert sources.sweep(lambda sid: sid != session_id) == [root]
    assert not root.exists()
    # And whatever is left goes when the server process exits.
    code = ("from dashboard.sources import SessionFiles; f = SessionFiles(); "
            "(f.root / 'x.pt2').write_bytes(b'1'); print(f.root)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    left = Path(out.stdout.strip())
    assert left.name.startswith("prunescope-") and not left.exists()


def test_shapes_and_npz_parsing():
    from dashboard import sources
    from engine.errors import ModelLoadError

    assert sources.parse_shapes("1,3,224,224") == ((1, 3, 224, 224),)
    assert sources.parse_shapes("(1, 16); 1x16") == ((1, 16), (1, 16))
    for bad in ("", "1,a", "1,0,3"):
        with pytest.raises(ModelLoadError):
            sources.parse_shapes(bad)
    good = io.BytesIO()
    np.savez(good, x=np.zeros((4, 2), np.float64), y=np.array([0, 1, 1, 0]))
    data = sources.load_upload(good.getvalue(), "good.npz")
    assert len(data) == 4 and list(data.labels) == [0, 1, 1, 0]
    assert data.where == "evaluation data good.npz"
    cases = {
        b"garbage": "evaluation data file up.npz is unreadable",
        _npz(x=np.zeros((3, 2)), y=np.array([0.5, 1, 2])): "integer class indices",
        _npz(x=np.zeros((3, 2)), y=np.array([0, 1])): r"shape \(2,\) for 3 samples",
        _npz(x=np.zeros((0, 2))): "at least one sample",
    }
    for raw, words in cases.items():
        with pytest.raises(ModelLoadError, match=words):
            sources.load_upload(raw, "up.npz")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_fidelity_measures():
    from dashboard.evaluate import evaluate_pair
    from engine.io.data import DataSet

    class Fixed(torch.nn.Module):
        """Returns the row of a fixed table named by the sample's first value."""

        def __init__(self, table):
            super().__init__()
            self.table = torch.tensor(table, dtype=torch.float32)

        def forward(self, x):
            return self.table[x[:, 0].long()]

    before = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    after = before.copy()
    after[1] = [3.0, 0.0, 1.0]  # sample 1 flips from class 1 to class 0
    y = np.array([0, 1, 2, 1])
    x = np.arange(4, dtype=np.float32).reshape(4, 1)
    data = DataSet((x,), y, "table rows")
    result = evaluate_pair(Fixed(before), Fixed(after), data, (torch.from_numpy(x),))
    assert result["top1_agreement"] == 0.75
    assert result["relative_error"] == pytest.approx(np.sqrt(18 / 57))  # (3² + 3²) / Σ before²
    assert result["accuracy_before"] == 0.75 and result["accuracy_after"] == 0.5


def test_fidelity_cache_runs_the_original_once_and_gives_the_fresh_numbers():
    """The model cache (one Prune, then Recover's two comparisons) must give exactly what a
    fresh evaluate_pair gives, while the original runs on the same data only once."""
    from dashboard.evaluate import evaluate_pair
    from engine.io.data import DataSet

    class Counted(torch.nn.Module):
        """Returns the row of a fixed table named by the sample's first value; counts calls."""

        def __init__(self, table):
            super().__init__()
            self.table = torch.tensor(table, dtype=torch.float32)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.table[x[:, 0].long()]

    before = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    pruned_table, recovered_table = before.copy(), before.copy()
    pruned_table[1] = [3.0, 0.0, 1.0]
    recovered_table[3] = [0.0, 0.0, 4.0]
    x = np.arange(4, dtype=np.float32).reshape(4, 1)
    example = (torch.from_numpy(x),)
    data = DataSet((x,), np.array([0, 1, 2, 1]), "table rows")
    other = DataSet((x,), np.array([1, 0, 2, 0]), "other labels")
    original, pruned, recovered = (Counted(t) for t in (before, pruned_table, recovered_table))

    def fresh(model, table_data):
        return evaluate_pair(Counted(before), model, table_data, example)

    cache: dict = {}
    first = evaluate_pair(original, pruned, data, example, cache=cache, remember=True)
    assert first == fresh(pruned, data)
    runs_of_original, runs_of_pruned = original.calls, pruned.calls
    assert runs_of_original > 0 and runs_of_pruned > 0
    # Recover's "pruned" column: the Prune step's numbers, nothing run again
    assert evaluate_pair(original, pruned, data, example, cache=cache) == first
    assert (original.calls, pruned.calls) == (runs_of_original, runs_of_pruned)
    # Recover's "recovered" column: only the recovered model runs
    after = evaluate_pair(original, recovered, data, example, cache=cache)
    assert after == fresh(recovered, data) and after != first
    assert original.calls == runs_of_original and recovered.calls > 0
    # other data (other labels, same inputs) is measured afresh, not taken from the cache
    on_other = evaluate_pair(original, pruned, other, example, cache=cache)
    assert on_other == fresh(pruned, other) and on_other != first
    assert original.calls > runs_of_original


class _SvdHead(torch.nn.Module):
    """Prunable, but its output goes through SVD, which has no ONNX translation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        return torch.linalg.svd(self.fc2(torch.relu(self.fc1(x))).reshape(-1, 4, 4)).S


def test_a_model_onnx_cannot_express_prunes_and_says_so_where_onnx_is_asked_for(tmp_path):
    """Prune writes model.pt2 and report.json; the failed conversion is one line under the
    button that asked for it, and report.json records it."""
    torch.manual_seed(0)
    path = tmp_path / "svd.pt2"
    torch.export.save(torch.export.export(_SvdHead().eval(), (torch.randn(3, 16),)), str(path))
    at = open_app(TIMEOUT)
    at.radio(key="source").set_value("Local file path").run()
    at.text_input(key="local_path").set_value(str(path)).run()
    app_ok(at)
    _prune(at)
    run = at.session_state["_ps_result"]
    assert {"Download model.pt2", "Download report.json"} <= {b.label for b in at.download_button}
    at.button(key="make_dl_model_onnx").click().run()
    assert not at.exception
    (error,) = at.error
    assert error.value.startswith("model.onnx not written: ") and "svd" in error.value.lower()
    assert "\n" not in error.value
    folder = run.files["model.pt2"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt2", "report.json"]
    assert "svd" in json.loads((folder / "report.json").read_text())["onnx"]["error"].lower()
    assert "Download model.onnx" not in {b.label for b in at.download_button}
