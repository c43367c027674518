"""engine/io/data.py: the one loader of calibration and evaluation data (files, uploads,
built-in names, in-memory forms) and its one-line errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.demo import DEMO_CALIB_PATH, DEMO_EVAL_PATH, DEMO_LM_CALIB_PATH
from engine.errors import DataError, ModelLoadError, OptionError
from engine.io.data import DataSet, as_data, load_data, same_data_file
from tests.helpers import cli, one_error_line

X = np.arange(24, dtype=np.float32).reshape(6, 4)
Y = np.array([0, 1, 2, 0, 1, 2])


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _error(call) -> DataError:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return info.value


# ---------------------------------------------------------------------------- good files

def test_npz_with_labels_and_npy(tmp_path: Path) -> None:
    data = load_data(_npz(tmp_path / "d.npz", x=X, y=Y))
    assert len(data.inputs) == 1 and len(data) == 6
    np.testing.assert_array_equal(data.inputs[0], X)
    np.testing.assert_array_equal(data.labels, Y)
    assert data.where == f"--eval-data {tmp_path / 'd.npz'}"
    np.save(tmp_path / "d.npy", X)
    data = load_data(tmp_path / "d.npy", flag="--calibration")
    np.testing.assert_array_equal(data.inputs[0], X)
    assert data.labels is None and data.flag == "--calibration"


def test_numbered_inputs_keep_numeric_order(tmp_path: Path) -> None:
    # x10 sorts before x2 as text; the inputs must come in the model's order
    arrays = {f"x{i}": np.full((3, 2), i, np.int64) for i in range(11)}
    data = load_data(_npz(tmp_path / "many.npz", **arrays))
    assert [int(a[0, 0]) for a in data.inputs] == list(range(11))


@pytest.mark.parametrize(("name", "kind", "path"), [
    ("demo", "eval", DEMO_EVAL_PATH), ("demo", "calibration", DEMO_CALIB_PATH),
    ("demo-lm", "calibration", DEMO_LM_CALIB_PATH)])
def test_built_in_names(name: str, kind: str, path: Path) -> None:
    data = load_data(name, kind=kind)
    with np.load(path) as raw:
        np.testing.assert_array_equal(data.inputs[0], raw["x"])
        if "y" in raw.files:
            np.testing.assert_array_equal(data.labels, raw["y"])
        else:
            assert data.labels is None
    assert data.source == f"{name} ({path.name})"


def test_upload_bytes_read_as_the_file_would_be(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, x0=X, x1=X[:, :2].astype(np.int64), y=Y)
    data = load_data(buf.getvalue(), flag="evaluation data", name="mine.npz")
    assert len(data.inputs) == 2 and data.where == "evaluation data mine.npz"
    np.testing.assert_array_equal(data.inputs[1], X[:, :2].astype(np.int64))
    buf = io.BytesIO()
    np.save(buf, X)
    np.testing.assert_array_equal(load_data(buf.getvalue(), name="x.npy").inputs[0], X)
    assert "extension '.xlsx'" in str(_error(lambda: load_data(b"1,2", name="x.xlsx")))
    assert "needs the model" in str(_error(lambda: load_data(b"text\nhi\n", name="x.csv")))


# ----------------------------------------------------------------------------- bad files

@pytest.mark.parametrize(("arrays", "words"), [
    ({"y": Y}, "has no array 'x' (found: y); allowed arrays: x (or x0, x1"),
    ({"x0": X, "x2": X}, "holds x0, x2; several inputs are numbered x0, x1, ... without gaps"),
    ({"x1": X}, "holds x1; several inputs are numbered x0, x1, ... without gaps"),
    ({"x": X, "x0": X}, "holds x, x0; allowed arrays"),
    ({"x": X, "labels": Y}, "holds labels, x; allowed arrays"),
    ({"x": X, "y": Y[:4]}, "labels y have shape (4,) for 6 samples; y needs one label per"),
    ({"x": X, "y": Y.astype(np.float32)}, "labels y have dtype float32; allowed: integer"),
    ({"x0": X, "x1": X[:5]}, "the inputs hold different numbers of samples (6, 5)"),
    ({"x": X[:0]}, "x has shape (0, 4); it needs at least one sample"),
    ({"x": np.float32(1)}, "x has shape (); it needs at least one sample"),
    ({"x": np.array(["a", "b"])}, "x has dtype <U1; allowed: numbers"),
], ids=["no_x", "gap", "no_x0", "both", "unknown", "y_length", "y_float", "counts", "empty",
        "scalar", "strings"])
def test_bad_arrays_are_one_line_naming_the_file(tmp_path: Path, arrays, words: str) -> None:
    path = _npz(tmp_path / "bad.npz", **arrays)
    error = _error(lambda: load_data(path, flag="--calibration"))
    assert str(error).startswith(f"--calibration file {path}")
    assert words in str(error)
    # the same checks apply to the same arrays in memory
    assert words in str(_error(lambda: as_data(dict(arrays))))


def test_data_errors_are_option_and_model_load_errors(tmp_path: Path) -> None:
    error = _error(lambda: load_data(tmp_path / "missing.npz"))
    assert isinstance(error, OptionError) and isinstance(error, ModelLoadError)
    assert "does not exist; give .npz/.npy arrays, text" in str(error)
    assert "demo, demo-lm" in str(error)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_object_arrays_are_refused_without_unpickling(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    evil = np.array([Payload(marker)], dtype=object)
    if suffix == ".npy":
        np.save(path, evil, allow_pickle=True)
    else:
        np.savez(path, x=evil)
    words = "x is an array of Python objects, which only unpickling"
    assert words in str(_error(lambda: load_data(path)))
    assert words in str(_error(lambda: load_data(path.read_bytes(), name=path.name)))
    assert not marker.exists()
    # control: the file really does run code when unpickled
    loaded = np.load(path, allow_pickle=True)
    if suffix == ".npz":
        loaded["x"]
    assert marker.exists()


def test_a_structured_dtype_with_an_object_field_is_refused(tmp_path: Path) -> None:
    arr = np.zeros(3, dtype=[("a", "f4"), ("b", "O")])
    path = _npz(tmp_path / "rec.npz", x=arr)
    assert "Python objects" in str(_error(lambda: load_data(path)))


@pytest.mark.parametrize(("content", "words"), [
    (b"garbage", "is unreadable (.npz with x"),
    (None, "is unreadable"),  # a real .npz cut in half
], ids=["garbage", "truncated"])
def test_unreadable_files(tmp_path: Path, content, words: str) -> None:
    path = tmp_path / "c.npz"
    if content is None:
        full = _npz(tmp_path / "full.npz", x=np.random.default_rng(0).random((64, 64))).read_bytes()
        content = full[: len(full) // 2]
    path.write_bytes(content)
    assert words in str(_error(lambda: load_data(path)))


def test_folders_and_extensions(tmp_path: Path) -> None:
    assert "is neither a datasets save_to_disk folder" in str(_error(lambda: load_data(tmp_path)))
    (tmp_path / "d.xlsx").write_text("1,2")
    assert "has extension '.xlsx'" in str(_error(lambda: load_data(tmp_path / "d.xlsx")))


def test_size_limit_is_read_from_the_headers(tmp_path: Path, monkeypatch) -> None:
    # 40 MB of zeros compress to a few kB: the declared shape, not the file size, counts
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((10_000, 1000), np.float32))
    assert path.stat().st_size < 1 << 20
    monkeypatch.setenv("PRUNESCOPE_MAX_DATA_BYTES", str(8 << 20))
    error = str(_error(lambda: load_data(path)))
    assert "holds 38.1 MiB of arrays, more than the limit of 8.0 MiB" in error
    monkeypatch.setenv("PRUNESCOPE_MAX_DATA_BYTES", str(64 << 20))
    assert len(load_data(path)) == 10_000


# ---------------------------------------------------------------------------- in memory

def test_in_memory_forms_agree() -> None:
    class Holder:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    forms = [{"x": X, "y": Y}, Holder(x=X, y=Y), Holder(inputs=[X], labels=Y),
             Holder(xs=(torch.from_numpy(X),), y=torch.from_numpy(Y))]
    for form in forms:
        data = as_data(form)
        np.testing.assert_array_equal(data.inputs[0], X)
        np.testing.assert_array_equal(data.labels, Y)
    assert len(as_data([X, X.astype(np.int64)]).inputs) == 2
    assert as_data(torch.from_numpy(X)).labels is None
    assert "must be an array" in str(_error(lambda: as_data(3.5)))


def test_fingerprint_follows_the_content() -> None:
    a = DataSet((X.copy(),), Y.copy())
    assert a.fingerprint() == DataSet((X.copy(),), Y.copy(), "elsewhere").fingerprint()
    changed = Y.copy()
    changed[-1] = 9
    assert a.fingerprint() != DataSet((X,), changed).fingerprint()
    assert a.fingerprint(limit=5) == DataSet((X,), changed).fingerprint(limit=5)
    assert a.fingerprint() != DataSet((X,), None).fingerprint()


def test_head_keeps_where_and_labels() -> None:
    data = DataSet((X,), Y, "d.npz", "--data").head(4)
    assert len(data) == 4 and list(data.labels) == [0, 1, 2, 0] and data.where == "--data d.npz"


# ------------------------------------------------------------------ the public adapters

def test_load_calibration_gives_x_and_y(tmp_path: Path) -> None:
    x, y = engine.load_calibration(_npz(tmp_path / "c.npz", x=X, y=Y))
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(y, Y)
    two = _npz(tmp_path / "two.npz", x0=X, x1=X)
    assert "load_calibration_data" in str(_error(lambda: engine.load_calibration(two)))
    assert len(engine.load_calibration_data(two).inputs) == 2


def test_same_data_file(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=X)
    assert same_data_file(path, str(path)) and same_data_file(DEMO_EVAL_PATH, "demo")
    assert not same_data_file("demo", "demo")  # calibration and evaluation sets differ
    assert not same_data_file(tmp_path / "missing.npz", path)


def test_calibration_option_errors_name_the_option(capfd, tmp_path: Path) -> None:
    path = _npz(tmp_path / "gap.npz", x0=X, x2=X)
    rc, _, err = cli(capfd, "scores", "demo", "--criterion", "wanda", "--calibration", path)
    assert rc == 2
    assert f"--calibration file {path} holds x0, x2" in one_error_line(err)


# -------------------------------------------------------- what the mutation run left unguarded

def test_a_gigabyte_sized_header_is_refused_in_gib_under_the_default_limit(tmp_path: Path,
                                                                          monkeypatch):
    """A .npy whose header declares 2^28 x 8 float32 (8 GiB) and holds no data: refused from
    the header alone, in GiB, against the default 4 GiB. (data `_size` 1, 3-6: the GiB
    branch.)"""
    monkeypatch.delenv("PRUNESCOPE_MAX_DATA_BYTES", raising=False)
    path = tmp_path / "huge.npy"
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": "<f4", "fortran_order": False, "shape": (2**28, 8)})
    assert path.stat().st_size < 4096
    assert str(_error(lambda: load_data(path))) == (
        f"--eval-data file {path} holds 8.0 GiB of arrays, more than the limit of 4.0 GiB "
        "(set PRUNESCOPE_MAX_DATA_BYTES to raise it)")
    # a limit of exactly 1 GiB is shown in GiB (`_size` 7: `>`; 10: 2**31)
    monkeypatch.setenv("PRUNESCOPE_MAX_DATA_BYTES", str(2**30))
    assert str(_error(lambda: load_data(path))).endswith("more than the limit of 1.0 GiB "
                                                        "(set PRUNESCOPE_MAX_DATA_BYTES to "
                                                        "raise it)")


@pytest.mark.parametrize(("options", "message"), [
    (dict(text_mode="wrap"), "--text-mode 'wrap' is not allowed; allowed: pad, stream"),
    (dict(max_samples=0), "--max-samples 0 is not allowed; allowed: an integer >= 1"),
    (dict(max_samples=True), "--max-samples True is not allowed; allowed: an integer >= 1"),
    (dict(max_samples=2.0), "--max-samples 2.0 is not allowed; allowed: an integer >= 1"),
    (dict(seq_len=-3), "--seq-len -3 is not allowed; allowed: an integer >= 1"),
    (dict(read_batch=0), "read_batch 0 must be >= 1"),
])
def test_data_option_messages_name_the_option_and_what_is_allowed(options, message):
    """Checked before anything is read. (data `check_options` 2-19: the messages.)"""
    from engine.io.data import DataOptions

    error = _error(lambda: load_data(DEMO_EVAL_PATH, options=DataOptions(**options)))
    assert str(error) == message


def test_an_array_of_strings_is_refused_naming_the_input_and_the_allowed_dtypes(tmp_path):
    """(data `_checked` 19, 22, 23: the dtype check and its message.)"""
    path = _npz(tmp_path / "words.npz", x0=X, x1=np.array(list("abcdef")))
    assert str(_error(lambda: load_data(path))) == (
        f"--eval-data file {path}: x1 has dtype <U1; allowed: numbers (float for features, "
        "integers for token ids)")


def test_one_sample_one_token_and_a_read_batch_of_one_are_allowed():
    """The smallest allowed values. (data `check_options` 14, 15, 17, 18: `<= 1`, `< 2`.)"""
    from engine.io.data import DataOptions

    data = load_data(DEMO_EVAL_PATH, options=DataOptions(max_samples=1, seq_len=1,
                                                         read_batch=1))
    assert len(data) == 1


def test_float_labels_are_refused_naming_what_labels_must_be(tmp_path):
    """(data `_checked` 48, 49: the message.)"""
    path = _npz(tmp_path / "soft.npz", x=X, y=np.linspace(0, 1, 6))
    assert str(_error(lambda: load_data(path))) == (
        f"--eval-data file {path}: labels y have dtype float64; allowed: integer class "
        "indices")
