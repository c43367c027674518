"""Atomic, checked exports: .pt2 programs, ONNX files and JSON reports.

Every file is written to a temporary file in the destination directory and moved into place
with os.replace, so a reader never sees a half-written file and a failed export leaves any
earlier file at that path untouched.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ExportError, one_line
from engine.graph.inputs import flat_inputs
from engine.graph.outputs import tensor_leaves
from engine.io.custom_ops_onnx import without_custom_ops
from engine.threads import TORCH_EXPORT_LOCK

MIN_OPSET = 17
DEFAULT_OPSET = 18
# Protobuf cannot serialise a single message above 2 GiB, so the weights of bigger models go
# to `<name>.onnx.data` next to the graph (ONNX's external data format). Below this many bytes
# of weights the .onnx file is self-contained (below torch's own 1.5 GiB limit, because an
# inline file is serialised in memory: two more copies of the weights); the environment
# variable PRUNESCOPE_ONNX_EXTERNAL_BYTES changes it.
MAX_INLINE_ONNX_BYTES = 2**30
EXTERNAL_BYTES_ENV = "PRUNESCOPE_ONNX_EXTERNAL_BYTES"

# mkstemp creates files with mode 0600; give the final file the mode a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)



def _where(path: Path) -> Path:
    """Check the destination directory up front so the error names the path, not a temp file."""
    parent = path.parent
    if not parent.exists():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: {parent} is not a directory")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory")
    return parent


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[Path], Any]) -> Path:
    """Call write_fn(temp_path) to write a temp file next to path, then move it onto path.

    On any exception the temp file is removed and an existing file at path is left as it was.
    OS errors (permissions, full disk, missing directory) become an ExportError naming path;
    other exceptions from write_fn propagate unchanged.
    """
    path = Path(path)
    parent = _where(path)
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=parent, prefix=f".{path.name}.tmp-", suffix=path.suffix or ".tmp"
        )
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        if not tmp.is_file():
            raise ExportError(f"cannot write {path}: the writer produced no file")
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write obj as strict JSON (numpy/torch numbers converted; NaN and infinity refused)."""
    try:
        text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
    except ValueError as e:
        raise ExportError(f"cannot write {path}: the data contains NaN or infinity ({e})") from None
    except TypeError as e:
        raise ExportError(f"cannot write {path}: {e}") from None
    return atomic_write_bytes(path, (text + "\n").encode())


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike[str]) -> Path:
    """torch.export.save, atomically."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise ExportError(
            f"cannot save {path}: expected a torch.export.ExportedProgram, "
            f"got {type(program).__name__}"
        )
    # streamed to the temp file (no second copy of the weights in memory) through a writer
    # that never raises into torch: its C++ zip writer aborts the process on a failed write
    # (a full disk), so the first OSError is kept and raised once torch.export.save returns
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            sink = _DeferredErrorWriter(f)
            with TORCH_EXPORT_LOCK:
                torch.export.save(program, sink)
            if sink.error is not None:
                raise sink.error
            f.flush()

    return atomic_write(path, write)


class _DeferredErrorWriter(io.RawIOBase):
    """A seekable binary sink over a file that swallows write errors, keeping the first."""

    def __init__(self, f: io.BufferedWriter) -> None:
        super().__init__()
        self.f = f
        self.error: OSError | None = None
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if self.error is None:
            try:
                self.f.write(data)
            except OSError as e:
                self.error = e
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if self.error is None:
            try:
                self.pos = self.f.seek(pos, whence)
            except OSError as e:
                self.error = e
        return self.pos


# Loggers of the ONNX exporter and its optimiser. A served dashboard logs at INFO, where these
# wrote about a thousand lines per export (rewrite rules applied, slices collapsed, unused
# nodes removed, optional torchvision ops missing); none concerns the user's model.
EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._export")
_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's logging below ERROR and its warnings (pytree deprecations, constants it
    could not fold) are held back for the export; its errors still raise (and become an
    ExportError), and what was held back is one DEBUG line of this module's logger."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    if caught:
        _logger.debug("ONNX export: %d warning(s) held back, first: %s", len(caught),
                      caught[0].message)


def export_onnx(
    program: torch.export.ExportedProgram | torch.nn.Module,
    path: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
    example_inputs: Sequence[Any] | None = None,
    dynamic_shapes: Any = None,
) -> Path:
    """Convert an ExportedProgram (or an nn.Module with example_inputs) to an .onnx file
    (plus `<name>.onnx.data` holding the weights when they exceed external_data_threshold()).

    An ExportedProgram keeps its dynamic dimensions (the demo's batch dimension stays
    symbolic in the ONNX graph). Conversion failures raise ExportError with a one-line reason.
    """
    path = Path(path)
    _where(path)
    if opset < MIN_OPSET:
        raise ExportError(f"cannot export {path}: opset {opset} is too old; use >= {MIN_OPSET}")
    if isinstance(program, torch.export.ExportedProgram):
        program = without_custom_ops(program)
        args: tuple[Any, ...] = ()
    elif isinstance(program, torch.nn.Module):
        if example_inputs is None:
            raise ExportError(f"cannot export {path}: an nn.Module needs example_inputs")
        args = tuple(example_inputs)
    else:
        raise ExportError(
            f"cannot export {path}: expected an ExportedProgram or nn.Module, "
            f"got {type(program).__name__}"
        )
    # the exporter's graph optimiser (constant folding and clean-ups) took 35 s of a 77 s
    # export of a 0.85 B model; models whose weights go to external data skip it
    source = program if isinstance(program, torch.export.ExportedProgram) else None
    weights = _weight_bytes(source.state_dict.values() if source is not None
                            else program.state_dict().values())
    try:
        with _quiet_exporter(), TORCH_EXPORT_LOCK:
            onnx_program = torch.onnx.export(
                program,
                args,
                dynamo=True,
                optimize=weights <= external_data_threshold(),
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as e:
        raise ExportError(f"ONNX conversion for {path} failed: {one_line(e)}") from e
    if onnx_program is None:
        raise ExportError(f"ONNX conversion for {path} failed: the exporter returned nothing")

    readable_dim_names(onnx_program.model)
    weights = sum(v.const_value.nbytes for v in onnx_program.model.graph.initializers.values()
                  if v.const_value is not None)
    if weights <= external_data_threshold():
        atomic_write(path, lambda tmp: onnx_program.save(os.fspath(tmp), external_data=False))
    else:
        _write_with_external_data(onnx_program, path)
    return path


# torch.export names a dynamic size after its internal symbol (s0, s77, ...).
_TORCH_SIZE_SYMBOL = re.compile(r"\bs\d+\b")


def readable_dim_names(model: Any) -> dict[str, str]:
    """Rename torch.export's size symbols in an ONNX IR model (``onnx_program.model``) to
    names a reader of the graph understands: dim 0 of the first input that has a dynamic one
    is ``batch``, any other ``<input>_dim<i>``; every shape in the graph that mentions the
    symbol (``s77`` or ``s77*4``) follows. Returns the renaming."""
    import onnx_ir as ir

    graph = model.graph
    names: dict[str, str] = {}
    for value in graph.inputs:
        for i, dim in enumerate(value.shape or ()):
            symbol = dim.value if isinstance(dim, ir.SymbolicDim) else None
            if symbol and _TORCH_SIZE_SYMBOL.fullmatch(symbol) and symbol not in names:
                readable = "batch" if i == 0 and "batch" not in names.values() \
                    else f"{value.name}_dim{i}"
                names[symbol] = readable
    if not names:
        return names

    def rename(value: Any) -> None:
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value for d in shape):
            return
        dims = [ir.SymbolicDim(_TORCH_SIZE_SYMBOL.sub(lambda m: names.get(m[0], m[0]), d.value))
                if isinstance(d, ir.SymbolicDim) and d.value else d for d in shape]
        value.shape = ir.Shape(dims)

    for value in (*graph.inputs, *graph.outputs):
        rename(value)
    for node in graph.all_nodes():  # subgraphs included
        for value in node.outputs:
            rename(value)
    return names


def _weight_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def external_data_threshold() -> int:
    """Bytes of weights above which an ONNX file keeps them in `<name>.onnx.data`."""
    value = os.environ.get(EXTERNAL_BYTES_ENV)
    if value is None:
        return MAX_INLINE_ONNX_BYTES
    try:
        return int(value)
    except ValueError:
        raise ExportError(f"{EXTERNAL_BYTES_ENV}={value!r} is not an integer number of "
                          "bytes") from None


def external_data_path(path: str | os.PathLike[str]) -> Path:
    """Where the weights of an ONNX file with external data live (named inside the file)."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _write_with_external_data(onnx_program: Any, path: Path) -> None:
    """Write `path` and `path.data` in a private folder next to them, then move them in (the
    .onnx names its data file, so both keep their final names while being written)."""
    data = external_data_path(path)
    if data.is_dir():
        raise ExportError(f"cannot write {data}: it is a directory")
    try:
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        onnx_program.save(os.fspath(folder / path.name), external_data=True)
        for written in (folder / path.name, folder / data.name):
            os.chmod(written, 0o666 & ~_UMASK)
        os.replace(folder / data.name, data)
        os.replace(folder / path.name, path)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()




def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from torch {want.shape}")
    if got.size == 0:
        return 0.0
    if want.dtype == np.bool_ or got.dtype == np.bool_:
        return float(np.any(got != want))
    a, b = got.astype(np.float64), want.astype(np.float64)
    diff = np.abs(a - b)
    # Matching NaNs (or matching infinities) agree; any other NaN is an infinite mismatch.
    agree = (np.isnan(a) & np.isnan(b)) | (a == b)
    diff = np.where(agree, 0.0, diff)
    diff = np.where(np.isnan(diff), math.inf, diff)
    return float(diff.max())


def check_onnx_structure(path: str | os.PathLike[str]) -> None:
    """onnx.checker on the file (by path, so external data is checked where it lies)."""
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as e:
        raise ExportError(f"{path} is not a valid ONNX model: {one_line(e)}") from e


def check_onnx(
    path: str | os.PathLike[str],
    module: torch.nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[Any],
    example_kwargs: Mapping[str, Any] | None = None,
) -> float:
    """Run the ONNX file with ONNX Runtime (CPU) and return the largest absolute difference
    from the torch module's outputs on the same inputs (nested outputs are flattened;
    keyword inputs follow the positional ones, in the module's signature order)."""
    import onnxruntime as ort  # imported here: a second or so that only ONNX checks pay

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"cannot check {path}: no such file")
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    inputs = tensor_leaves(tuple(flat_inputs(module, tuple(example_inputs), example_kwargs)))
    try:
        with torch.no_grad():
            want = [_numpy(t) for t in tensor_leaves(module(*example_inputs,
                                                            **(example_kwargs or {})))]
    except Exception as e:
        raise ExportError(
            f"cannot check {path}: the torch model failed on the inputs: {one_line(e)}"
        ) from e

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ExportError(
                f"{path} takes {len(names)} tensor inputs but {len(inputs)} were given"
            )
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        got = session.run(None, feed)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX Runtime could not run {path}: {one_line(e)}") from e

    if len(got) != len(want):
        raise ExportError(f"{path} returns {len(got)} outputs, the torch model {len(want)}")
    return max((_max_abs_diff(np.asarray(g), w) for g, w in zip(got, want)), default=0.0)
