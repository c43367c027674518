"""Capture: turn whatever the user brings into an ExportedProgram plus example inputs.

Accepted: an ``nn.Module`` with example inputs, an ``ExportedProgram``, a ``.pt2`` file saved
by ``torch.export.save``, a ``.pt``/``.pth`` pickle of an ``nn.Module`` or ``GraphModule``
(only when the user trusts it, since unpickling runs code) with input shapes, and the word
``demo`` / ``demo-lm``. Models are captured with ``torch.export`` (non-strict).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from engine.demo import builtin_example_inputs, is_builtin, load_builtin_program
from engine.errors import ModelLoadError, PruneScopeError, one_line
from engine.graph.custom_ops import register_archive_ops
from engine.graph.inputs import user_inputs
from engine.graph.outputs import tensor_leaves
from engine.graph.safety import (
    check_size,
    inspect_pt2,
    quiet_torch_load,
    root_cause,
    verify_checksums,
)
from engine.io.hf import example_inputs_for, is_pretrained_model, load_folder, source_of_model
from engine.threads import TORCH_EXPORT_LOCK, exclusive

ACCEPTED = (
    "'demo', 'demo-lm', a .pt2 file saved by torch.export.save, a Hugging Face model folder "
    "(config.json and *.safetensors), or a .pt/.pth pickle of an nn.Module (with "
    "--trust-pickle and --input-shape)"
)
PICKLE_SUFFIXES = (".pt", ".pth")


@dataclass
class Captured:
    program: torch.export.ExportedProgram
    example_inputs: tuple
    source: str
    example_kwargs: dict | None = None
    hf: Any = None  # engine.io.hf.HFSource when the model is a transformers model
    # the forward() parameter each positional input fills, where known (the program's own
    # placeholders are args_0, ... after the output-flattening wrapper)
    input_names: tuple[str, ...] = ()
    # the example inputs are the user's single sample twice (a batch of 1 is captured fixed,
    # see `_at_least_two`): one forward on the first sample gives every distinct output
    repeated_sample: bool = False


@exclusive
def load_model(
    source: Any,
    example_inputs: tuple | None = None,
    *,
    trust_pickle: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    seq_len: int | None = None,
) -> Captured:
    """Capture `source` (module, program, path, model folder or 'demo'); errors are one-line
    ModelLoadErrors. `seq_len`: tokens of the example inputs made for a transformers text
    model that comes without example inputs."""
    if isinstance(source, Captured):
        return source
    if isinstance(source, torch.export.ExportedProgram):
        return _from_program(source, example_inputs, "ExportedProgram")
    if isinstance(source, torch.nn.Module):
        if is_pretrained_model(source):
            return _capture_transformers(source, example_inputs, input_shapes, seq_len)
        if example_inputs is None:
            raise ModelLoadError("an nn.Module needs example inputs to be captured")
        return capture_module(source, _as_tuple(example_inputs), source=type(source).__name__)
    if isinstance(source, (str, os.PathLike)):
        if is_builtin(str(source)):
            name = str(source)
            return _from_program(load_builtin_program(name), builtin_example_inputs(name), name)
        path = Path(source)
        if path.is_dir():
            return _load_folder(path, trust_pickle, input_shapes, seq_len)
        return _load_path(path, example_inputs, trust_pickle, input_shapes)
    raise ModelLoadError(f"cannot prune a {type(source).__name__}; give {ACCEPTED}")


def _as_tuple(inputs: Any) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)


def _load_folder(path: Path, trust_pickle: bool, input_shapes, seq_len) -> Captured:
    model, inputs, hf = load_folder(path, trust_pickle=trust_pickle, input_shapes=input_shapes,
                                    seq_len=seq_len)
    captured = capture_module(model, inputs, source=str(path), input_names=hf.input_names,
                              dynamic=True)
    captured.hf = hf
    return captured


def _capture_transformers(model, example_inputs, input_shapes, seq_len) -> Captured:
    """A PreTrainedModel: example inputs from its config unless given; hf/ export enabled."""
    names: tuple[str, ...] = ()
    if example_inputs is None:
        example_inputs, names = example_inputs_for(model, input_shapes, seq_len)
    captured = capture_module(model, _as_tuple(example_inputs), source=type(model).__name__,
                              input_names=names, dynamic=True)
    captured.hf = source_of_model(model, names)
    return captured


def _load_path(path: Path, example_inputs, trust_pickle: bool, input_shapes) -> Captured:
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelLoadError(f"model path {path} is a directory; give {ACCEPTED}")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path} is empty")
    check_size(path)
    if suffix == ".pt2":
        weights = inspect_pt2(path, trust_pickle, defer_large=True)
        register_archive_ops(path)
        # the weights' checksums are read in a second thread while torch reads the program
        # (both release the GIL for their reads); a damaged file is refused before any use
        with ThreadPoolExecutor(1) as pool:
            checked = pool.submit(verify_checksums, path, weights)
            with quiet_torch_load(weights_only=not trust_pickle) as log:
                try:
                    with TORCH_EXPORT_LOCK:
                        program = torch.export.load(os.fspath(path))
                    failure = None
                except Exception as exc:  # noqa: BLE001 - any failure: an unreadable file
                    failure = root_cause(exc, log)
            checked.result()  # raises ModelLoadError for a damaged entry
        if failure is not None:
            raise ModelLoadError(f"model file {path} is not a readable .pt2 "
                                 f"(torch.export.save) archive: {failure}")
        return _from_program(program, example_inputs, str(path))
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise ModelLoadError(
                f"model file {path} is a pickle, and loading a pickle runs code from the file; "
                "pass --trust-pickle (Python: trust_pickle=True) only if you trust it"
            )
        warnings.warn(
            f"loading pickle {path}: it runs code from the file (trusted by the user)",
            UserWarning, stacklevel=2,
        )
        try:
            obj = torch.load(os.fspath(path), weights_only=False, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"model file {path} could not be unpickled: {one_line(exc)}") \
                from None
        if not isinstance(obj, torch.nn.Module):
            raise ModelLoadError(
                f"model file {path} holds a {type(obj).__name__}, not an nn.Module or "
                "GraphModule (a state_dict alone has no architecture to prune)"
            )
        if example_inputs is None:
            if not input_shapes:
                raise ModelLoadError(
                    f"model file {path} needs --input-shape (e.g. 1,3,224,224) to be captured"
                )
            example_inputs = tuple(torch.randn(*shape) for shape in input_shapes)
        return capture_module(obj, _as_tuple(example_inputs), source=str(path))
    raise ModelLoadError(
        f"model file {path} has an unsupported extension '{suffix}'; give {ACCEPTED}"
    )


def _from_program(program, example_inputs, source: str) -> Captured:
    kwargs = None
    if example_inputs is None:
        stored = getattr(program, "example_inputs", None)
        if not stored:
            raise ModelLoadError(
                f"{source} stores no example inputs; pass example inputs (or --input-shape)"
            )
        example_inputs, kwargs = stored
    return Captured(program, _as_tuple(example_inputs), source, kwargs or None)


def capture_module(module: torch.nn.Module, example_inputs: tuple, source: str = "",
                   input_names: tuple[str, ...] = (), dynamic: bool = False) -> Captured:
    """Export a module (eval mode, outputs flattened to plain tensors so the .pt2 loads anywhere).

    Models such as those of ``transformers`` return ``ModelOutput`` dataclasses; a program
    whose output tree names such a class cannot be loaded where that class is not imported.
    The captured program returns the output's tensor leaves as a flat tuple instead (the
    order of ``torch.utils._pytree.tree_leaves``). ``input_names``: the forward() keyword of
    each positional input (transformers models take ``input_ids``, ``attention_mask``, ...
    by name); the program takes them positionally. A model with a ``config.use_cache`` is
    captured with the cache off.

    ``dynamic``: capture with a dynamic batch dimension (and a dynamic sequence length for
    token inputs) where the model allows, so calibration, evaluation and recovery run any
    number of samples at once (see `dynamic_batch_shapes`); a model that only exports with a
    fixed batch is captured as before, with the example inputs as given.
    """
    flat = _with_flat_outputs(module, input_names)
    config = getattr(module, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache:
            config.use_cache = False
        program, captured_inputs = _export(flat, example_inputs, input_names, dynamic, source)
    finally:
        if use_cache:
            config.use_cache = use_cache
    names = tuple(input_names) or forward_parameter_names(module, len(captured_inputs))
    repeated = captured_inputs is not example_inputs and all(
        isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == 1 for x in example_inputs) \
        and _every_batch_dynamic(program)
    return Captured(program, captured_inputs, source, input_names=names,
                    repeated_sample=repeated)


def _every_batch_dynamic(program: torch.export.ExportedProgram) -> bool:
    """Whether dim 0 of every user input is symbolic (a batch of 1 runs)."""
    values = [val for _name, val in user_inputs(program)]
    return bool(values) and all(isinstance(v, torch.Tensor) and v.dim() and
                                isinstance(v.shape[0], torch.SymInt) for v in values)


def distinct_example_inputs(captured: Captured) -> tuple:
    """The example inputs without the repeat of a single sample (`Captured.repeated_sample`):
    the program's batch is dynamic then, and the second sample only doubles a forward's work
    (the verification forwards of a prune run on this)."""
    if not captured.repeated_sample:
        return captured.example_inputs
    return tuple(x[:1] for x in captured.example_inputs)


def forward_parameter_names(module: torch.nn.Module, count: int) -> tuple[str, ...]:
    """The names of the first `count` positional parameters of module.forward, or () where
    they are not plain named parameters (``*args``)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    positional = [p.name for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(positional[:count]) if len(positional) >= count else ()


def _export(flat: torch.nn.Module, example_inputs: tuple, input_names: tuple[str, ...],
            dynamic: bool, source: str) -> tuple[torch.export.ExportedProgram, tuple]:
    """(program, the example inputs it was captured with): dynamic where the model allows."""
    if dynamic:
        inputs = _at_least_two(example_inputs)
        shapes = dynamic_batch_shapes(inputs, input_names)
        if shapes is not None:
            try:
                with light_tracing(), TORCH_EXPORT_LOCK:
                    program = torch.export.export(flat, inputs, dynamic_shapes=(shapes,),
                                                  strict=False)
            except Exception:  # noqa: BLE001 - the model needs a fixed batch: captured so below
                program = None
            if program is not None and has_dynamic_batch(program):
                return program, inputs
    try:
        with light_tracing(), TORCH_EXPORT_LOCK:
            return torch.export.export(flat, example_inputs, strict=False), example_inputs
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"torch.export could not capture {source or 'the model'}: "
                             f"{one_line(exc)}") from None


# token inputs of transformers models whose dim 1 is a sequence length
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask")


def dynamic_batch_shapes(inputs: tuple, input_names: tuple[str, ...]) -> tuple | None:
    """``dynamic_shapes`` for `torch.export.export` of a flattened transformers model: dim 0
    of every input is the batch; dim 1 of token inputs is the sequence length (one for the
    encoder's inputs, another for a decoder's). ``Dim.AUTO``: a dimension the model pins to
    its example size (a fixed position table, a reshape to a constant) stays static instead
    of failing the capture. None when the inputs are not all tensors with a batch dim."""
    if not inputs or not all(isinstance(x, torch.Tensor) and x.ndim for x in inputs):
        return None
    auto = torch.export.Dim.AUTO
    shapes = []
    for k, x in enumerate(inputs):
        name = input_names[k] if k < len(input_names) else ""
        dims = {0: auto}
        if x.ndim >= 2 and name in (*_TOKEN_INPUTS, *_DECODER_INPUTS):
            dims[1] = auto
        shapes.append(dims)
    return tuple(shapes)


def _at_least_two(inputs: tuple) -> tuple:
    """Example inputs with a batch of at least 2: torch.export specialises a size-1
    dimension to the constant 1, so a batch of one would always be captured as fixed."""
    if not all(isinstance(x, torch.Tensor) and x.ndim for x in inputs):
        return inputs
    if all(x.shape[0] >= 2 for x in inputs):
        return inputs
    return tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in inputs)


def has_dynamic_batch(program: torch.export.ExportedProgram) -> bool:
    """Whether dim 0 of the program's first user input is symbolic (any batch size runs)."""
    inputs = user_inputs(program)
    if not inputs:
        return False
    val = inputs[0][1]
    return isinstance(val, torch.Tensor) and bool(val.dim()) and \
        isinstance(val.shape[0], torch.SymInt)


@contextlib.contextmanager
def without_stack_traces() -> Iterator[None]:
    """Tracing without a Python stack trace per node: the engine never reads
    ``node.meta["stack_trace"]``, and extracting and symbolising one for every node is about
    40% of ``torch.export``'s time on a ResNet-50."""
    config = torch.fx.config
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


@contextlib.contextmanager
def lazy_recompiles() -> Iterator[None]:
    """fx graph modules made inside write and compile their Python code on first use
    instead of after every change: torch.export and unlifting rebuild modules whose code
    never runs (a ResNet-50 prune compiled generated code 20 times, 15 with this)."""
    with _use_lazy_graph_module(True):
        yield


@contextlib.contextmanager
def light_tracing() -> Iterator[None]:
    """Tracing for torch.export: no stack traces per node, lazily compiled modules."""
    with without_stack_traces(), lazy_recompiles():
        yield


def _with_flat_outputs(module: torch.nn.Module, input_names: tuple[str, ...] = ()) \
        -> torch.nn.Module:
    wrapped = copy.copy(module)
    base = type(module)
    flat_cls = type(base.__name__, (base,),
                    {"forward": _flat_forward(base.forward, input_names)})
    wrapped.__class__ = flat_cls
    wrapped.eval()
    return wrapped


def _flat_forward(forward, input_names: tuple[str, ...] = ()):
    def flat_forward(self, *args, **kwargs):
        if input_names:
            kwargs = {**dict(zip(input_names, args)), **kwargs}
            args = ()
        out = forward(self, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        leaves = tensor_leaves(out)
        if not leaves:
            raise ModelLoadError(f"the model returns no tensors (it returned a "
                                 f"{type(out).__name__}); there is nothing to verify a pruned "
                                 "model against")
        return tuple(leaves)

    return flat_forward


def copy_module(module: torch.nn.Module, memo: dict[int, Any] | None = None) -> torch.nn.Module:
    """``copy.deepcopy`` of a module (a captured program's graph module included) without the
    FutureWarning that torch's own pytree specs raise while being copied: it concerns torch's
    internals, and the CLI would print it on every prune and recovery. ``memo``: as
    deepcopy's (map a tensor's id to itself to share it instead of copying it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`",
                                category=FutureWarning)
        return copy.deepcopy(module, memo)


def reexport(module: torch.nn.Module, captured: Captured) -> torch.export.ExportedProgram:
    """Capture a changed graph again with the inputs (and dynamic dimensions) of `captured`;
    a failure is one line."""
    inputs = captured.example_inputs
    kwargs = captured.example_kwargs or {}
    try:
        with light_tracing(), TORCH_EXPORT_LOCK:
            return torch.export.export(module, inputs, kwargs or None,
                                       dynamic_shapes=_dynamic_shapes(captured), strict=False)
    except Exception as exc:  # noqa: BLE001 - any export failure is one line
        raise PruneScopeError(
            f"re-exporting the pruned model failed: {one_line(exc)}"
        ) from exc


def _dynamic_shapes(captured: Captured) -> tuple | None:
    """Dim.AUTO where the captured program's positional inputs have symbolic sizes."""
    shapes = []
    any_dynamic = False
    for _name, val in user_inputs(captured.program):
        if isinstance(val, torch.Tensor):
            dims = {d: torch.export.Dim.AUTO for d, s in enumerate(val.shape)
                    if isinstance(s, torch.SymInt)}
            any_dynamic |= bool(dims)
            shapes.append(dims or None)
        else:
            shapes.append(None)
    if not any_dynamic or captured.example_kwargs:
        return None
    if len(shapes) != len(captured.example_inputs):
        return None
    return tuple(shapes)
