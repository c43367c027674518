"""Robustness: every invalid option value, ratio, --ratios file, --indices file, input shape
and calibration file gets one line saying what is wrong and what is allowed (API and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.cli import main
from engine.options import ALLOWED
from tests.helpers import cli, one_error_line


@pytest.fixture(scope="module")
def tiny_analysis(tiny_pt2: Path) -> engine.Analysis:
    analysis = engine.analyze(tiny_pt2)
    assert [g.name for g in analysis.groups] == ["a", "b"]
    return analysis


# ------------------------------------------------------------------------- options

# How the message must describe what is allowed, per option.
ALLOWED_WORDS = {name: [str(v) for v in values] for name, values in ALLOWED.items()}
ALLOWED_WORDS["step_size"] = [">= 1"]
ALLOWED_WORDS["seed"] = [">= 0"]


BAD_VALUES = [
    ("criterion", ""), ("criterion", "L2"), ("criterion", "l3"), ("criterion", " l2"),
    ("criterion", None), ("criterion", 2), ("criterion", "nuclear"),
    ("policy", "mean"), ("policy", "SUM"), ("policy", None),
    ("layer_norm", "zscore"), ("layer_norm", "None"), ("layer_norm", ""),
    ("group_policy", "min"), ("group_policy", ""),
    ("reshape_channel_axis", 2), ("reshape_channel_axis", -3), ("reshape_channel_axis", "x"),
    ("reshape_channel_axis", 1.5), ("reshape_channel_axis", True), ("reshape_channel_axis", None),
    ("step_size", 0), ("step_size", -1),
    ("step_size", 1.5),
    ("step_size", "two"),
    ("step_size", True),
    ("step_size", None),
    ("step_op", "floor"), ("step_op", "ceil"), ("step_op", None),
    ("seed", -1),
    ("seed", 0.5),
    ("seed", "abc"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_invalid_option_value_api(name: str, value: object) -> None:
    with pytest.raises(engine.OptionError) as info:
        engine.PruningOptions(**{name: value})
    message = str(info.value)
    assert "\n" not in message
    assert name in message and repr(value) in message
    for word in ALLOWED_WORDS[name]:
        assert word in message, f"{message!r} does not mention {word!r}"


CLI_BAD_VALUES = [
    ("criterion", "L2"), ("policy", "mean"), ("layer_norm", "zscore"), ("group_policy", "min"),
    ("reshape_channel_axis", "2"), ("reshape_channel_axis", "1.0"), ("reshape_channel_axis", "x"),
    ("step_size", "0"), ("step_size", "-3"),
    ("step_size", "two"),
    ("step_size", "1.5"),
    ("step_op", "floor"), ("seed", "-1"),
    ("seed", "abc"),
]


@pytest.mark.parametrize(("name", "value"), CLI_BAD_VALUES)
def test_invalid_option_value_cli(capfd, tiny_pt2: Path, name: str, value: str) -> None:
    flag = "--" + name.replace("_", "-")
    rc, out, err = cli(capfd, "scores", tiny_pt2, flag, value)
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert name.replace("_", "-") in line.replace("_", "-") and value in line
    for word in ALLOWED_WORDS[name]:
        assert word in line, f"{line!r} does not mention {word!r}"


def test_unknown_option_name_lists_the_allowed_names(tiny_analysis) -> None:
    with pytest.raises(engine.OptionError, match="unknown option") as info:
        engine.plan(tiny_analysis, {"criterion": "l2", "ratio": 0.5}, ratio=0.5)
    for name in ALLOWED:
        assert name in str(info.value)
    with pytest.raises(engine.OptionError, match="PruningOptions or a dict"):
        engine.plan(tiny_analysis, ["l2"], ratio=0.5)


def test_numpy_integers_are_integers() -> None:
    options = engine.PruningOptions(step_size=np.int64(4), seed=np.int32(3),
                                    reshape_channel_axis=np.int64(-2))
    assert (options.step_size, options.seed, options.reshape_channel_axis) == (4, 3, -2)


# -------------------------------------------------------------------------- ratios

BAD_RATIOS = [-0.1, 1, 1.0, 1.5, float("nan"), float("inf"), -float("inf"), "abc", "", True]


@pytest.mark.parametrize("ratio", BAD_RATIOS, ids=repr)
def test_bad_ratio_api(tiny_analysis, ratio: object) -> None:
    with pytest.raises(engine.OptionError, match=r"allowed: 0 <= ratio < 1") as info:
        engine.plan(tiny_analysis, None, ratio=ratio)
    assert "\n" not in str(info.value)
    with pytest.raises(engine.OptionError, match=r"allowed: 0 <= ratio < 1"):
        engine.prune(tiny_analysis, None, None, ratio=ratio)


@pytest.mark.parametrize("ratio", ["-0.1", "1", "1.5", "nan", "inf", "abc", "", "0,5"])
def test_bad_ratio_cli(capfd, tiny_pt2: Path, tmp_path: Path, ratio: str) -> None:
    out_dir = tmp_path / "out"
    rc, _, err = cli(capfd, "prune", tiny_pt2, "--ratio", ratio, "--out", out_dir)
    assert rc == 2
    line = one_error_line(err)
    assert repr(ratio) in line and "0 <= ratio < 1" in line
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"nope": 0.5}, ["'nope'", "valid names include", "'a'", "'b'"]),
        ({"a": 0.5, "A": 0.5}, ["'A'", "valid names include"]),
        ({"a": 1.5}, ["'a'", "1.5", "0 <= ratio < 1"]),
        ({"a": -0.2}, ["'a'", "0 <= ratio < 1"]),
        ({"a": 1}, ["'a'", "0 <= ratio < 1"]),
        ({"a": "half"}, ["'a'", "not a number", "0 <= ratio < 1"]),
        ({"a": None}, ["'a'", "not a number"]),
        ({"a": [0.5]}, ["'a'", "not a number"]),
        ([0.5, 0.5], ["JSON object"]),
        (0.5, ["JSON object"]),
        ("{", ["not valid JSON"]),
        ("", ["not valid JSON"]),
    ],
    ids=["unknown", "wrong_case", "above_1", "negative", "one", "string", "null", "list",
         "top_list", "top_number", "broken_json", "empty_file"],
)
def test_bad_ratios_file(capfd, tiny_pt2: Path, tmp_path: Path, content, words) -> None:
    path = tmp_path / "ratios.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    out_dir = tmp_path / "out"
    rc, _, err = cli(capfd, "prune", tiny_pt2, "--ratios", path, "--out", out_dir)
    assert rc == 2
    line = one_error_line(err)
    for word in words:
        assert word in line, f"{line!r} does not mention {word!r}"
    assert not out_dir.exists()


def test_missing_ratios_file(capfd, tiny_pt2: Path, tmp_path: Path) -> None:
    rc, _, err = cli(capfd, "prune", tiny_pt2, "--ratios", tmp_path / "no.json",
                     "--out", tmp_path / "out")
    assert rc == 2 and "does not exist" in one_error_line(err)


def test_bad_ratios_api(tiny_analysis) -> None:
    with pytest.raises(engine.OptionError, match="valid names include"):
        engine.plan(tiny_analysis, None, ratios={"nope": 0.5})
    with pytest.raises(engine.OptionError, match="0 <= ratio < 1"):
        engine.plan(tiny_analysis, None, ratios={"a": 1.0})


def test_prune_without_any_ratio(capfd, tiny_pt2: Path, tmp_path: Path) -> None:
    rc, _, err = cli(capfd, "prune", tiny_pt2, "--out", tmp_path / "out")
    assert rc == 2 and "--ratio" in one_error_line(err)
    with pytest.raises(engine.PruneScopeError, match="ratio"):
        engine.prune(tiny_pt2, None, None)


# ------------------------------------------------------------------------- indices


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"a": [8]}, ["8", "'a'", "0..7"]),
        ({"a": [-1]}, ["-1", "'a'", "0..7"]),
        ({"a": [10**12]}, ["'a'", "0..7"]),
        ({"a": [1.5]}, ["1.5", "'a'", "0..7"]),
        ({"a": ["3"]}, ["'3'", "'a'", "0..7"]),
        ({"a": [True]}, ["True", "'a'", "0..7"]),
        ({"a": list(range(8))}, ["'a'", "at least one"]),
        ({"c": [0]}, ["'c'", "not a prunable layer", "a, b"]),
        ({"zz": [0]}, ["'zz'", "not a prunable layer", "a, b"]),
        ({"a": 3}, ["JSON object"]),
        ([[0]], ["JSON object"]),
    ],
    ids=["n", "negative", "huge", "float", "string", "bool", "all", "frozen_layer",
         "unknown_layer", "not_a_list", "top_list"],
)
def test_bad_indices_file(capfd, tiny_pt2: Path, tmp_path: Path, content, words) -> None:
    path = tmp_path / "indices.json"
    path.write_text(json.dumps(content))
    out_dir = tmp_path / "out"
    rc, _, err = cli(capfd, "prune", tiny_pt2, "--criterion", "index", "--indices", path,
                     "--out", out_dir)
    assert rc == 2
    line = one_error_line(err)
    for word in words:
        assert word in line, f"{line!r} does not mention {word!r}"
    assert not out_dir.exists()


def test_bad_indices_api(tiny_analysis) -> None:
    with pytest.raises(engine.OptionError, match=r"0\.\.7"):
        engine.plan(tiny_analysis, {"criterion": "index"}, indices={"b": [0, 8]})
    with pytest.raises(engine.OptionError, match="needs --indices"):
        engine.plan(tiny_analysis, {"criterion": "index"})


def test_valid_indices_remove_exactly_those_filters(tiny_analysis) -> None:
    the_plan = engine.plan(tiny_analysis, {"criterion": "index"}, indices={"a": [6, 1, 1]})
    assert the_plan.group("a").pruned.tolist() == [1, 6]
    assert the_plan.group("b").pruned.tolist() == []


def test_indices_without_criterion_index_is_an_error(capfd, tiny_pt2: Path,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "indices.json"
    path.write_text(json.dumps({"a": [0, 1]}))
    rc, _, err = cli(capfd, "prune", tiny_pt2, "--indices", path, "--ratio", "0.25",
                     "--out", tmp_path / "out", "--no-onnx")
    assert rc == 2
    assert "--criterion index" in one_error_line(err)


# -------------------------------------------------------------------- input shapes


@pytest.mark.parametrize("shape", ["a,b", "", "1,,3", "0,3", "-1", "1.5,2", "1 3"])
def test_bad_input_shape(capfd, tiny_pt2: Path, shape: str) -> None:
    rc, _, err = cli(capfd, "scores", tiny_pt2, "--input-shape", shape)
    assert rc == 2
    line = one_error_line(err)
    assert repr(shape) in line and ("integers" in line or "positive" in line)


def test_argparse_errors_exit_2_without_traceback(capfd, tiny_pt2: Path, tmp_path: Path) -> None:
    for argv in (["prune", tiny_pt2, "--ratio", "0.5"],  # no --out
                 ["prune", tiny_pt2, "--ratio", "0.5", "--ratios", "r.json", "--out", tmp_path],
                 ["scores", tiny_pt2, "--no-such-flag"],
                 ["frobnicate"]):
        capfd.readouterr()
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        err = capfd.readouterr().err
        assert info.value.code == 2
        assert "Traceback" not in err and "error: " in err.splitlines()[-1]


# ---------------------------------------------------------------- calibration data


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: np.save(p / "c.npy", np.full((4, 3, 6, 6), np.nan, np.float32)),
         "non-finite"),
        (lambda p: np.save(p / "c.npy", np.zeros((0, 3, 6, 6), np.float32)),
         "at least one sample"),
        (lambda p: np.savez(p / "c.npz", y=np.zeros(3)), "no array 'x'"),
        (lambda p: (p / "c.csv").write_text("1,2"), ".npz"),
        (lambda p: (p / "c.npy").write_bytes(b"garbage"), "unreadable"),
        (lambda p: None, "does not exist"),
    ],
    ids=["nan", "empty", "no_x", "csv", "garbage", "missing"],
)
def test_bad_calibration_file(capfd, tiny_pt2: Path, tmp_path: Path, make, words: str) -> None:
    make(tmp_path)
    path = next(iter(sorted(tmp_path.glob("c.*"))), tmp_path / "c.npz")
    rc, _, err = cli(capfd, "scores", tiny_pt2, "--criterion", "nuclear_norm",
                     "--calibration", path)
    assert rc == 2
    assert words in one_error_line(err)


@pytest.mark.parametrize("shape", [(6, 5), (6, 1, 6, 6)], ids=["rank", "channels"])
def test_calibration_of_the_wrong_shape(capfd, tiny_pt2: Path, tmp_path: Path,
                                        shape: tuple[int, ...]) -> None:
    np.save(tmp_path / "c.npy", np.zeros(shape, np.float32))
    rc, _, err = cli(capfd, "scores", tiny_pt2, "--criterion", "nuclear_norm",
                     "--calibration", tmp_path / "c.npy")
    assert rc == 2
    line = one_error_line(err)
    assert "shape" in line and str(shape) in line
