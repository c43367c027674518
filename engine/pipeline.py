"""The public pipeline: score, prune (apply + verify + metrics) and save."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.device import current, device_scope, on_device, to_device
from engine.errors import ExportError, OnnxExportError, PruneScopeError, one_line
from engine.graph.capture import distinct_example_inputs, reexport
from engine.graph.inputs import run_graph
from engine.graph.outputs import tensor_leaves
from engine.graph.tracer import known_shape
from engine.io.export import (
    check_onnx,
    check_onnx_structure,
    export_onnx,
    external_data_path,
    save_program,
    write_json,
)
from engine.io.hf_config import groups_config_keeps
from engine.io.hf_export import write_hf
from engine.io.staging import open_staging
from engine.options import PruningOptions, check_ratio
from engine.quality.metrics import count_graph_flops, flops_samples, model_metrics
from engine.scoring.analysis import Analysis, analyze, plan
from engine.scoring.planning import Plan
from engine.scoring.uniform import family_counts
from engine.threads import exclusive
from engine.transform import structural
from engine.transform.apply import (
    MaskedInterpreter,
    masked_module,
    output_shapes,
    pruned_roots,
    rewrite,
    tensor_places,
)
from engine.transform.exactness import exact_tolerance, verify_width

ONNX_TOLERANCE = 1e-3  # absolute, per unit of output scale: ONNX Runtime vs the pruned module
ONNX_FILES = ("model.onnx", "model.onnx.data")
Progress = Callable[[str], None]


@dataclass
class Scores:
    analysis: Analysis
    plan: Plan
    calibration: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        raw = self.analysis.raw_scores(
            self.plan.options.criterion, self.calibration, seed=self.plan.options.seed,
            whole_blocks=self.plan.options.prunes_whole_blocks,
        )
        structure = self.analysis.structure(self.plan.options.prunes_whole_blocks)
        groups = []
        for gp in self.plan.groups:
            info = structure.group(gp.name)
            groups.append({
                "name": gp.name,
                "layers": gp.layers,
                "channels": gp.n,
                "raw": {k: v.tolist() for k, v in (raw or {}).get(gp.name, {}).items()},
                "normalized": {k: v.tolist() for k, v in gp.normalized.items()},
                "scores": gp.scores.tolist(),
                "blocks": list(info.blocks) if info.blocks else None,
                "exact": info.exact,
            })
        return {
            "options": self.plan.options.to_dict(),
            "groups": groups,
            "frozen": [f.to_dict() for f in structure.frozen],
            "unsupported_ops": structure.unsupported_ops,
        }


@dataclass
class PruneResult:
    """The pruned model: `module` runs now; `program` is re-exported on first use."""

    module: torch.fx.GraphModule
    report: dict[str, Any]
    plan: Plan
    analysis: Analysis = field(repr=False)
    example_inputs: tuple = field(repr=False, default=())
    _program: torch.export.ExportedProgram | None = field(default=None, repr=False)
    # the captured program where the width pass removed nothing (a ratio of 0, or whole
    # layers only, whose removal already re-captured the model): exporting again would give
    # the same program, and an export of a large model takes minutes
    _unchanged: torch.export.ExportedProgram | None = field(default=None, repr=False)

    @property
    def program(self) -> torch.export.ExportedProgram:
        """The pruned model as an ExportedProgram (what `save` writes as model.pt2)."""
        if self._program is None:
            if self._unchanged is not None and holds_same_tensors(self.module, self._unchanged):
                self._program = self._unchanged
            else:  # pruned, or changed in place since (fine-tuned by the caller)
                self._program = reexport(self.module, self.analysis.captured)
        return self._program

    @property
    def before(self) -> dict[str, int]:
        return self.report["before"]

    @property
    def after(self) -> dict[str, int]:
        return self.report["after"]


@exclusive
@device_scope
def score(
    model: Any,
    example_inputs: tuple | None = None,
    options: PruningOptions | dict | None = None,
    calibration: np.ndarray | None = None,
    *,
    indices: Mapping[str, Iterable[int]] | None = None,
    device: str | torch.device | None = None,
    amp: str | None = None,
    **load_kwargs: Any,
) -> Scores:
    """Raw, normalised and combined scores of every group (no pruning); data-aware criteria
    run their calibration passes on `device` (engine.device), in `amp` autocast if given."""
    options = PruningOptions.from_any(options)
    analysis = analyze(model, example_inputs, **load_kwargs)
    if options.criterion == "index" and not indices:
        # index pruning has no score of its own; show the l2 ranking
        options = PruningOptions(**{**options.to_dict(), "criterion": "l2"})
    the_plan = plan(analysis, options, calibration=calibration, indices=indices)
    return Scores(analysis, the_plan, calibration)


@exclusive
@device_scope
def prune(
    model: Any,
    example_inputs: tuple | None = None,
    options: PruningOptions | dict | None = None,
    *,
    ratio: float | None = None,
    ratios: Mapping[str, float] | None = None,
    pinned: Iterable[str] = (),
    calibration: np.ndarray | None = None,
    indices: Mapping[str, Iterable[int]] | None = None,
    progress: Progress | None = None,
    trust_pickle: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    seq_len: int | None = None,
    uniform: bool = False,
    expert_ratio: float | None = None,
    block_ratio: float | None = None,
    remove_blocks: int | None = None,
    block_unit: str = "block",
    release_original: bool = False,
    device: str | torch.device | None = None,
    amp: str | None = None,
) -> PruneResult:
    """Capture, analyse, plan, apply and verify in one call.

    `device` (`cpu`, `cuda`, `cuda:N`, `mps`, `auto`; engine.device.resolve_device) runs the
    model's forwards: data-aware scoring and verification; `amp` (`bf16`, `fp16`) runs the
    calibration passes in autocast. Capture, slicing and export stay on the CPU.

    `release_original=True` with a model file: the original's weights are freed as the pruned
    ones are made (the two are never all in memory together), so the result cannot be
    recovered or compared with the original afterwards (the CLI uses it when nothing needs
    the original).

    `expert_ratio` removes whole experts of mixtures of experts, `block_ratio` or
    `remove_blocks` whole residual blocks (`block_unit="layer"`: whole transformer layers,
    N and R then count layers); both run before width pruning (engine.transform).
    `uniform`: every repeated layer of the same kind loses the same number of channels
    (engine/scoring/uniform.py), so a transformers model's pruned config stays standard and
    `save` can write OUT/hf/. `seq_len`: tokens of the example inputs made from a
    transformers text model's config.
    """
    options = PruningOptions.from_any(options)
    structures = structural.wanted(expert_ratio, block_ratio, remove_blocks, block_unit)
    if ratio is None and ratios is None and options.criterion != "index" and not structures:
        raise PruneScopeError("give a global ratio (--ratio R) or per-group ratios (--ratios F)")
    if ratio is not None:
        ratio = check_ratio(ratio)
    say = progress or (lambda _msg: None)
    say("capturing the model")
    analysis = original = analyze(model, example_inputs, trust_pickle=trust_pickle,
                                  input_shapes=input_shapes, seq_len=seq_len)
    if structures:
        analysis, sections = structural.remove_structures(
            analysis, expert_ratio=expert_ratio, block_ratio=block_ratio,
            remove_blocks=remove_blocks, calibration=calibration, progress=progress,
            block_unit=block_unit)
        if ratio is None and ratios is None and options.criterion != "index":
            ratio = 0.0
    say("analysing channel dependencies and scoring")
    the_plan = plan(analysis, options, ratio=ratio, ratios=ratios, pinned=pinned,
                    calibration=calibration, indices=indices, uniform=uniform)
    # only a model loaded here from a file has no other owner whose weights could be freed
    owned = release_original and isinstance(model, (str, os.PathLike)) and not structures
    result = apply(analysis, the_plan, progress=progress, release_original=owned)
    if structures:
        # the report of the whole run: sizes before every pass, one section per pass
        result.report["before"] = model_metrics(original.gm, flops_samples(original.captured))
        result.report.update(sections)
    if uniform:
        _report_uniform(result, analysis)
    return result


def _report_uniform(result: PruneResult, analysis: Analysis) -> None:
    """report["uniform"]: each repeated layer kind and what its layers lost; for a
    transformers model, the groups kept whole because its config cannot describe them."""
    whole = result.plan.options.prunes_whole_blocks
    entry: dict[str, Any] = {"families": family_counts(result.plan,
                                                       analysis.prunable_groups(whole))}
    if analysis.captured.hf is not None:
        entry["kept_for_config"] = [{"group": name, "reason": why}
                                    for name, why in groups_config_keeps(analysis, whole).items()]
    result.report["uniform"] = entry


@exclusive
@device_scope
def apply(analysis: Analysis, the_plan: Plan, progress: Progress | None = None, *,
          release_original: bool = False, device: str | torch.device | None = None
          ) -> PruneResult:
    """Remove the planned channels for real, verify against mask mode on `device`, re-export.

    `release_original=True` gives the analysed model up: its weights are freed as their
    slices are made (the analysis cannot be applied or masked again afterwards).
    """
    say = progress or (lambda _msg: None)
    analysis.check_not_released()
    structure = analysis.structure(the_plan.options.prunes_whole_blocks)
    removed = pruned_roots(structure, the_plan)
    inputs = analysis.captured.example_inputs
    kwargs = analysis.captured.example_kwargs or {}
    # a repeated sample is verified once: half the work of both forwards below
    run_inputs = to_device(distinct_example_inputs(analysis.captured))
    run_kwargs = to_device(kwargs)
    samples = flops_samples(analysis.captured)
    before = model_metrics(analysis.gm, samples)
    # the shapes of the pruned model are recorded at the captured inputs' batch, as `before`
    rescale = _CaptureBatch(analysis.gm) if analysis.captured.repeated_sample else None
    say("running the masked original")
    with torch.no_grad():  # mask mode first: the rewrite may release the original weights
        masking = MaskedInterpreter(on_device(analysis.gm), structure, removed,
                                    record_shapes=rescale is not None)
        masked = tensor_leaves(run_graph(masking, run_inputs, run_kwargs))
    if rescale is not None:
        rescale.run_shapes = masking.shapes or {}
    del masking
    say("removing channels")
    release = _releaser(analysis) if release_original else None
    pruned_gm = rewrite(analysis.gm, structure, removed, release)
    say("verifying")
    with torch.no_grad():
        try:
            pruned = tensor_leaves(run_graph(
                ShapeRecorder(on_device(pruned_gm), pruned_gm, rescale), run_inputs, run_kwargs))
        except Exception as exc:  # noqa: BLE001 - an engine bug must surface, not crash
            raise PruneScopeError(f"the pruned model failed to run: {one_line(exc)}") from exc
    verification = verify_width(masked, pruned, {gp.name: structure.group(gp.name).exact
                                                 for gp in the_plan.groups if len(gp.pruned)})
    say("measuring")
    after = model_metrics(pruned_gm, samples, skip=before.get("flops_uncounted", ()))
    report = {
        "options": the_plan.options.to_dict(),
        "groups": [
            {
                "name": gp.name,
                "layers": gp.layers,
                "channels": gp.n,
                "kept": gp.kept.tolist(),
                "pruned": gp.pruned.tolist(),
                "exact": structure.group(gp.name).exact,
            }
            for gp in the_plan.groups
        ],
        "frozen": [f.to_dict() for f in structure.frozen],
        "unsupported_ops": structure.unsupported_ops,
        "before": before,
        "after": after,
        "verification": verification,
    }
    if the_plan.ratios is not None:
        report["ratios"] = dict(the_plan.ratios)
    if the_plan.ratio is not None or the_plan.ratios is None:
        report["ratio"] = the_plan.ratio
    report["device"] = str(current())
    unchanged = analysis.captured.program if not removed.any() and release is None else None
    return PruneResult(pruned_gm, report, the_plan, analysis, inputs, _unchanged=unchanged)


def holds_same_tensors(module: torch.nn.Module, program: torch.export.ExportedProgram) -> bool:
    """Whether every parameter and buffer of `module` equals the program's own, by name and
    value (a module taken from the program, changed in place or not)."""
    stored = {**program.state_dict, **program.constants}
    for name, tensor in module.state_dict(keep_vars=True).items():
        other = stored.get(name)
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape \
                or other.dtype != tensor.dtype or not torch.equal(other.detach(), tensor.detach()):
            return False
    return True


def _releaser(analysis: Analysis) -> Callable[[torch.Tensor], None]:
    """Drops every reference the analysis holds to an original tensor (its module and its
    program), leaving a meta tensor of the same shape; marks the analysis released."""
    gm = analysis.gm
    program = analysis.captured.program
    places = tensor_places(gm)
    stores = [program.state_dict, program.constants]
    keys_by_id: dict[int, list[tuple[dict, str]]] = {}
    for store in stores:
        for key, value in store.items():
            keys_by_id.setdefault(id(value), []).append((store, key))
    analysis.released = True

    def release(tensor: torch.Tensor) -> None:
        meta = torch.empty_like(tensor, device="meta")
        for module_name, attr in places.pop(id(tensor), ()):
            owner = gm.get_submodule(module_name) if module_name else gm
            if attr in owner._parameters:
                owner._parameters[attr] = torch.nn.Parameter(meta, requires_grad=False)
            elif attr in owner._buffers:
                owner._buffers[attr] = meta
        for store, key in keys_by_id.pop(id(tensor), ()):
            store[key] = meta

    return release


class _CaptureBatch:
    """Shapes of a run on fewer samples than the capture's, scaled back to the capture's
    batch: a dimension that the original model had at another size in the run than at
    capture (the batch, or a product of the batch with other sizes) is scaled by the same
    factor in the pruned model. `run_shapes`: the original's node shapes in the run."""

    def __init__(self, original: torch.fx.GraphModule) -> None:
        self.captured_shapes: dict[str, Any] = {}
        for node in original.graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                self.captured_shapes[node.name] = known_shape(val)
            elif isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor)
                                                        for v in val):
                self.captured_shapes[node.name] = [known_shape(v) for v in val]
        self.run_shapes: dict[str, Any] = {}

    def shapes(self, name: str, shapes: Any) -> Any:
        """`shapes` (one tuple or a list, as `output_shapes` gives) at the capture's batch."""
        captured, run = self.captured_shapes.get(name), self.run_shapes.get(name)
        if isinstance(shapes, list):
            if not (isinstance(captured, list) and isinstance(run, list) and
                    len(captured) == len(run) == len(shapes)):
                return shapes
            return [_scaled(s, r, c) for s, r, c in zip(shapes, run, captured)]
        if not isinstance(captured, tuple) or not isinstance(run, tuple):
            return shapes
        return _scaled(shapes, run, captured)


def _scaled(shape: tuple[int, ...], run: tuple[int, ...] | None,
            captured: tuple[int, ...] | None) -> tuple[int, ...]:
    # a data-dependent size at capture (None) has no capture-batch value to scale to
    if run is None or captured is None or not len(shape) == len(run) == len(captured):
        return shape
    return tuple(new * c // r if r and c != r and (new * c) % r == 0 else new
                 for new, r, c in zip(shape, run, captured))


class ShapeRecorder(torch.fx.Interpreter):
    """Runs the pruned graph once and records each node's new shape in its metadata (the
    FLOPs count reads it), so no second pass is needed. Run on a device copy of the graph,
    it records into the nodes of `into`, the graph it was copied from; with `rescale`, a run
    on fewer samples records the shapes at the capture's batch."""

    def __init__(self, module: torch.fx.GraphModule,
                 into: torch.fx.GraphModule | None = None,
                 rescale: _CaptureBatch | None = None) -> None:
        super().__init__(module)
        self.nodes = {n.name: n for n in (into or module).graph.nodes}
        self.rescale = rescale

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        shapes = output_shapes(result)
        if shapes is None:
            return result
        if self.rescale is not None:
            shapes = self.rescale.shapes(n.name, shapes)
        target = self.nodes[n.name]
        if isinstance(shapes, list):
            target.meta["val"] = [_meta_like(r, s) for r, s in zip(result, shapes)]
        else:
            target.meta["val"] = _meta_like(result, shapes)
        return result


def _meta_like(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A meta tensor like `tensor` (strides included), or of `shape` where that differs."""
    if tuple(tensor.shape) == tuple(shape):
        return torch.empty_like(tensor, device="meta")
    return torch.empty(shape, dtype=tensor.dtype, device="meta")




def prune_unverified(analysis: Analysis, the_plan: Plan) -> tuple[torch.fx.GraphModule, dict]:
    """The pruned graph and its params/FLOPs, without the mask-mode check `apply` makes: for
    searches that try many plans and `apply` the one they keep."""
    analysis.check_not_released()
    structure = analysis.structure(the_plan.options.prunes_whole_blocks)
    gm = rewrite(analysis.gm, structure, pruned_roots(structure, the_plan), None)
    with torch.no_grad():
        run_graph(ShapeRecorder(gm), analysis.captured.example_inputs,
                  analysis.captured.example_kwargs)
    # the operations the original's count leaves out (data-dependent sizes), left out here too
    skip = count_graph_flops(analysis.gm).uncounted
    return gm, model_metrics(gm, flops_samples(analysis.captured), skip)


@exclusive
def save(result: PruneResult, out_dir: str | os.PathLike, *, onnx: bool = True,
         progress: Progress | None = None) -> dict[str, Path]:
    """Write model.pt2, model.onnx (+ model.onnx.data for big models), report.json and, for a
    transformers model, hf/.

    Every file is first written into a temporary folder inside `out_dir`; only when all of
    them are complete are they moved into place, so a failure leaves earlier results intact.
    An ONNX failure (conversion, ONNX Runtime check) is not one: model.pt2 and report.json
    (whose "onnx" entry holds {"error": ...}) are still written, then OnnxExportError is
    raised, carrying the written paths.
    """
    say = progress or (lambda _msg: None)

    def fill(staging: Path, report: dict[str, Any]) -> str | None:
        say("writing model.pt2")
        save_program(result.program, staging / "model.pt2")
        onnx_error = None
        if onnx:
            say("writing model.onnx")
            onnx_error = _stage_onnx(result, staging, report)
        if result.analysis.captured.hf is not None:
            say("writing hf/")
            report["hf"] = _write_hf(result, staging / "hf")
        return onnx_error

    paths, onnx_error = _write_staged(result, out_dir,
                                      ("model.pt2", *ONNX_FILES, "report.json", "hf"), fill)
    if onnx_error is not None:
        raise OnnxExportError(f"ONNX export failed (model.pt2 and report.json written): "
                              f"{onnx_error}", paths, result.report)
    return paths


@exclusive
def save_onnx(result: PruneResult, out_dir: str | os.PathLike, *,
              progress: Progress | None = None) -> dict[str, Path]:
    """Add model.onnx (+ model.onnx.data for big models) to a folder that
    `save(result, out_dir, onnx=False)` wrote, checked in ONNX Runtime as `save` checks it,
    and rewrite report.json with its "onnx" entry; both are moved into place together.

    For a caller that converts on demand (the dashboard converts when its Graphs tab or a
    download asks for the file: a conversion costs seconds on a small model and minutes on
    a large one). A failure leaves no model.onnx, writes report.json's "onnx" entry as
    {"error": ...} and raises OnnxExportError.
    """
    say = progress or (lambda _msg: None)

    def fill(staging: Path, report: dict[str, Any]) -> str | None:
        say("writing model.onnx")
        return _stage_onnx(result, staging, report)

    paths, onnx_error = _write_staged(result, out_dir, (*ONNX_FILES, "report.json"), fill)
    if onnx_error is not None:
        raise OnnxExportError(f"ONNX export failed: {onnx_error}", paths, result.report)
    return paths


def _write_staged(result: PruneResult, out_dir: str | os.PathLike, names: tuple[str, ...],
                  fill: Callable[[Path, dict[str, Any]], str | None]
                  ) -> tuple[dict[str, Path], str | None]:
    """`fill(staging, report)` writes files into a staging folder inside `out_dir` and adds
    their report entries; report.json is written next to them, then `names` are moved into
    place as one unit and the result's report becomes the written one. Returns the placed
    paths and what `fill` returned (the ONNX failure, if any)."""
    out = Path(out_dir)
    staging = open_staging(out, ExportError)
    try:
        report = dict(result.report)
        onnx_error = fill(staging, report)
        write_json(staging / "report.json", report)
        paths = _commit(staging, out, names)
        result.report = report
        return paths, onnx_error
    except OSError as exc:
        raise ExportError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage_onnx(result: PruneResult, staging: Path, report: dict[str, Any]) -> str | None:
    """model.onnx into `staging` and report["onnx"] set; the one-line reason on failure (the
    staged ONNX files then removed), else None."""
    try:
        report["onnx"] = _write_onnx(result, staging / "model.onnx")
    except Exception as exc:  # noqa: BLE001 - any ONNX failure: keep the rest, say why
        for name in ONNX_FILES:
            with contextlib.suppress(OSError):
                os.remove(staging / name)
        report["onnx"] = {"error": one_line(exc)}
        return report["onnx"]["error"]
    return None


def _write_hf(result: PruneResult, folder: Path) -> dict[str, Any]:
    """OUT/hf/ for a transformers model (engine/io/hf_export.py); a reason when it cannot be."""
    import warnings

    entry = write_hf(result, folder)
    if not entry["written"]:
        warnings.warn(f"hf/ not written: {entry['reason']}", UserWarning, stacklevel=3)
    return entry


def _write_onnx(result: PruneResult, path: Path) -> dict[str, Any]:
    """model.onnx (with model.onnx.data for big models), checked in ONNX Runtime."""
    export_onnx(result.program, path)
    if any(p.dtype == torch.bfloat16 for p in result.module.parameters()):
        check_onnx_structure(path)
        entry: dict[str, Any] = {"max_abs_diff_vs_torch": None, "opset": 18,
                                 "checked": "structure only (onnx.checker): ONNX Runtime's "
                                            "CPU provider has no bfloat16 kernels"}
    else:
        diff = check_onnx(path, result.module, result.example_inputs,
                          result.analysis.captured.example_kwargs)
        # float16 outputs get the verification's half-precision tolerance (3.9e-3)
        dtypes = [p.dtype for p in result.module.parameters()]
        tolerance = max(ONNX_TOLERANCE, exact_tolerance(dtypes))
        if not np.isfinite(diff) or diff > tolerance * max(1.0, _output_scale(result)):
            raise ExportError(f"model.onnx disagrees with the pruned torch model ({diff:.3g})")
        entry = {"max_abs_diff_vs_torch": diff, "opset": 18}
    if external_data_path(path).exists():
        entry["external_data"] = external_data_path(path).name
    return entry


def _commit(staging: Path, out: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Move the staged files into `out` as one unit.

    Earlier results are first moved aside (a result without ONNX also retires an older
    model.onnx, which would belong to another model); if any move fails, everything is put
    back as it was.
    """
    for name in names:
        if name != "hf" and (out / name).is_dir():
            raise ExportError(f"cannot write {out / name}: a folder of that name is in the way")
    backup = staging / ".previous"
    backup.mkdir()
    moved_aside: list[str] = []
    placed: list[str] = []
    try:
        for name in names:
            if (out / name).exists():
                os.replace(out / name, backup / name)
                moved_aside.append(name)
        for name in names:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
                placed.append(name)
    except OSError as exc:
        for name in placed:
            with contextlib.suppress(OSError):
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                else:
                    os.remove(out / name)
        for name in moved_aside:
            with contextlib.suppress(OSError):
                os.replace(backup / name, out / name)
        raise ExportError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None
    return {name: out / name for name in placed}


def _output_scale(result: PruneResult) -> float:
    with torch.no_grad():
        outs = tensor_leaves(result.module(*result.example_inputs,
                                           **(result.analysis.captured.example_kwargs or {})))
    return max((float(o.abs().max()) for o in outs if o.is_floating_point() and o.numel()),
               default=1.0)


@exclusive
def masked(analysis: Analysis, the_plan: Plan) -> Callable:
    """Mask mode: the original model with the planned channels zeroed (nothing removed)."""
    analysis.check_not_released()
    structure = analysis.structure(the_plan.options.prunes_whole_blocks)
    return masked_module(analysis.gm, structure, pruned_roots(structure, the_plan))
