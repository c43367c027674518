"""The dashboard's uniform switch and its whole-block removal, driven by AppTest on the real
engine: uniform plans on a transformers folder (hf/ zip offered), blocks removed by Prune."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

import engine
from dashboard.tabs.prune import zip_folder
from engine.demo import DEMO_LM_HF_DIR
from engine.options import PruningOptions
from engine.transform.depth import plan_depth
from tests.helpers import active_model, app_ok

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
TIMEOUT = 400


def _tab(at: AppTest, name: str) -> None:
    at.session_state["main_tab"] = name
    at.run()
    app_ok(at)


def _plan_table(at: AppTest) -> dict[str, int]:
    _tab(at, "Plan")
    table = at.data_editor[0].value
    return dict(zip(table["Group"], (int(v) for v in table["To prune"])))


def _families(counts: dict[str, int]) -> dict[str, list[int]]:
    """Counts of the groups that are one layer repeated (names equal without layer numbers)."""
    out: dict[str, list[int]] = defaultdict(list)
    for name, n in counts.items():
        if re.search(r"\.\d+\.", name):
            out[re.sub(r"\.\d+\.", ".#.", name)].append(n)
    return {k: v for k, v in out.items() if len(v) > 1}


def test_uniform_switch_evens_repeated_layers_and_offers_hf_zip(tmp_path):
    import transformers as tf

    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.radio(key="source").set_value("Local file path").run()
    at.text_input(key="local_path").set_value(str(DEMO_LM_HF_DIR)).run()
    app_ok(at)
    assert active_model(at).captured.hf is not None
    switch = at.toggle(key="opt_uniform")
    assert switch.value is True, "on by default for a transformers model"
    assert "hf/" in switch.help

    # The engine's plans, made outside the page on a fresh analysis of the folder's capture
    # (the page's own, not captured a second time: the plans, not the capture, are compared).
    analysis = engine.analyze(active_model(at).captured)
    assert analysis is not active_model(at).analysis
    options = PruningOptions()
    free = {g.name: int(g.pruned.size) for g in
            engine.plan(analysis, options, ratio=0.5, uniform=False).groups}
    even = {g.name: int(g.pruned.size) for g in
            engine.plan(analysis, options, ratio=0.5, uniform=True).groups}
    assert any(len(set(v)) > 1 for v in _families(free).values()), \
        "at ratio 0.5 the free ranking cuts the MLPs of different layers differently"

    at.toggle(key="opt_uniform").set_value(False).run()
    app_ok(at)
    assert _plan_table(at) == free
    at.toggle(key="opt_uniform").set_value(True).run()
    app_ok(at)
    shown = _plan_table(at)
    assert shown == even
    families = _families(shown)
    assert families and all(len(set(v)) == 1 for v in families.values()), families
    # The Scores tab marks the same uniform plan.
    _tab(at, "Scores")
    spec = json.loads(next(el for el in at.get("plotly_chart")
                           if getattr(el, "key", None) == "chart_overview").proto.spec)
    bars = {t["name"]: t["y"] for t in spec["data"] if t.get("type") == "bar"}
    assert bars["pruned channels"] == list(even.values())

    _tab(at, "Prune & compare")
    at.button(key="prune").click().run()
    app_ok(at)
    run = at.session_state["_ps_result"]
    report = json.loads(run.files["report.json"].read_text())
    assert {g["name"]: len(g["pruned"]) for g in report["groups"]} == even
    assert report["hf"]["written"] is True and "uniform" in report
    assert "Download hf/ (zip)" in [b.label for b in at.download_button]
    archive = zipfile.ZipFile(io.BytesIO(zip_folder(run.files["hf"])))
    archive.extractall(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                     local_files_only=True).eval()
    mlp = next(n for n in even if n.endswith("mlp.gate_proj+1"))
    original = json.loads((DEMO_LM_HF_DIR / "config.json").read_text())
    assert loaded.config.intermediate_size == original["intermediate_size"] - even[mlp]
    inputs = tuple(run.result.example_inputs)  # the saved program's own inputs, by name
    with torch.no_grad():
        want = torch.export.load(str(run.files["model.pt2"])).module()(*inputs)
        got = loaded(**dict(zip(active_model(at).captured.hf.input_names, inputs))).logits
    want = want if isinstance(want, torch.Tensor) else want[0]
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_uniform_is_off_by_default_for_a_plain_model():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    app_ok(at)
    assert active_model(at).captured.hf is None
    assert at.toggle(key="opt_uniform").value is False


def test_blocks_chosen_in_the_blocks_tab_are_removed_by_prune():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    app_ok(at)
    _tab(at, "Blocks")
    at.slider(key="blocks_to_remove").set_value(1).run()
    app_ok(at)
    # Prune on another tab: the Blocks tab's widgets are gone, the choice is not.
    _tab(at, "Prune & compare")
    assert any("1 whole residual block" in i.value for i in at.info)
    at.button(key="prune").click().run()
    app_ok(at)
    run = at.session_state["_ps_result"]
    report = run.result.report
    # The engine's own choice, outside the page: the lowest-scoring block on the demo's
    # calibration set (what the Blocks tab scores on).
    _blocks, depth = plan_depth(engine.analyze("demo"), calibration="demo")
    lowest = min(depth["blocks"], key=lambda b: b["score"])["name"]
    assert [b["name"] for b in report["blocks"] if b["removed"]] == [lowest]
    assert report["depth"]["verification"]["exact"] is True
    saved = json.loads(run.files["report.json"].read_text())
    assert [b["name"] for b in saved["blocks"] if b["removed"]] == [lowest]
    assert any(lowest in c.value for c in at.caption)
    width_only = engine.prune("demo", options=PruningOptions(), ratio=0.5)
    assert run.after["params"] < width_only.after["params"]
    assert run.before["params"] == width_only.before["params"]
    # Going back to no block removal makes the result stale.
    _tab(at, "Blocks")
    assert at.slider(key="blocks_to_remove").value == 1
    at.slider(key="blocks_to_remove").set_value(0).run()
    _tab(at, "Prune & compare")
    assert any("earlier settings" in w.value and "blocks to remove" in w.value for w in at.warning)


def test_plan_tab_pins_give_way_to_block_removal(tmp_path):
    """Pins name the full model's groups; after a block goes the model is re-captured with
    other groups, so the Prune step applies the global ratio and says so."""
    from dashboard.prune_run import PER_GROUP_DROPPED, run_prune
    from dashboard.state import LoadedModel

    captured = engine.load_model("demo")
    model = LoadedModel("demo:test", "demo", captured, engine.analyze(captured))
    first = model.analysis.groups[0].name
    plan_args = {"ratio": 0.5, "ratios": {}, "pinned": [first], "calibration": "demo",
                 "indices": None, "uniform": False}
    plan = engine.plan(model.analysis, PruningOptions(), ratio=0.5, pinned=(first,),
                       calibration="demo")
    run = run_prune(engine, model, plan, tmp_path, None, "sig", 0.5, plan_args=plan_args,
                    structures={"remove_blocks": 1, "expert_ratio": None})
    assert PER_GROUP_DROPPED in run.notes
    assert sum(b["removed"] for b in run.result.report["blocks"]) == 1
    reference = engine.prune("demo", options=PruningOptions(), ratio=0.5, remove_blocks=1,
                             calibration="demo")
    assert run.after["params"] == reference.after["params"]
