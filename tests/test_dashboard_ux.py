"""Issue 21 (dashboard v3) items 2-9, "Start here" and "Results in view", driven through the
real page with streamlit.testing AppTest on the real demo models and engine."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import engine
from dashboard.sidebar import index_example, parse_indices
from engine.demo import load_demo_eval
from tests.helpers import active_model, app_ok, chart_spec, open_app

TIMEOUT = 300


def _texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def _tab(at: AppTest, name: str) -> AppTest:
    at.session_state["main_tab"] = name
    return at.run()


def _button(at: AppTest, key: str):
    return next(b for b in at.button if b.key == key)


def _table(at: AppTest, first_column: str):
    for frame in at.dataframe:
        if frame.value.columns[0] == first_column:
            return frame.value
    raise AssertionError(f"no table with column {first_column!r}")


def test_start_here_on_the_first_screen_and_terms_reach_from_charts():
    at = open_app(TIMEOUT)
    # the six steps' names in one line above the tabs, what to do at each under "Start here"
    strip = " ".join(_texts(at.caption))
    assert "**1** Pick a model → **2** See the scores → **3** Compare on accuracy" in strip
    popovers: dict = {}
    for popover in at.get("popover"):
        popovers.setdefault(popover.proto.popover.label, popover)  # the first of each label
    steps = " ".join(_texts(popovers["Start here"].markdown))
    for step in ("1. **Pick a model**", "3. **Compare on accuracy**", "5. **Recover**",
                 "6. **Download**"):
        assert step in steps
    # the glossary is one click from the score chart
    terms = " ".join(_texts(popovers["Terms"].markdown))
    for term in ("**group**", "**global cut**", "**frozen**", "**group policy**",
                 "**step rule**"):
        assert term in terms
    assert not at.expander  # nothing folded open above the tabs pushes them down


def test_demo_lm_recovers_with_its_own_calibration_and_disabled_says_why():
    at = open_app(TIMEOUT)
    at.sidebar.radio(key="source").set_value("Demo language model (demo-lm)").run()
    app_ok(at)
    _tab(at, "Prune & compare")
    _button(at, "prune").click().run()
    app_ok(at)
    captions = " ".join(_texts(at.caption))
    assert "demo-lm's own training split" in captions
    recover = _button(at, "recover")
    assert not recover.disabled
    # the budget is distillation's: shown only with distill
    assert not [n for n in at.number_input if n.key == "recover_budget"]
    at.multiselect(key="recover_methods").set_value([]).run()
    assert _button(at, "recover").disabled
    assert "Recover is disabled: Choose at least one method." in _texts(at.caption)
    at.multiselect(key="recover_methods").set_value(["bias", "distill"]).run()
    assert [n for n in at.number_input if n.key == "recover_budget"]
    # recover with distill alone, for the shortest budget: the page hands the chosen
    # methods to engine.recover as they are, and only this page test runs distill (bias on
    # a Llama is test_hf_config's, a data-light method from the page test_dashboard_recover's)
    at.multiselect(key="recover_methods").set_value(["distill"]).run()
    at.number_input(key="recover_budget").set_value(1).run()
    _button(at, "recover").click().run()
    app_ok(at)
    table = next(f.value for f in at.dataframe if "Recovered" in f.value.columns)
    assert "Perplexity" in list(table["Measure"])
    done = active_model(at).cache["_ps_recover"]
    assert done.recovery["methods"] == ["distill"] and done.recovery["distill"]["steps"] > 0
    report = json.loads(done.files["report.json"].read_text())
    assert report["quality"]["metric"] == "perplexity"
    assert report["quality"]["recovered"] == done.scores["Perplexity"]["recovered"]


def test_index_example_works_on_the_demo_and_errors_use_page_words():
    at = open_app(TIMEOUT)
    at.sidebar.selectbox(key="opt_criterion").set_value("index").run()
    app_ok(at)
    example = index_example(active_model(at).analysis)
    _button(at, "opt_indices_example").click().run()
    app_ok(at)
    assert at.sidebar.text_area(key="opt_indices").value == example
    spec = chart_spec(at, "chart_overview")  # the Scores tab is drawn, not blank
    pruned = next(t for t in spec["data"] if t.get("name") == "pruned channels")
    expected = engine.plan(active_model(at).analysis, {"criterion": "index"}, ratio=0.5,
                           indices=parse_indices(example))
    assert pruned["y"] == [int(g.pruned.size) for g in expected.groups]
    assert sum(pruned["y"]) > 0
    # an unknown layer: one line in the page's words, never the CLI flag
    at.sidebar.text_area(key="opt_indices").set_value("nope: 1").run()
    errors = _texts(at.error)
    assert len(errors) == 1 and "--indices" not in errors[0]
    assert "Channel indices to remove" in errors[0]
    assert any("No scores to draw" in t for t in _texts(at.info))


def test_mismatched_evaluation_data_is_refused_at_once():
    at = open_app(TIMEOUT)
    at.sidebar.radio(key="source").set_value("Demo language model (demo-lm)").run()
    x, y = load_demo_eval()  # the digit classifier's images, not demo-lm's token ids
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    at.sidebar.file_uploader(key="upload_eval").upload("digits.npz", buf.getvalue()).run()
    errors = _texts(at.sidebar.error)
    assert len(errors) == 1, errors
    assert "digits.npz does not fit" in errors[0] and "not used" in errors[0]
    assert "demo-lm evaluation set is used instead" in errors[0]
    captions = " ".join(_texts(at.caption))
    assert "digits.npz" not in captions and "450 samples" not in captions
    assert "demo-lm evaluation set" in captions


@pytest.fixture(scope="module")
def pruned_demo() -> tuple[AppTest, list[str]]:
    """The demo pruned once at the default settings on the Prune & compare tab, shared by
    the two tests that read a first prune (one Prune instead of two), in file order:
    test_inexact_verification_is_shown puts back what it changes, then
    test_prune_results_in_view_report_matches_page_and_history goes on to a second run.
    Returns the page and the captions it showed before the click."""
    at = open_app(TIMEOUT)
    _tab(at, "Prune & compare")
    assert "_ps_result" not in at.session_state
    captions = _texts(at.caption)
    _button(at, "prune").click().run()
    app_ok(at)
    return at, captions


def test_inexact_verification_is_shown(pruned_demo):
    at, _ = pruned_demo
    run = at.session_state["_ps_result"]
    verification = run.result.report["verification"]
    kept = copy.deepcopy(verification)
    assert "attn.v_proj" not in " ".join(_texts(at.warning))  # not the real run's groups
    verification.update(exact=False, inexact_groups=["attn.v_proj"],
                        max_abs_diff_vs_masked=0.25)
    try:
        at.run()
        warning = " ".join(_texts(at.warning))
        assert "verification.exact is false" in warning and "attn.v_proj" in warning
    finally:  # the shared page's run as it was
        verification.clear()
        verification.update(kept)
        at.run()
    assert "attn.v_proj" not in " ".join(_texts(at.warning))


def test_prune_results_in_view_report_matches_page_and_history(pruned_demo):
    at, captions_before_prune = pruned_demo
    assert any("Ratio 0.50 removes" in c and "step rule" in c for c in captions_before_prune)
    run = at.session_state["_ps_result"]
    assert run.ratio == 0.5 and len(_table(at, "run")) == 1  # the first run, as it was left
    # accuracy change in points, not per cent, and said to be the number before recovery
    accuracy = next(m for m in at.metric if m.label == "Accuracy after pruning")
    assert "points" in accuracy.delta and "%" not in accuracy.delta.split("(")[0]
    fid = run.fidelity
    fall = next(w for w in _texts(at.warning) if "before any recovery" in w)
    assert f"{fid['accuracy_before']:.1%} to {fid['accuracy_after']:.1%}" in fall
    assert "**Recover**" in fall
    assert any(s.value == "Recover" for s in at.subheader)  # the step it points to is there
    # report.json carries the accuracy shown
    report = json.loads(run.files["report.json"].read_text())
    assert report["quality"]["original"] == run.fidelity["accuracy_before"]
    assert report["quality"]["pruned"] == run.fidelity["accuracy_after"]
    assert report["quality"]["data"] == "demo evaluation set"
    # widths before and after, per group
    widths = chart_spec(at, "chart_widths")
    after = next(t for t in widths["data"] if t["name"] == "after (pruned)")
    assert after["y"] == [len(g["kept"]) for g in report["groups"]]
    # a second run with other settings: history of both, and a stale warning naming them
    at.sidebar.toggle(key="opt_uniform").set_value(True).run()
    warning = " ".join(_texts(at.warning))
    assert "uniform: off → on" in warning and "layer_norm" not in warning
    at.sidebar.slider(key="opt_ratio").set_value(0.3).run()
    _button(at, "prune").click().run()
    app_ok(at)
    history = _table(at, "run")
    assert list(history["run"]) == [1, 2] and list(history["ratio"]) == [0.5, 0.3]
    # narrow enough for 1440 px: options that differ from the defaults in one column
    assert len(history.columns) <= 10, list(history.columns)
    assert list(history["options"]) == ["defaults", "defaults"]  # uniform is no option
    assert {"params kept", "before → after"} <= set(history.columns)
    csv = next(b for b in at.get("download_button") if b.proto.label.startswith(
        "Download the runs"))
    assert csv is not None


def test_plan_table_members_whole_no_none_pins_in_one_click():
    at = open_app(TIMEOUT)
    _tab(at, "Plan")
    app_ok(at)
    table = at.data_editor[0].value
    groups = active_model(at).analysis.groups
    assert list(table["Member layers"]) == [", ".join(g.layers) for g in groups]
    assert "None" not in table.astype(str).to_numpy().ravel().tolist()
    assert not table["Own ratio"].isna().any()
    pins = at.get("button_group")[0]
    pins.set_value([groups[0].name]).run()  # one click on the group's pill
    app_ok(at)
    table = at.data_editor[0].value
    assert table["To prune"].iloc[0] == 0 and table["Pinned"].iloc[0] == "yes"
    _tab(at, "Scores")
    _tab(at, "Plan")  # the pin outlives the tab being closed
    assert at.data_editor[0].value["To prune"].iloc[0] == 0


def test_auto_ratios_move_the_sidebar_and_say_overshoot_and_accuracy():
    at = open_app(TIMEOUT)
    _tab(at, "Compare on accuracy")
    _button(at, "auto_run").click().run()
    app_ok(at)
    ratios = at.session_state[f"auto_ratios_{next(iter(_short_keys(at)))}"]
    model = active_model(at)
    plan = engine.plan(model.analysis, {}, ratios=ratios)
    share = plan.total_pruned / plan.total_channels
    assert at.sidebar.slider(key="opt_ratio").value == round(share, 2)
    summary = " ".join(_texts(at.success))
    assert "Target: remove 50% of the FLOPs" in summary
    assert "Accuracy on demo evaluation set: chosen ratios" in summary
    # the sensitivity heatmap speaks of a drop for accuracy
    heat = chart_spec(at, "sens_heatmap")
    assert "accuracy drop" in heat["data"][0]["colorbar"]["title"]["text"]


def _short_keys(at: AppTest):
    from dashboard.common import short

    return [short(active_model(at).key)]


def test_blocks_command_hint_is_complete():
    at = open_app(TIMEOUT)
    _tab(at, "Blocks")
    app_ok(at)
    code = " ".join(c.value for c in at.code)
    assert "prunescope prune demo --remove-blocks 0 --calibration demo --ratio 0.50 " \
           "--out DIR" in code


def test_latency_row_says_what_it_measured_and_why_it_can_rise():
    def page(before: float, after: float) -> None:
        from dashboard.tabs.prune import latency_note

        latency_note(before, after)

    rose = AppTest.from_function(page, args=(0.00715, 0.01287)).run()
    text = " ".join(_texts(rose.caption))
    assert "best median of two interleaved rounds" in text and "did not fall" in text
    fell = AppTest.from_function(page, args=(0.01287, 0.00715)).run()
    assert "did not fall" not in " ".join(_texts(fell.caption))
