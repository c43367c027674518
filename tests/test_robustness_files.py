"""Robustness: whatever file a user points the tool at, it never runs untrusted code, never
shows a traceback and never loads a damaged model silently (Python API and CLI)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import engine
from tests.helpers import cli
from tests.zoo import tiny

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TiB = 2**40


# ------------------------------------------------------------------------------ helpers





class Payload:
    """Unpickling this runs `touch marker`: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_payload(marker: Path, zip_format: bool = True) -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(marker), buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


# A fresh process runs several CLI invocations one after the other, so that what torch logs
# straight to the real stderr is seen (pytest's in-process capture misses it) while the
# interpreter start-up is paid once.
CLI_BATCH = """
import json, resource, sys, traceback
from engine.cli import main

for argv in json.loads(sys.argv[1]):
    sys.stdout.flush()
    sys.stderr.write("@@@ next run\\n")
    sys.stderr.flush()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    except BaseException:
        traceback.print_exc()
        rc = "uncaught exception"
    sys.stderr.flush()
    print("@@@ rc", json.dumps(rc), flush=True)
# VmHWM is this process's own high-water mark; ru_maxrss would also count the parent's size
# at fork time (Linux keeps it across exec), so a pytest worker grown to 2 GiB showed here
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
print("@@@ peak", int(hwm[0].split()[1]) if hwm else
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def cli_batch(runs: list[list[object]]) -> tuple[list[tuple[object, str]], int]:
    """Run each argv through the CLI in one fresh process: [(exit code, stderr)], peak KiB."""
    argvs = [[str(a) for a in argv] for argv in runs]
    proc = subprocess.run([PYTHON, "-c", CLI_BATCH, json.dumps(argvs)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    codes = [json.loads(ln[len("@@@ rc ") :]) for ln in lines if ln.startswith("@@@ rc ")]
    errs = proc.stderr.split("@@@ next run\n")[1:]
    assert len(codes) == len(errs) == len(argvs), proc.stderr
    return list(zip(codes, errs)), int(lines[-1].split()[-1])


def error_line(err: str) -> str:
    """The last line of stderr must be the tool's own one-line error."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("prunescope: error: "), err
    return lines[-1]


def assert_one_clean_line(err: str) -> str:
    """What the user sees on stderr is exactly one line: no traceback, no log noise."""
    line = error_line(err)
    assert "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [line], err
    return line


def rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copy a zip archive entry by entry; edit(relative name, bytes) -> bytes or None (drop)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0] + "/"
        for info in zin.infolist():
            data = edit(info.filename[len(prefix):], zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
        extra = edit("", None)
        for name, data in (extra or {}).items():
            zout.writestr(prefix + name, data)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A valid tiny .pt2 and a collection of broken files next to it."""
    d = tmp_path_factory.mktemp("files")
    model, x = tiny()
    torch.export.save(torch.export.export(model, x), d / "good.pt2")
    good = (d / "good.pt2").read_bytes()
    rng = np.random.default_rng(0)
    (d / "random_bytes.pt2").write_bytes(rng.bytes(20_000))
    (d / "random_bytes.pt").write_bytes(rng.bytes(20_000))
    (d / "truncated_head.pt2").write_bytes(good[: len(good) // 3])
    (d / "truncated_tail.pt2").write_bytes(good[:-200])
    (d / "empty.pt2").write_bytes(b"")
    (d / "empty.pt").write_bytes(b"")
    (d / "folder.pt2").mkdir()
    (d / "model.onnx").write_bytes(b"\x08\x07")
    (d / "weights.safetensors").write_bytes(good)
    (d / "no_extension").write_bytes(good)
    (d / "notes.txt").write_text("not a model")
    rewrite_zip(d / "good.pt2", d / "missing_entry.pt2",
                lambda name, data: None if name == "models/model.json" else
                (data if name else None))
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(3))
    (d / "npz_renamed.pt2").write_bytes(buf.getvalue())
    return d


# Each broken file, with the words the one-line error must contain besides the path.
BAD_FILES = {
    "random_bytes.pt2": "not a readable .pt2",
    "truncated_head.pt2": "not a readable .pt2",
    "truncated_tail.pt2": "not a readable .pt2",
    "missing_entry.pt2": "not a readable .pt2",
    "npz_renamed.pt2": "not a readable .pt2",
    "empty.pt2": "empty",
    "empty.pt": "empty",
    "folder.pt2": "directory",
    "does_not_exist.pt2": "does not exist",
    "model.onnx": "unsupported extension",
    "weights.safetensors": "unsupported extension",
    "no_extension": "unsupported extension",
    "notes.txt": "unsupported extension",
    "random_bytes.pt": "could not be unpickled",
}


# ---------------------------------------------------------------------- broken files


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_api_raises_one_line_model_load_error(files: Path, name: str) -> None:
    path = files / name
    with pytest.raises(engine.ModelLoadError) as info:
        # trust_pickle so that pickles get as far as the unpickler: the file is still refused
        engine.load_model(path, trust_pickle=True, input_shapes=[(1, 3, 6, 6)])
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert BAD_FILES[name] in message


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_cli_exits_2_with_error_naming_the_file(capfd, files: Path, name: str) -> None:
    path = files / name
    rc, out, err = cli(capfd, "scores", path, "--trust-pickle", "--input-shape", "1,3,6,6")
    assert rc == 2
    assert out == ""
    line = error_line(err)
    assert str(path) in line and BAD_FILES[name] in line


@pytest.mark.parametrize("name", ["missing_entry.pt2", "npz_renamed.pt2", "truncated_tail.pt2"])
def test_unreadable_pt2_error_states_the_cause(files: Path, name: str) -> None:
    with pytest.raises(engine.ModelLoadError) as info:
        engine.load_model(files / name)
    assert "warnings above" not in str(info.value)


@pytest.mark.parametrize("name", ["random_bytes.pt2", "truncated_head.pt2"])
def test_unreadable_pt2_cli_prints_only_one_line(fresh_cli, name: str) -> None:
    rc, err = fresh_cli[name]
    assert rc == 2
    assert_one_clean_line(err)


@pytest.mark.parametrize("name", ["empty.pt2", "does_not_exist.pt2", "model.onnx"])
def test_bad_file_cli_prints_only_one_line(fresh_cli, files: Path, name: str) -> None:
    rc, err = fresh_cli[name]
    assert rc == 2
    assert str(files / name) in assert_one_clean_line(err)


def _bit_flipped(good: Path, tmp_path: Path) -> Path:
    """A copy of `good` with an exponent bit of its first weight flipped (zip CRC left as is)."""
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/weights/weight_0"))
    off = info.header_offset
    start = off + 30 + int.from_bytes(data[off + 26 : off + 28], "little") + int.from_bytes(
        data[off + 28 : off + 30], "little"
    )
    data[start + 3] ^= 0x40
    bad = tmp_path / "bitflip.pt2"
    bad.write_bytes(data)
    return bad


def test_bit_flipped_pt2_is_refused(files: Path, tmp_path: Path) -> None:
    bad = _bit_flipped(files / "good.pt2", tmp_path)
    with zipfile.ZipFile(bad) as z:
        assert z.testzip() is not None  # the archive itself knows it is damaged
    with pytest.raises(engine.ModelLoadError, match="bitflip.pt2"):
        engine.load_model(bad)


def test_bit_flipped_weight_is_refused_when_checked_beside_the_load(
        files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # every entry counts as large: its checksum is read in the thread beside torch's load
    import engine.graph.safety as safety

    monkeypatch.setattr(safety, "LARGE_ENTRY_BYTES", 0)
    bad = _bit_flipped(files / "good.pt2", tmp_path)
    with pytest.raises(engine.ModelLoadError, match=r"bitflip.pt2 is damaged: entry .*"
                                                    r"weight_0 fails its checksum"):
        engine.load_model(bad)
    assert engine.load_model(files / "good.pt2").program is not None


# -------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_untrusted_pickle_never_runs_api(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"checkpoint{suffix}"
    path.write_bytes(torch_payload(marker))
    with pytest.raises(engine.ModelLoadError, match="trust") as info:
        engine.load_model(path, input_shapes=[(1, 3)])
    assert "\n" not in str(info.value)
    with pytest.raises(engine.ModelLoadError, match="trust"):
        engine.prune(path, None, None, ratio=0.5, input_shapes=[(1, 3)])
    assert not marker.exists()


def test_untrusted_pickle_never_runs_cli(capfd, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(torch_payload(marker))
    out_dir = tmp_path / "out"
    rc, _, err = cli(capfd, "prune", path, "--input-shape", "1,3", "--ratio", "0.5",
                     "--out", out_dir)
    assert rc == 2
    assert "--trust-pickle" in error_line(err)
    assert not marker.exists()
    assert not out_dir.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_renamed_to_pt2_does_not_run(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt2"
    path.write_bytes(torch_payload(marker, zip_format))
    with pytest.raises(engine.ModelLoadError, match="not a readable .pt2"):
        engine.load_model(path)
    assert not marker.exists()


def _pickle_in_archive(good: Path, dst: Path, marker: Path, where: str) -> None:
    """A real .pt2 with a code-running pickle where torch.export.load unpickles."""
    payload = torch_payload(marker)
    if where == "legacy_format":
        # the pre-2.7 layout that torch.export.load still falls back to
        from torch._export.serde.schema import SCHEMA_VERSION
        from torch._export.serde.serialize import serialize

        artifact = serialize(torch.export.load(good))
        with zipfile.ZipFile(dst, "w") as z:
            z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
            z.writestr("serialized_exported_program.json", artifact.exported_program)
            z.writestr("serialized_state_dict.pt", artifact.state_dict)
            z.writestr("serialized_constants.pt", artifact.constants)
            z.writestr("serialized_example_inputs.pt", payload)
        return

    def edit(name: str, data: bytes | None):
        if not name:
            if where == "constants":
                return {"data/constants/opaque_obj_0": pickle.dumps(Payload(marker))}
            return None
        if where == "sample_inputs" and name == "data/sample_inputs/model.pt":
            return payload
        if where == "weights" and name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        if where == "weights" and name == "data/weights/weight_0":
            return payload
        if where == "constants" and name == "data/constants/model_constants_config.json":
            entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                     "tensor_meta": None}
            return json.dumps({"config": {"c": entry}}).encode()
        return data

    rewrite_zip(good, dst, edit)


@pytest.mark.parametrize("where", ["sample_inputs", "weights", "constants", "legacy_format"])
def test_pickle_inside_pt2_does_not_run_without_trust(files: Path, tmp_path: Path,
                                                      where: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil_{where}.pt2"
    _pickle_in_archive(files / "good.pt2", path, marker, where)
    try:
        with pytest.raises(engine.ModelLoadError, match="pickle"):
            engine.load_model(path)
    finally:
        assert not marker.exists(), "loading a .pt2 ran code from the file"


def test_trusted_pickle_of_a_module_loads_and_prunes(capfd, tmp_path: Path) -> None:
    model, x = tiny()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    result = engine.prune(path, None, None, ratio=0.5, trust_pickle=True,
                          input_shapes=[tuple(x[0].shape)])
    assert result.after["params"] < result.before["params"]
    rc, out, err = cli(capfd, "prune", path, "--trust-pickle", "--input-shape", "2,3,6,6",
                       "--ratio", "0.5", "--out", tmp_path / "out", "--no-onnx")
    assert rc == 0, err
    assert (tmp_path / "out" / "model.pt2").is_file()


@pytest.mark.parametrize(
    ("obj", "words"),
    [({"a.weight": torch.ones(2)}, "not an nn.Module"), (nn.Linear(3, 2), "--input-shape")],
    ids=["state_dict", "no_input_shape"],
)
def test_trusted_pickle_that_cannot_be_captured(tmp_path: Path, obj, words: str) -> None:
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    with pytest.raises(engine.ModelLoadError, match=words):
        engine.load_model(path, trust_pickle=True)


def test_trusted_pickle_warns_api(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(torch_payload(marker))
    with pytest.warns(UserWarning, match="pickle"), pytest.raises(engine.ModelLoadError):
        engine.load_model(path, trust_pickle=True, input_shapes=[(1, 3)])
    assert marker.exists()  # trusted: the code did run, and the user had been told


def test_trusted_pickle_warns_cli(capfd, tmp_path: Path) -> None:
    model, _ = tiny()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    rc, _, err = cli(capfd, "scores", path, "--trust-pickle", "--input-shape", "1,3,6,6",
                     "--json", tmp_path / "s.json")
    assert rc == 0
    warned = [ln for ln in err.splitlines() if "warning" in ln.lower() and "pickle" in ln]
    assert warned and str(path) in warned[0]


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_pickled_calibration_file_never_runs(capfd, tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"calib{suffix}"
    arr = np.array([Payload(marker)], dtype=object)
    with open(path, "wb") as f:
        if suffix == ".npy":
            np.save(f, arr, allow_pickle=True)
        else:
            np.savez(f, x=arr)
    with pytest.raises(engine.ModelLoadError, match="Python objects.*unpickling"):
        engine.load_calibration(path)
    rc, _, err = cli(capfd, "scores", "demo", "--criterion", "nuclear_norm", "--calibration",
                     path)
    assert rc == 2 and str(path) in error_line(err)
    assert not marker.exists()


# ------------------------------------------------------- outputs of an unknown type


MAKE_CUSTOM_OUTPUT = textwrap.dedent(
    """
    import dataclasses, sys, torch
    from torch.utils import _pytree as pytree

    @dataclasses.dataclass
    class TinyOutput:  # stands for a transformers ModelOutput
        logits: torch.Tensor
        hidden: torch.Tensor

    pytree.register_dataclass(TinyOutput, serialized_type_name="tinymodels.TinyOutput")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 8)
            self.b = torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return TinyOutput(self.b(h), h)

    torch.manual_seed(0)
    torch.export.save(torch.export.export(M().eval(), (torch.randn(2, 4),)), sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def custom_output_pt2(tmp_path_factory) -> Path:
    """Saved by a process where the output class exists; this process has never seen it."""
    path = tmp_path_factory.mktemp("custom") / "custom_output.pt2"
    subprocess.run([PYTHON, "-c", MAKE_CUSTOM_OUTPUT, str(path)], check=True, timeout=300,
                   capture_output=True)
    with zipfile.ZipFile(path) as z:
        graph = next(z.read(n) for n in z.namelist() if n.endswith("models/model.json"))
    assert b"tinymodels.TinyOutput" in graph  # the archive does name the missing class
    return path


def test_unimportable_output_type_cli_prints_one_line(fresh_cli) -> None:
    rc, err = fresh_cli["custom_output"]
    assert rc == 2
    assert "TinyOutput" in assert_one_clean_line(err)


def test_unimportable_output_type_is_a_model_load_error(custom_output_pt2: Path) -> None:
    with pytest.raises(engine.ModelLoadError) as info:
        engine.load_model(custom_output_pt2)
    assert str(custom_output_pt2) in str(info.value) and "\n" not in str(info.value)


def test_unimportable_output_type_error_names_the_type(custom_output_pt2: Path) -> None:
    with pytest.raises(engine.ModelLoadError, match="tinymodels.TinyOutput"):
        engine.load_model(custom_output_pt2)


@dataclasses.dataclass
class LocalOutput:
    logits: torch.Tensor
    features: torch.Tensor


pytree.register_dataclass(LocalOutput, serialized_type_name="prunescope_tests.LocalOutput")


class ReturnsDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 10)
        self.b = nn.Linear(10, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return LocalOutput(self.b(h), h.sum(dim=1, keepdim=True))


@pytest.fixture(scope="module")
def engine_saved_custom(tmp_path_factory) -> Path:
    """A model returning a registered dataclass, pruned and saved by the engine."""
    torch.manual_seed(0)
    model, x = ReturnsDataclass().eval(), torch.randn(3, 4)
    result = engine.prune(model, (x,), None, ratio=0.5)
    assert result.after["params"] < result.before["params"]
    out = tmp_path_factory.mktemp("saved_custom")
    engine.save(result, out, onnx=False)
    return out / "model.pt2"


def test_engine_flattens_custom_outputs_in_the_saved_program(engine_saved_custom: Path) -> None:
    with zipfile.ZipFile(engine_saved_custom) as z:
        graph = next(z.read(n) for n in z.namelist() if n.endswith("models/model.json"))
    assert b"prunescope_tests.LocalOutput" not in graph  # the output tree names no class
    outputs = torch.export.load(engine_saved_custom).module()(torch.randn(3, 4))
    assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [(3, 3), (3, 1)]


def test_engine_saved_custom_outputs_load_where_the_class_is_unknown(fresh_cli) -> None:
    rc, err = fresh_cli["engine_saved_custom"]
    assert rc == 0, err


# ------------------------------------------------------------------------ huge files


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> dict[str, Path]:
    """1 TiB sparse files: nothing on disk, but a stat() says 1 TiB."""
    d = tmp_path_factory.mktemp("huge")
    paths = {}
    for suffix in (".pt2", ".pt"):
        path = d / f"huge{suffix}"
        with open(path, "wb") as f:
            f.truncate(TiB)
        paths[suffix] = path
    return paths


@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_huge_model_file_is_refused_by_its_size(huge: dict[str, Path], suffix: str) -> None:
    with pytest.raises(engine.ModelLoadError, match=r"(?i)size limit|too large|larger than"):
        engine.load_model(huge[suffix], trust_pickle=True, input_shapes=[(1, 3)])


def test_huge_model_file_is_not_read_into_memory(fresh_cli) -> None:
    for suffix in (".pt2", ".pt"):
        rc, err = fresh_cli[f"huge{suffix}"]
        assert rc == 2 and "huge" in error_line(err)
    peak_gib = fresh_cli["peak_kib"] / 2**20
    assert peak_gib < 2.0, f"the CLI used {peak_gib:.1f} GiB around two 1 TiB files"


# ------------------------------------------------------------------ fresh processes


@pytest.fixture(scope="module")
def fresh_cli(files: Path, custom_output_pt2: Path, huge: dict[str, Path],
              engine_saved_custom: Path, tmp_path_factory) -> dict:
    """Every CLI run of this module that must be watched from outside, in one process."""
    runs = {name: ["scores", files / name] for name in
            ("random_bytes.pt2", "truncated_head.pt2", "empty.pt2", "does_not_exist.pt2",
             "model.onnx")}
    runs["custom_output"] = ["scores", custom_output_pt2]
    runs["engine_saved_custom"] = ["scores", engine_saved_custom, "--json",
                                   tmp_path_factory.mktemp("scores") / "scores.json"]
    for suffix, path in huge.items():
        runs[f"huge{suffix}"] = ["scores", path, "--trust-pickle", "--input-shape", "1,3"]
    results, peak_kib = cli_batch(list(runs.values()))
    return {**dict(zip(runs, results)), "peak_kib": peak_kib}
