"""Calibration and evaluation data: the one loader every command, criterion and page uses.

Forms (``load_data``): arrays, text, Hugging Face datasets and image folders. Text and images
are turned into the model's inputs here (tokenized with the model folder's tokenizer,
preprocessed with its image processor), so everything downstream sees arrays; that needs the
model's inputs (``ModelInputs``, from ``model_inputs(captured)``). Text forms and their
options: ``engine/io/data_text.py``; images: ``engine/io/data_images.py``.

Arrays: an ``.npz`` with ``x`` (or ``x0``, ``x1``, ... for a model with several inputs, same
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from engine.demo import BUILTIN_NAMES, builtin_data_path, is_builtin
from engine.errors import DataError, one_line
from engine.graph.safety import env_bytes
from engine.io import data_images, data_text
from engine.options import TEXT_MODES

DATA_FORMAT = ".npz with x (or x0, x1, ... for several inputs) and optional labels y, or a .npy"
ALLOWED_ARRAYS = ("allowed arrays: x (or x0, x1, ... for several inputs, not both) and "
                  "optional labels y")
SUFFIXES = (".npz", ".npy")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
ALL_FORMATS = (".npz/.npy arrays, text (.txt one sample a line, .jsonl/.json, .csv/.tsv/"
               ".parquet), a Hugging Face datasets save_to_disk folder, hf:NAME[:CONFIG]:SPLIT, "
               "or a folder of images")
HF_PREFIX = "hf:"
DEFAULT_MAX_DATA_BYTES = 4 * 2**30


@dataclass(frozen=True)
class DataOptions:
    """How text and images become model inputs, and which samples are kept.

    ``text_field``/``label_field``: the record field or column holding the text (default
    ``text``) and the optional label (default ``label``); ``text_mode``: one of TEXT_MODES;
    ``seq_len``: tokens per sample where the model leaves it free; ``tokenizer``: a folder
    with a tokenizer, for a model that has none (a ``.pt2``, a module); ``max_samples``: a
    seeded random subset of that many samples (``seed``); ``image_size``/``mean``/``std``:
    preprocessing of images for a model without an image processor; ``read_batch``: records
    read and tokenized at a time (large sources are never held as text all at once)."""

    text_field: str | None = None
    label_field: str | None = None
    text_mode: str = "pad"
    seq_len: int | None = None
    tokenizer: str | None = None
    max_samples: int | None = None
    seed: int = 0
    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    read_batch: int = 1024


@dataclass(frozen=True)
class ModelInputs:
    """What a model takes, as far as turning text or images into its inputs needs it.

    ``names``: the forward() keyword of each positional input ("" where unknown, e.g. a
    ``.pt2`` whose inputs are ``args_0``, ...); ``shapes``: each input's shape, None where a
    size is free; ``integer``: whether each input takes integers; ``folder``: the model folder
    (its tokenizer, image processor); ``config``: the transformers config, if any."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int | None, ...], ...]
    integer: tuple[bool, ...]
    source: str = "the model"
    folder: Path | None = None
    config: Any = field(default=None, repr=False)
    # tokens of the first example input (the length the model was captured with)
    example_seq_len: int | None = None


def model_inputs(captured: Any) -> ModelInputs:
    """The ``ModelInputs`` of a captured model (``engine.graph.capture.Captured``)."""
    program = captured.program
    user = [s.arg.name for s in program.graph_signature.input_specs
            if s.kind.name == "USER_INPUT"]
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    shapes, integer = [], []
    for name, example in zip(user, captured.example_inputs):
        val = vals.get(name)
        shape = getattr(val, "shape", None) or getattr(example, "shape", ())
        shapes.append(tuple(s if isinstance(s, int) else None for s in shape))
        dtype = getattr(val, "dtype", None) or getattr(example, "dtype", None)
        integer.append(dtype is not None and not dtype.is_floating_point)
    hf = getattr(captured, "hf", None)
    names = tuple(getattr(hf, "input_names", ()) or getattr(captured, "input_names", ()) or ())
    if len(names) != len(user):
        # a program exported from a function with named arguments keeps those names
        names = tuple(u if not re.fullmatch(r"args?_\d+|x\d*", u) else "" for u in user)
    folder = getattr(hf, "folder", None)
    config = getattr(hf, "config", None)
    if folder is None and config is not None:
        guess = Path(str(getattr(config, "name_or_path", "") or ""))
        folder = guess if str(guess) and guess.is_dir() else None
    first = captured.example_inputs[0] if captured.example_inputs else None
    example_len = int(first.shape[1]) if getattr(first, "ndim", 0) >= 2 else None
    return ModelInputs(names, tuple(shapes), tuple(integer), str(captured.source or "the model"),
                       folder, config, example_len)


@dataclass(frozen=True, eq=False)
class DataSet:
    """Inputs for a model with one or several inputs (same first axis), optional labels.

    ``source`` (a file, a built-in set, an upload's name) and ``flag`` (the option or role
    that brought it, e.g. ``--eval-data``) make up the ``where`` of error messages."""

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None = None
    source: str = "data"
    flag: str = "--eval-data"
    # the model input each array feeds ("" unknown): metrics find the attention mask by name
    input_names: tuple[str, ...] = ()
    # tokens the tokenizer knows (text data): perplexity needs logits over all of them
    vocab_size: int | None = None
    # "arrays", "text" or "images": what the samples were made from
    form: str = "arrays"
    # one line on how the samples were made (tokenizer, length, mode), for reports
    note: str = ""

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

    def subset(self, n: int | None, seed: int = 0) -> DataSet:
        """A seeded random subset of ``n`` samples, in their original order."""
        if n is None or n >= len(self):
            return self
        index = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        labels = None if self.labels is None else self.labels[index]
        return replace(self, inputs=tuple(x[index] for x in self.inputs), labels=labels)

    def named(self, name: str) -> np.ndarray | None:
        """The input array fed to the model input ``name`` (e.g. attention_mask), if any."""
        if name in self.input_names:
            return self.inputs[self.input_names.index(name)]
        return None

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
              flag: str = "--eval-data", name: str | None = None,
              model: Any = None, options: DataOptions | None = None) -> DataSet:
    """Read data in any form (``ALL_FORMATS``): a file, an upload's bytes (``name``: what
    messages call it), a folder, ``hf:NAME[:CONFIG]:SPLIT`` or a built-in model's set
    (``kind``: ``"eval"`` or ``"calibration"``). Text and images become the inputs of
    ``model`` (a captured model, or its ``ModelInputs``); ``options`` say how
    (``DataOptions``)."""
    options = options or DataOptions()
    check_options(options)
    if isinstance(source, bytes | bytearray | memoryview):
        shown = name or "upload"
        suffix = Path(shown).suffix.lower() or ".npz"
        payload = bytes(source)
        if suffix in TEXT_SUFFIXES:
            return _text(lambda: io.BytesIO(payload), suffix, flag, shown, model, options)
        if suffix not in SUFFIXES:
            raise DataError(f"{flag} file {shown} has extension '{suffix}'; give "
                            f"{UPLOAD_FORMATS}")
        return _arrays(_read(lambda: io.BytesIO(payload), suffix, flag, shown), model, options)
    text = os.fspath(source)
    if is_builtin(text):
        path = builtin_data_path(text, kind)
        data = _read(lambda: open(path, "rb"), ".npz", flag, f"{text} ({path.name})")
        return _arrays(data, model, options)
    if text.startswith(HF_PREFIX):
        return _dataset(text, flag, text, model, options)
    path = Path(text)
    shown = name or str(path)
    allowed = f"give {ALL_FORMATS}, or one of {', '.join(BUILTIN_NAMES)}"
    if path.is_dir():
        if data_text.is_saved_dataset(path):
            return _dataset(str(path), flag, shown, model, options)
        if data_images.has_images(path):
            return _images(path, flag, shown, model, options)
        raise DataError(f"{flag} folder {shown} is neither a datasets save_to_disk folder "
                        f"(dataset_info.json) nor a folder of images "
                        f"({', '.join(data_images.IMAGE_SUFFIXES)}); {allowed}")
    if not path.is_file():
        raise DataError(f"{flag} file {shown} does not exist; {allowed}")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _text(lambda: open(path, "rb"), suffix, flag, shown, model, options)
    if suffix not in SUFFIXES:
        raise DataError(f"{flag} file {shown} has extension '{path.suffix}'; {allowed}")
    return _arrays(_read(lambda: open(path, "rb"), suffix, flag, shown), model, options)


UPLOAD_FORMATS = ".npz/.npy arrays or text (.txt, .jsonl, .json, .csv, .tsv, .parquet)"
# what a single uploaded file may be (the dashboard's upload widgets offer these)
UPLOAD_SUFFIXES = (*SUFFIXES, *TEXT_SUFFIXES)


def needs_model(source: Any) -> bool:
    """Whether data must be turned into a model's inputs (text, images, datasets): the
    model is then loaded before the data."""
    if isinstance(source, DataSet) or not isinstance(source, str | os.PathLike):
        return False
    text = os.fspath(source)
    path = Path(text)
    return text.startswith(HF_PREFIX) or path.suffix.lower() in TEXT_SUFFIXES or path.is_dir()


def check_options(options: DataOptions) -> None:
    """One line for an option outside what is allowed."""
    if options.text_mode not in TEXT_MODES:
        raise DataError(f"--text-mode {options.text_mode!r} is not allowed; allowed: "
                        f"{', '.join(TEXT_MODES)}")
    for flag, value in (("--max-samples", options.max_samples), ("--seq-len", options.seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise DataError(f"{flag} {value!r} is not allowed; allowed: an integer >= 1")
    if options.read_batch < 1:
        raise DataError(f"read_batch {options.read_batch} must be >= 1")


def _arrays(data: DataSet, model: Any, options: DataOptions) -> DataSet:
    """Arrays as read: named after the model's inputs when known; the seeded subset."""
    model = None if isinstance(model, str | os.PathLike) else as_model_inputs(model)
    if model is not None and len(model.names) == len(data.inputs) and all(model.names):
        data = replace(data, input_names=model.names)
    return data.subset(options.max_samples, options.seed)


def _text_target(model: Any, where: str) -> ModelInputs:
    model = _resolved(model)
    if model is None:
        raise DataError(f"{where} is text, and turning text into model inputs needs the "
                        "model (its tokenizer and inputs); load it with the model: "
                        "engine.load_data(path, model=engine.model_inputs(captured))")
    return model


def _seq_len(model: ModelInputs, options: DataOptions, where: str) -> int:
    """The model's sequence length: fixed by the capture, else --seq-len, else the length
    the model was captured with."""
    shape = model.shapes[0] if model.shapes else ()
    fixed = shape[1] if len(shape) >= 2 else None
    if fixed is not None:
        if options.seq_len is not None and options.seq_len != fixed:
            raise DataError(f"{where}: --seq-len {options.seq_len}, but {model.source} was "
                            f"captured with a fixed sequence length of {fixed}")
        return int(fixed)
    if options.seq_len is not None:
        return options.seq_len
    return int(model.example_seq_len or DEFAULT_TEXT_SEQ_LEN)


DEFAULT_TEXT_SEQ_LEN = 128


def _records_to_data(batches, where: str, flag: str, shown: str, model: ModelInputs | None,
                     options: DataOptions) -> DataSet:
    model = _text_target(model, where)
    names = data_text.text_input_names(model.names, model.integer, where, model.source)
    tokenizer = data_text.load_tokenizer(model.folder, options.tokenizer, where, model.source)
    seq_len = _seq_len(model, options, where)
    stream = options.text_mode == "stream"
    if options.max_samples is not None and not stream:
        kept = data_text.sample_records(batches, options.max_samples, options.seed)
        if not kept:
            raise DataError(f"{where} is empty; expected text samples (one a line or record)")
        batches = (kept[i:i + options.read_batch] for i in range(0, len(kept),
                                                                   options.read_batch))
    inputs, raw_labels = data_text.text_arrays(batches, tokenizer, names, seq_len,
                                               options.text_mode, where)
    model_vocab = getattr(model.config, "vocab_size", None)
    top = int(inputs[0].max())
    if isinstance(model_vocab, int) and top >= model_vocab:
        raise DataError(f"{where}: the tokenizer gives token id {top}, beyond the vocabulary "
                        f"of {model.source} ({model_vocab} tokens): it is not the model's "
                        "tokenizer; give the right one with --tokenizer FOLDER")
    labels = None if stream else data_text.class_indices(raw_labels, where, model.config)
    note = (f"{options.text_mode} mode, {seq_len} tokens a sample, tokenizer "
            f"{options.tokenizer or model.folder}")
    data = DataSet(inputs, labels, shown, flag, names, len(tokenizer), "text", note)
    return data.subset(options.max_samples, options.seed) if stream else data


def _text(opener, suffix: str, flag: str, shown: str, model: ModelInputs | None,
          options: DataOptions) -> DataSet:
    where = f"{flag} file {shown}"
    text_field, label_field = options.text_field or "text", options.label_field or "label"
    batches = data_text.file_records(opener, suffix, where, text_field, label_field,
                                     options.read_batch)
    return _records_to_data(batches, where, flag, shown, model, options)


def _dataset(source: str, flag: str, shown: str, model: ModelInputs | None,
             options: DataOptions) -> DataSet:
    where = f"{flag} {shown}"
    batches = data_text.dataset_records(source, where, options.text_field or "text",
                                        options.label_field or "label", options.read_batch)
    return _records_to_data(batches, where, flag, shown, model, options)


def _images(path: Path, flag: str, shown: str, model: ModelInputs | None,
            options: DataOptions) -> DataSet:
    where = f"{flag} folder {shown}"
    model = _resolved(model)
    if model is None:
        raise DataError(f"{where} holds images, and preprocessing them needs the model (its "
                        "input size, its image processor); load it with the model")
    inputs, labels, note = data_images.image_arrays(path, where, model, options)
    names = model.names if len(model.names) == 1 and model.names[0] else ()
    return DataSet(inputs, labels, shown, flag, names, None, "images", note)


def load_eval_data(path_or_name: str | os.PathLike, *, flag: str = "--eval-data",
                   model: Any = None, options: DataOptions | None = None) -> DataSet:
    """Held-out data to measure a model on; a built-in name gives its evaluation set.
    ``model`` (a captured model or its ``ModelInputs``) is needed for text and images."""
    return load_data(path_or_name, kind="eval", flag=flag, model=model,
                     options=options)


def load_calibration_data(path_or_name: str | os.PathLike, *, flag: str = "--calibration",
                          model: Any = None, options: DataOptions | None = None) -> DataSet:
    """Calibration data (same forms); a built-in name gives its training split."""
    return load_data(path_or_name, kind="calibration", flag=flag,
                     model=model, options=options)


def _resolved(model: Any) -> ModelInputs | None:
    """``ModelInputs`` of what the caller gave (a captured model, not yet a path: capturing
    belongs to the graph stage, above this one)."""
    if isinstance(model, str | os.PathLike):
        raise DataError(f"text and images are read for a captured model, not the path "
                        f"{os.fspath(model)}: give model=engine.load_model(...)")
    return as_model_inputs(model)


def as_model_inputs(model: Any) -> ModelInputs | None:
    """``ModelInputs`` of a captured model (or anything holding one: an analysis, a prune
    result); None stays None."""
    if model is None or isinstance(model, ModelInputs):
        return model
    for attr in ("captured", "analysis"):
        inner = getattr(model, attr, None)
        if inner is not None:
            return as_model_inputs(inner)
    if hasattr(model, "program") and hasattr(model, "example_inputs"):
        return model_inputs(model)
    raise DataError(f"cannot read the inputs of a {type(model).__name__}; give a captured "
                    "model (engine.load_model) or engine.ModelInputs")


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

def as_data(data: Any, *, flag: str = "calibration", kind: str = "calibration",
            model: Any = None) -> DataSet:
    """Any accepted form (see the module docstring) as a checked DataSet; a path or
    built-in name is read with ``load_data`` (text and images for ``model``, captured)."""
    if isinstance(data, DataSet):
        return data
    if isinstance(data, str | os.PathLike):
        return load_data(data, kind=kind, flag=flag, model=model)
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
