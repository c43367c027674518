"""Calibration and evaluation data: the one loader every command, criterion and page uses.

Format: an ``.npz`` with ``x`` (or ``x0``, ``x1``, ... for a model with several inputs, same
first axis) and optional integer labels ``y``, or a ``.npy`` holding ``x``; a built-in model's
name (``demo``, ``demo-lm``) stands for its calibration set (the training split) or its
evaluation set (held out). The dashboard passes an upload's bytes.

Nothing is unpickled. The arrays' headers are read first (from the zip directory of an
``.npz``), so an array of Python objects (which only unpickling, i.e. running code from the
file, could load) and arrays larger than the limit (``PRUNESCOPE_MAX_DATA_BYTES``, 4 GiB by
default; an ``.npz`` can hold far more than its size on disk) are refused before any data is
read; the data is then read with ``np.load(allow_pickle=False)``.

``as_data`` also takes the in-memory forms of the Python API: an array or tensor, a list of
them (one per input), a mapping such as ``np.load``'s result, or an object with
``x``/``xs``/``inputs`` and ``y``/``labels``. One set of checks applies to every form, and a
problem is one ``DataError`` line naming the file (or option) and what is allowed.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from engine.demo import BUILTIN_NAMES, builtin_data_path, is_builtin
from engine.errors import DataError, one_line
from engine.graph.safety import env_bytes

DATA_FORMAT = ".npz with x (or x0, x1, ... for several inputs) and optional labels y, or a .npy"
ALLOWED_ARRAYS = ("allowed arrays: x (or x0, x1, ... for several inputs, not both) and "
                  "optional labels y")
SUFFIXES = (".npz", ".npy")
DEFAULT_MAX_DATA_BYTES = 4 * 2**30


@dataclass(frozen=True, eq=False)
class DataSet:
    """Inputs for a model with one or several inputs (same first axis), optional labels.

    ``source`` (a file, a built-in set, an upload's name) and ``flag`` (the option or role
    that brought it, e.g. ``--eval-data``) make up the ``where`` of error messages."""

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None = None
    source: str = "data"
    flag: str = "--eval-data"

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    @property
    def where(self) -> str:
        return f"{self.flag} {self.source}"

    def head(self, n: int | None) -> DataSet:
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return replace(self, inputs=tuple(x[:n] for x in self.inputs), labels=labels)

    def fingerprint(self, limit: int | None = None) -> str:
        """A digest of the (first ``limit``) samples: equal data gives the same key even when
        it arrives as a new object (a reloaded file, a copied array)."""
        digest = hashlib.blake2b(digest_size=16)
        for a in (*self.inputs, self.labels):
            if a is None:
                digest.update(b"no-labels")
                continue
            digest.update(f"{a.dtype.str}{a.shape}".encode())
            digest.update(np.ascontiguousarray(a[:limit]).tobytes())
        return digest.hexdigest()


def max_data_bytes() -> int:
    return env_bytes("PRUNESCOPE_MAX_DATA_BYTES", DEFAULT_MAX_DATA_BYTES)


# ------------------------------------------------------------------------------ files

def load_data(source: str | os.PathLike | bytes, *, kind: str = "eval",
              flag: str = "--eval-data", name: str | None = None) -> DataSet:
    """Read a data file, an upload's bytes (``name``: what messages call it) or a built-in
    model's set (``kind``: ``"eval"`` or ``"calibration"``)."""
    if isinstance(source, bytes | bytearray | memoryview):
        shown = name or "upload"
        suffix = Path(shown).suffix.lower() or ".npz"
        if suffix not in SUFFIXES:
            raise DataError(f"{flag} file {shown} has extension '{suffix}'; give a "
                            f"{DATA_FORMAT}")
        return _read(lambda: io.BytesIO(source), suffix, flag, shown)
    text = os.fspath(source)
    if is_builtin(text):
        path = builtin_data_path(text, kind)
        return _read(lambda: open(path, "rb"), ".npz", flag, f"{text} ({path.name})")
    path = Path(text)
    shown = name or str(path)
    allowed = f"give a {DATA_FORMAT}, or one of {', '.join(BUILTIN_NAMES)}"
    if path.is_dir():
        raise DataError(f"{flag} file {shown} is a folder; {allowed}")
    if not path.is_file():
        raise DataError(f"{flag} file {shown} does not exist; {allowed}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{flag} file {shown} has extension '{path.suffix}'; {allowed}")
    return _read(lambda: open(path, "rb"), suffix, flag, shown)


def load_eval_data(path_or_name: str | os.PathLike, *, flag: str = "--eval-data") -> DataSet:
    """Held-out data to measure a model on; a built-in name gives its evaluation set."""
    return load_data(path_or_name, kind="eval", flag=flag)


def load_calibration_data(path_or_name: str | os.PathLike, *,
                          flag: str = "--calibration") -> DataSet:
    """Calibration data (same format); a built-in name gives its training split."""
    return load_data(path_or_name, kind="calibration", flag=flag)


def load_calibration(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """A single-input calibration file (or built-in name) as ``(x, y)``; ``y`` is None
    without labels. Data for several inputs: ``load_calibration_data``."""
    data = load_calibration_data(path, flag="calibration")
    if len(data.inputs) != 1:
        raise DataError(f"{data.where} holds {len(data.inputs)} inputs (x0, x1, ...); "
                        "load it with engine.load_calibration_data")
    return data.inputs[0], data.labels


def same_data_file(calibration: str | os.PathLike, evaluation: str | os.PathLike) -> bool:
    """Whether a calibration and an evaluation argument name the same file (built-in names
    name two different sets)."""
    def resolve(arg, kind: str) -> Path:
        name = os.fspath(arg)
        return builtin_data_path(name, kind) if is_builtin(name) else Path(name)

    a, b = resolve(calibration, "calibration"), resolve(evaluation, "eval")
    try:
        return a.is_file() and b.is_file() and a.samefile(b)
    except OSError:
        return False


def _read(opener, suffix: str, flag: str, shown: str) -> DataSet:
    where = f"{flag} file {shown}"
    try:
        with opener() as file:
            headers = _headers(file, suffix)
            _check_headers(headers, where)
            names = _input_names(list(headers), where)
            file.seek(0)
            if suffix == ".npy":
                arrays = {"x": np.load(file, allow_pickle=False)}
            else:
                with np.load(file, allow_pickle=False) as archive:
                    arrays = {key: archive[key] for key in archive.files}
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file
        raise DataError(f"{where} is unreadable ({DATA_FORMAT}): {one_line(exc)}"[:400]) \
            from None
    return _checked(tuple(arrays[k] for k in names), arrays.get("y"), flag, shown, where)


def _headers(file: IO[bytes], suffix: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype, from the .npy headers alone (no data is read)."""
    if suffix == ".npy":
        return {"x": _npy_header(file)}
    headers = {}
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                headers[info.filename.removesuffix(".npy")] = _npy_header(member)
    return headers


def _npy_header(file: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(file)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(file)
    return tuple(shape), dtype


def _check_headers(headers: dict[str, tuple[tuple[int, ...], np.dtype]], where: str) -> None:
    for key, (_, dtype) in headers.items():
        if dtype.hasobject:
            raise DataError(f"{where}: {key} is an array of Python objects, which only "
                            "unpickling (running code from the file) could load; allowed: "
                            "arrays of numbers")
    total = sum(int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                for shape, dtype in headers.values())
    limit = max_data_bytes()
    if total > limit:
        raise DataError(f"{where} holds {_size(total)} of arrays, more than the limit of "
                        f"{_size(limit)} (set PRUNESCOPE_MAX_DATA_BYTES to raise it)")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _input_names(names: list[str], where: str) -> list[str]:
    """``["x"]`` or ``["x0", "x1", ...]``; any other set of names is one error."""
    numbered = sorted((k for k in names if re.fullmatch(r"x\d+", k)), key=lambda k: int(k[1:]))
    found = ", ".join(sorted(names)) or "nothing"
    if "x" not in names and not numbered:
        raise DataError(f"{where} has no array 'x' (found: {found}); {ALLOWED_ARRAYS}")
    if set(names) - {"x", "y", *numbered} or ("x" in names and numbered):
        raise DataError(f"{where} holds {found}; {ALLOWED_ARRAYS}")
    if numbered and numbered != [f"x{i}" for i in range(len(numbered))]:
        raise DataError(f"{where} holds {', '.join(numbered)}; several inputs are numbered "
                        "x0, x1, ... without gaps")
    return ["x"] if "x" in names else numbered


def _checked(inputs: tuple[np.ndarray, ...], labels: np.ndarray | None, flag: str,
             source: str, where: str) -> DataSet:
    for i, x in enumerate(inputs):
        name = "x" if len(inputs) == 1 else f"x{i}"
        if x.ndim == 0 or x.shape[0] == 0:
            raise DataError(f"{where}: {name} has shape {x.shape}; it needs at least one "
                            "sample along its first axis")
        if x.dtype.kind not in "biuf":
            raise DataError(f"{where}: {name} has dtype {x.dtype}; allowed: numbers (float "
                            "for features, integers for token ids)")
        if x.shape[0] != inputs[0].shape[0]:
            raise DataError(f"{where}: the inputs hold different numbers of samples "
                            f"({', '.join(str(a.shape[0]) for a in inputs)})")
    if labels is not None:
        if labels.ndim == 0 or labels.shape[0] != inputs[0].shape[0]:
            raise DataError(f"{where}: labels y have shape {labels.shape} for "
                            f"{inputs[0].shape[0]} samples; y needs one label per sample")
        if labels.dtype.kind not in "biu":
            raise DataError(f"{where}: labels y have dtype {labels.dtype}; allowed: integer "
                            "class indices")
    return DataSet(tuple(inputs), labels, source, flag)


# ---------------------------------------------------------------------------- in memory

def as_data(data: Any, *, flag: str = "calibration", kind: str = "calibration") -> DataSet:
    """Any accepted form (see the module docstring) as a checked DataSet; a path or
    built-in name is read with ``load_data``."""
    if isinstance(data, DataSet):
        return data
    if isinstance(data, str | os.PathLike):
        return load_data(data, kind=kind, flag=flag)
    where = f"{flag} data"
    labels = None
    if _is_array(data):
        inputs = [data]
    elif isinstance(data, Mapping) or hasattr(data, "files"):  # a dict or np.load's NpzFile
        names = [str(k) for k in (data.files if hasattr(data, "files") else data.keys())]
        inputs = [data[k] for k in _input_names(names, where)]
        labels = data["y"] if "y" in names else None
    elif isinstance(data, list | tuple) and data and all(_is_array(a) for a in data):
        inputs = list(data)
    else:
        several = next((getattr(data, k) for k in ("inputs", "xs")
                        if isinstance(getattr(data, k, None), list | tuple)), None)
        single = getattr(data, "x", None)
        if several is None and single is None:
            raise DataError(
                f"{where} must be an array, a list of arrays (one per input), a mapping with "
                f"x (or x0, x1, ...) and optional y, or a {DATA_FORMAT} file; got "
                f"{type(data).__name__}")
        inputs = list(several) if several is not None else [single]
        labels = next((getattr(data, k) for k in ("y", "labels")
                       if getattr(data, k, None) is not None), None)
    arrays = tuple(_numpy(a) for a in inputs)
    return _checked(arrays, None if labels is None else _numpy(labels), flag, "data", where)


def _is_array(a: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    return isinstance(a, np.ndarray) or (torch is not None and isinstance(a, torch.Tensor))


def _numpy(a: Any) -> np.ndarray:
    if _is_array(a) and not isinstance(a, np.ndarray):
        return a.detach().cpu().numpy()
    return np.asarray(a)
