"""Streamed pruning of a Hugging Face folder larger than memory (weight criteria only).

1. The model is built and captured on the meta device (shapes, no weights); the channel
   analysis and the plan are the usual ones (engine.scoring.analysis).
2. Scoring reads each stored weight from the safetensors shards, one tensor at a time
   (engine/io/shards.py), and frees it once its filters are scored.
3. The plan is applied to the meta graph, which gives the pruned shapes (the config is solved
   from them as for hf/ of the normal path) and how each weight is cut.
4. OUT/hf/ is written shard by shard in the input's layout: each stored tensor is read, cut
   and appended to its shard (written header first, temp + rename).
5. Verification, block by block, during that same pass: when every weight of one decoder
   block has been read, the block runs on the example hidden state (the embeddings of the
   first 8 example tokens) twice: the original block in mask mode (the removed channels
   zeroed in its weights and in its input) and the pruned block; the pruned output must
   match the kept channels of the masked one (exactly where every pruned group is exact;
   where a group is normalised over its own channels, an RMSNorm over the hidden size, the
   difference is reported as for the normal path).

Peak memory: the largest weight a few times over plus the blocks being verified; never the
model. model.pt2 and model.onnx are not written (they need the whole pruned model at once).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import OptionError, PruneScopeError, one_line
from engine.graph.capture import capture_module
from engine.graph.inputs import run_graph
from engine.graph.repeat import repeat_layers
from engine.io.export import write_json
from engine.io.hf import HFSource, load_folder_on_meta, quiet_transformers
from engine.io.hf_config import model_class, rotary_heads
from engine.io.hf_export import carry_files, check_heads, check_uniform, pruned_config
from engine.io.shards import Prefetcher, ShardSet, write_index, write_shard
from engine.io.staging import open_staging
from engine.options import PruningOptions, check_ratio
from engine.pipeline import ShapeRecorder
from engine.quality.metrics import flops_samples, model_metrics
from engine.scoring.analysis import Analysis, plan
from engine.scoring.criteria import WEIGHT_CRITERIA
from engine.threads import TORCH_EXPORT_LOCK, exclusive
from engine.transform.apply import ParamSlice, pruned_roots, rewrite, slice_tensor
from engine.transform.exactness import exact_tolerance

Progress = Callable[[str], None]
# a folder is streamed automatically when its weights take more than this share of the
# memory available now (the normal path peaks near 1.3x the model, bf16 stored as bf16)
AUTO_SHARE = 0.5
PT2_SKIPPED = ("not written in streamed mode: model.pt2 needs the whole pruned model in "
               "memory; run without --stream where the model fits")


def stored_bytes(folder: Path) -> int:
    """The bytes of the folder's safetensors weights (from the shard headers)."""
    return ShardSet(folder).total_bytes


def should_stream(folder: Path, available: int | None = None) -> bool:
    """Whether a folder's weights would not fit comfortably in the memory available now."""
    if available is None:
        available = available_memory()
    return stored_bytes(folder) > AUTO_SHARE * available


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere: the physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**63


def _storage_dtype(shards: ShardSet) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for entry in shards.entries.values():
        if entry.dtype.is_floating_point:
            counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.nbytes
    return max(counts, key=counts.get) if counts else torch.float32


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every name of each parameter (tied weights have several), by each of its names."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(name)
    return {n: names for names in by_id.values() for n in names}


class _Weights:
    """Graph parameter name -> the stored tensor (tied names resolved)."""

    # the scoring pass reads and scores two weights at once (engine/scoring/analysis.py):
    # one thread's read overlaps the other's scoring, and the scoring of both overlaps
    scoring_threads = 2

    def __init__(self, shards: ShardSet, aliases: dict[str, list[str]]) -> None:
        self.shards = shards
        self.aliases = aliases

    def key(self, name: str) -> str:
        if name in self.shards:
            return name
        for other in self.aliases.get(name, ()):
            if other in self.shards:
                return other
        raise PruneScopeError(f"weight {name} is not stored in the folder's safetensors")

    def __call__(self, name: str) -> torch.Tensor:
        return self.shards.read(self.key(name))

    def read_order(self, names: Iterable[str]) -> list[str]:
        """The scoring pass's order: backwards through the shards. The writing pass reads
        them forwards next; the page cache, where it cannot hold the whole model, keeps the
        weights read last, and read backwards those are the ones the writing pass starts
        with (read in the same order, the writing pass would evict each weight just before
        it needs it)."""
        names = list(names)
        rank = {k: i for i, k in enumerate(self.shards.ordered(self.key(n) for n in names))}
        return sorted(names, key=lambda n: -rank[self.key(n)])


@exclusive
def prune_streamed(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PruningOptions | dict | None = None,
    *,
    ratio: float | None = None,
    ratios: Mapping[str, float] | None = None,
    pinned: Iterable[str] = (),
    uniform: bool = True,
    seq_len: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Prune a safetensors model folder without holding the model; writes OUT/hf/ and
    OUT/report.json (staged, then moved into place). Returns the report."""
    say = progress or (lambda _msg: None)
    path = Path(folder)
    options = PruningOptions.from_any(options)
    if options.criterion not in WEIGHT_CRITERIA:
        raise OptionError(f"--stream scores weights only: --criterion "
                          f"{'|'.join(sorted(WEIGHT_CRITERIA))} (got {options.criterion})")
    if ratio is None and ratios is None:
        raise PruneScopeError("give a global ratio (--ratio R) or per-group ratios (--ratios F)")
    if ratio is not None:
        ratio = check_ratio(ratio)
    if not uniform:
        raise OptionError("--stream writes hf/, which needs --uniform (one size per layer kind)")
    return_freed_memory()
    clock = _Clock()
    shards = ShardSet(path)
    dtype = _storage_dtype(shards)
    say("capturing the model on the meta device")
    meta_model, inputs, hf = load_folder_on_meta(path, dtype, seq_len=seq_len)
    captured, module, capture_report = capture_layers(meta_model, inputs, hf, dtype,
                                                      source=str(path))
    captured.hf = hf
    weights = _Weights(shards, _aliases(meta_model))
    analysis = Analysis(captured, weights=weights, module=module)
    analysis.structure(options.prunes_whole_blocks)
    clock("capture_and_analysis")
    say("scoring (reading the weights one at a time)")
    # rotary pairs stay whole here: pruning them rescales the query weights and solves the
    # rope fields (engine/io/hf_export.py), which this tensor-by-tensor writer does not do
    rotary = None if options.prunes_whole_blocks else rotary_heads(analysis)
    if rotary is not None:
        pinned = [*pinned, rotary.group]
    the_plan = plan(analysis, options, ratio=ratio, ratios=ratios, pinned=pinned, uniform=True)
    structure = analysis.structure(the_plan.options.prunes_whole_blocks)
    slices: dict[str, ParamSlice] = {}
    pruned_gm = rewrite(analysis.gm, structure, pruned_roots(structure, the_plan),
                        slices=slices)
    exact = {gp.name: structure.group(gp.name).exact for gp in the_plan.groups
             if len(gp.pruned)}
    clock("scoring_and_plan")
    report: dict[str, Any] = {
        "options": the_plan.options.to_dict(),
        "mode": "streamed",
        "capture": capture_report,
        "groups": [{"name": gp.name, "layers": gp.layers, "channels": gp.n,
                    "kept": gp.kept.tolist(), "pruned": gp.pruned.tolist(),
                    "exact": structure.group(gp.name).exact} for gp in the_plan.groups],
        "frozen": [f.to_dict() for f in structure.frozen],
        "unsupported_ops": structure.unsupported_ops,
        **dict(zip(("before", "after"), report_sizes(
            analysis.gm, _with_pruned_shapes(pruned_gm, captured), flops_samples(captured)))),
        "ratio": the_plan.ratio,
        "pt2": PT2_SKIPPED,
        "onnx": {"error": PT2_SKIPPED.replace("model.pt2", "model.onnx")},
    }
    if the_plan.ratios is not None:
        report["ratios"] = dict(the_plan.ratios)
    out = Path(out_dir)
    staging = open_staging(out)
    try:
        result = _Result(analysis, the_plan, pruned_gm)
        try:
            check_uniform(result)
            check_heads(result)
            new_config = pruned_config(hf, pruned_gm, analysis)
        except PruneScopeError as exc:
            raise PruneScopeError(f"hf/ cannot be written: {one_line(exc)}") from None
        say("writing hf/ shard by shard and verifying block by block")
        verifier = BlockVerifier(hf, new_config, inputs, weights, slices, exact, dtype)
        report["hf"] = write_streamed(hf, new_config, shards, weights, slices,
                                      staging / "hf", verifier.add)
        report["verification"] = verifier.finish()
        clock("write_and_verify")
        report["seconds"] = clock.stages
        write_json(staging / "report.json", report)
        for name in ("hf", "report.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        for name in ("model.pt2", "model.onnx", "model.onnx.data"):
            (out / name).unlink(missing_ok=True)  # older results of another model
    except OSError as exc:
        raise PruneScopeError(f"cannot write to output folder {out}: {exc.strerror or exc}") \
            from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


# model types whose decoder layers are all alike when their parameter shapes and layer types
# are (no per-layer pattern hidden in other config fields): their capture may be repeated
REPEATABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "granite",
                                    "olmo2", "gemma"})


def capture_layers(meta_model: torch.nn.Module, inputs: tuple, hf: HFSource,
                   dtype: torch.dtype, source: str = "",
                   ) -> tuple[Any, torch.fx.GraphModule | None, dict[str, Any]]:
    """The model's capture on meta, and its graph module where it was built here.

    Where every decoder layer is alike, a copy of the model with 2 layers is captured and
    its layer 1 repeated onto layers 2 .. N-1 (engine/graph/repeat.py): torch.export costs
    about 0.3 s per Llama-2-7B layer. Elsewhere all N layers are captured (and the module is
    None: the Analysis unlifts the program as usual). The report's ``capture`` entry says
    which, and why not."""
    # static shapes: no program is written in this mode, so no dynamic batch is needed, and
    # a static capture costs half as long (32 Llama-2-7B layers on meta: 14 s against 26 s)
    layers, why_not = _repeatable_layers(meta_model, hf)
    if layers is not None:
        count = len(meta_model.get_submodule(layers))
        values = hf.config.to_dict()
        values["num_hidden_layers"] = 2
        if isinstance(values.get("layer_types"), list):
            values["layer_types"] = values["layer_types"][:2]
        small_config = type(hf.config).from_dict(values)
        with quiet_transformers(), torch.device("meta"):
            small = model_class(hf)._from_config(small_config, dtype=dtype).eval()
        captured = capture_module(small, inputs, source=source, input_names=hf.input_names)
        with TORCH_EXPORT_LOCK:
            two = captured.program.module()
        tensors = dict(meta_model.named_parameters(remove_duplicate=False))
        tensors.update(meta_model.named_buffers(remove_duplicate=False))
        module = repeat_layers(two, layers, count, tensors)
        if module is not None:
            return captured, module, {"layers": count, "captured_layers": 2,
                                      "repeated_from": f"{layers}.1"}
        why_not = f"{layers}.0 and {layers}.1 do not trace to the same operations"
    captured = capture_module(meta_model, inputs, source=source, input_names=hf.input_names)
    return captured, None, {"captured_layers": "all", "why_not_repeated": why_not}


def _repeatable_layers(model: torch.nn.Module, hf: HFSource) -> tuple[str | None, str]:
    """The name of the decoder layer list (``model.layers``) where a 2-layer capture may be
    repeated onto all of them, else None and why not."""
    config = hf.config
    count = getattr(config, "num_hidden_layers", None)
    if getattr(config, "model_type", None) not in REPEATABLE_MODEL_TYPES:
        return None, f"model type {getattr(config, 'model_type', None)} is not known to " \
                     "repeat one layer"
    if not isinstance(count, int) or count < 3:
        return None, "fewer than 3 layers"
    lists = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if len(lists) != 1:
        return None, "no single list of num_hidden_layers decoder layers"
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(set(types)) > 1:
        return None, f"layer types differ ({', '.join(sorted(set(map(str, types))))})"
    layers = model.get_submodule(lists[0])

    def shapes(layer: torch.nn.Module) -> list:
        return [(n, tuple(t.shape), t.dtype) for n, t in
                [*layer.named_parameters(), *layer.named_buffers()]]

    first = shapes(layers[0])
    if any(shapes(layer) != first for layer in layers):
        return None, "the layers' parameters differ"
    return lists[0], ""


def _with_pruned_shapes(gm: torch.fx.GraphModule, captured) -> torch.fx.GraphModule:
    """The pruned meta graph after one run on meta inputs, which records each node's new
    shape (what the FLOPs count reads)."""
    meta = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t
                 for t in captured.example_inputs)
    with torch.no_grad():
        run_graph(ShapeRecorder(gm), meta, captured.example_kwargs)
    return gm


def report_sizes(original: torch.fx.GraphModule, pruned: torch.fx.GraphModule,
                 samples: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report's ``before`` and ``after`` (parameters, FLOPs, bytes), as the normal path
    gives them: the pruned count leaves out the operations the original's count leaves out
    (``flops_uncounted``), so both count the same operations."""
    before = model_metrics(original, samples)
    return before, model_metrics(pruned, samples, skip=before.get("flops_uncounted", ()))


class _Clock:
    """Seconds spent in each stage (report.json's ``seconds``)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self.last, 2)
        self.last = now


class _Result:
    """What check_uniform / check_heads read of a prune result."""

    def __init__(self, analysis: Analysis, the_plan, module: torch.nn.Module) -> None:
        self.analysis = analysis
        self.plan = the_plan
        self.module = module


def write_streamed(hf: HFSource, new_config, shards: ShardSet, weights: _Weights,
                   slices: Mapping[str, ParamSlice], folder: Path,
                   seen: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
                   ) -> dict[str, Any]:
    """OUT/hf/ in the input's shard layout: each stored tensor read, cut, appended to its
    shard. `seen(key, original, cut)` is called for every tensor (block verification).
    The report's ``hf`` entry."""
    cls = model_class(hf)
    dtype = _storage_dtype(shards)
    with quiet_transformers(), torch.device("meta"):
        fresh = cls._from_config(new_config, dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    how_of: dict[str, ParamSlice | None] = {}
    for key in shards.entries:
        names = [key, *weights.aliases.get(key, ())]
        how_of[key] = next((slices[n] for n in names if n in slices), None)
        shape = shards.entries[key].shape
        new_shape = how_of[key].shape(shape) if how_of[key] is not None else shape
        if key not in expected:
            raise PruneScopeError(f"hf/ cannot be written: weight {key} has no place in "
                                  f"{hf.model_class}")
        if expected[key] != new_shape:
            raise PruneScopeError(f"hf/ cannot be written: {key} would be {list(new_shape)} "
                                  f"where the pruned config implies {list(expected[key])}")
    folder.mkdir(parents=True)
    with quiet_transformers():
        new_config.save_pretrained(os.fspath(folder))
    def read_and_cut(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        # the last pass over the input: its pages can leave the cache once read
        original = shards.read(key, last_use=True)
        how = how_of[key]
        return original, slice_tensor(original, how).contiguous() if how else original

    # the next weight is read and cut in the reader thread (numpy's take, which cuts bf16
    # weights, releases the GIL) while this one is verified and written
    reader = Prefetcher(read_and_cut, [k for f in shards.files for k in shards.by_file[f]])
    try:
        total, weight_map = _write_shards(shards, how_of, folder, reader, seen)
    finally:
        reader.close()
    if len(shards.files) > 1 or (shards.folder / "model.safetensors.index.json").is_file():
        write_index(folder, weight_map, total)
    carried = carry_files(hf, folder)
    before = hf.config.to_dict()
    after = new_config.to_dict()
    changed = {k: after[k] for k in after if k in before and before[k] != after[k]
               and k not in ("architectures", "dtype", "torch_dtype", "transformers_version")}
    return {"written": True, "auto_class": hf.auto_class or hf.model_class,
            "model_class": hf.model_class, "config": changed, "carried": carried,
            "shards": len(shards.files), "bytes": total,
            "checked": "block by block against mask mode (see verification)"}


def _write_shards(shards: ShardSet, how_of: Mapping[str, ParamSlice | None], folder: Path,
                  read_and_cut: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
                  seen: Callable[[str, torch.Tensor, torch.Tensor], None] | None,
                  ) -> tuple[int, dict[str, str]]:
    """Each shard of the input written cut, in its order; (bytes, weight_map).
    `read_and_cut(key)`: the stored tensor and its cut copy."""
    total = 0
    weight_map: dict[str, str] = {}
    for file in shards.files:
        keys = shards.by_file[file]
        specs = {}
        for key in keys:
            entry = shards.entries[key]
            how = how_of[key]
            specs[key] = (entry.dtype, how.shape(entry.shape) if how else entry.shape)

        def tensor_of(key: str) -> torch.Tensor:
            original, cut = read_and_cut(key)
            if seen is not None:
                seen(key, original, cut)
            return cut

        total += write_shard(folder / file, specs, tensor_of, shards.metadata.get(file))
        weight_map.update({k: file for k in keys})
    return total, weight_map


_BLOCK = re.compile(r"^(.*)\.(\d+)\.(.+)$")
VERIFY_TOKENS = 8
_PENDING_BLOCKS = 3  # blocks whose weights are held while their other weights are read


class BlockVerifier:
    """Runs each decoder block, original in mask mode and pruned, once its weights are read."""

    def __init__(self, hf: HFSource, new_config, inputs: tuple, weights: _Weights,
                 slices: Mapping[str, ParamSlice], exact: Mapping[str, bool],
                 dtype: torch.dtype) -> None:
        self.hf, self.weights, self.slices, self.dtype = hf, weights, slices, dtype
        self.exact_expected = all(exact.values())
        self.inexact = [n for n, e in exact.items() if not e]
        self.results: list[dict[str, Any]] = []
        self.skipped: str | None = None
        self.pending: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.evicted: set[int] = set()
        # token inputs cut to their first few tokens: a 7B block costs about 0.1 s per token
        # and forward on one CPU core, and a few tokens exercise every weight
        inputs = tuple(t[:, :VERIFY_TOKENS] if t.dim() == 2 else t for t in inputs)
        try:
            self._setup(new_config, inputs)
        except Exception as exc:  # noqa: BLE001 - an architecture this check cannot run
            self.skipped = f"block verification not run: {one_line(exc)}"

    def _setup(self, new_config, inputs: tuple) -> None:
        keys = list(self.weights.shards.entries)
        lists: dict[str, set[int]] = {}
        for key in keys:
            match = _BLOCK.match(key)
            if match:
                lists.setdefault(match.group(1), set()).add(int(match.group(2)))
        if not lists:
            raise PruneScopeError("no repeated blocks in the weight names")
        self.list_name = max(lists, key=lambda n: len(lists[n]))
        self.count = len(lists[self.list_name])
        prefix = re.compile(rf"^{re.escape(self.list_name)}\.(\d+)\.(.+)$")
        self.block_keys: dict[int, set[str]] = {}
        for key in keys:
            match = prefix.match(key)
            if match:
                self.block_keys.setdefault(int(match.group(1)), set()).add(key)
        self.original, self.block_call = self._skeleton(self.hf.config, inputs)
        self.pruned, _ = self._skeleton(new_config, inputs)
        embed_name = _input_embedding_name(self.original_model)
        table = self.weights(embed_name)
        ids = inputs[0].reshape(-1)[: inputs[0].shape[-1]].unsqueeze(0)
        self.hidden = table[ids].to(self.dtype)  # (1, tokens, hidden)
        how = self.slices.get(embed_name)
        self.kept_hidden = None
        if how is not None:
            for dim, index in how.gathers:
                if dim % table.dim() == table.dim() - 1:
                    self.kept_hidden = torch.as_tensor(index, dtype=torch.long)
        del table

    def _skeleton(self, config, inputs: tuple):
        """One block of the architecture on the CPU, and the arguments the model passes it."""
        from transformers.initialization import no_init_weights

        values = config.to_dict()
        values["num_hidden_layers"] = 1
        if isinstance(values.get("layer_types"), list):
            values["layer_types"] = values["layer_types"][:1]
        small = type(config).from_dict(values)
        with quiet_transformers(), no_init_weights():
            model = model_class(self.hf)._from_config(small, dtype=self.dtype).eval()
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
        block = model.get_submodule(self.list_name)[0]
        call: dict[str, Any] = {}

        class Captured(Exception):
            pass

        def grab(_module, args, kwargs):
            call["args"], call["kwargs"] = args, kwargs
            raise Captured

        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**dict(zip(self.hf.input_names, inputs)))
        except Captured:
            pass
        finally:
            handle.remove()
        if "args" not in call:
            raise PruneScopeError(f"{self.list_name}.0 was not called by the model")
        if not hasattr(self, "original_model"):
            self.original_model = model
        return block, call

    def add(self, key: str, original: torch.Tensor, cut: torch.Tensor) -> None:
        if self.skipped is not None:
            return
        match = _BLOCK.match(key)
        if not match or match.group(1) != self.list_name:
            return
        index = int(match.group(2))
        held = self.pending.setdefault(index, {})
        held[key] = (original, cut)
        if set(held) == self.block_keys[index]:
            self._verify(index, self.pending.pop(index))
        while len(self.pending) > _PENDING_BLOCKS:  # shards out of block order: re-read later
            oldest = min(self.pending)
            self.evicted.add(oldest)
            del self.pending[oldest]

    def finish(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"mode": "block by block", "skipped": self.skipped}
        for index in sorted(set(self.block_keys) - {r["block"] for r in self.results}):
            held = {}
            for key in self.block_keys[index]:
                original = self.weights.shards.read(key)
                how = self._how(key)
                held[key] = (original, slice_tensor(original, how) if how else original)
            self._verify(index, held)
        worst = max(self.results, key=lambda r: r["relative_diff_vs_masked"])
        tolerance = exact_tolerance([self.dtype])
        agrees = all(r["relative_diff_vs_masked"] <= tolerance for r in self.results)
        if self.exact_expected and not agrees:
            raise PruneScopeError(
                f"verification failed: block {worst['block']} of the pruned model differs from "
                f"the masked original by {worst['relative_diff_vs_masked']:.3g} (relative), "
                "where it must agree exactly")
        return {"mode": "block by block", "blocks": len(self.results),
                "input": f"the embeddings of the first {VERIFY_TOKENS} example tokens",
                "max_abs_diff_vs_masked": max(r["max_abs_diff_vs_masked"] for r in self.results),
                "relative_diff_vs_masked": worst["relative_diff_vs_masked"],
                "worst_block": worst["block"], "exact": bool(self.exact_expected and agrees),
                "tolerance": tolerance, "exact_expected": self.exact_expected,
                "inexact_groups": self.inexact, "per_block": self.results}

    def _how(self, key: str) -> ParamSlice | None:
        for name in (key, *self.weights.aliases.get(key, ())):
            if name in self.slices:
                return self.slices[name]
        return None

    def _verify(self, index: int, held: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        start = f"{self.list_name}.{index}."
        masked_state, pruned_state = {}, {}
        for key, (original, cut) in held.items():
            local = key[len(start):]
            how = self._how(key)
            if how is not None and cut.data_ptr() == original.data_ptr():
                original = original.clone()  # nothing was cut: the tensor is shared
            masked_state[local] = _masked(original, how)
            pruned_state[local] = cut
        held.clear()
        self.original.load_state_dict(masked_state, strict=True, assign=True)
        self.pruned.load_state_dict(pruned_state, strict=True, assign=True)
        hidden = self.hidden
        if self.kept_hidden is not None:
            keep = torch.zeros(hidden.shape[-1], dtype=hidden.dtype)
            keep[self.kept_hidden] = 1
            masked_in = hidden * keep
            pruned_in = hidden[..., self.kept_hidden]
        else:
            masked_in = pruned_in = hidden
        args, kwargs = self.block_call["args"], self.block_call["kwargs"]
        with torch.no_grad():
            want = _first(self.original(masked_in, *args[1:], **kwargs))
            got = _first(self.pruned(pruned_in, *args[1:], **kwargs))
        for block, state in ((self.original, masked_state), (self.pruned, pruned_state)):
            _drop_weights(block, state)  # the next block's weights replace them
        if self.kept_hidden is not None:
            want = want[..., self.kept_hidden]
        if want.shape != got.shape:
            raise PruneScopeError(f"verification failed: block {index}'s output shape changed")
        diff = float((want.float() - got.float()).abs().max())
        scale = float(want.float().abs().max())
        self.results.append({"block": index, "max_abs_diff_vs_masked": diff,
                             "relative_diff_vs_masked": diff / scale if scale > 0 else diff})


def _drop_weights(block: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Point the loaded weights of `block` at the meta device, freeing their memory."""
    for name in state:
        owner, _, attr = name.rpartition(".")
        module = block.get_submodule(owner) if owner else block
        old = module._parameters.get(attr)
        if old is not None:
            module._parameters[attr] = torch.nn.Parameter(
                torch.empty_like(old, device="meta"), requires_grad=False)
        elif attr in module._buffers and module._buffers[attr] is not None:
            module._buffers[attr] = torch.empty_like(module._buffers[attr], device="meta")
    state.clear()


def return_freed_memory() -> None:
    """Large allocations straight from (and back to) the kernel, on glibc.

    glibc raises its mmap threshold each time a large block is freed, up to 32 MB, after
    which weights of 1 to 32 MB come from the heap, whose freed pages stay in the process:
    reading a model one weight at a time would then keep about as much resident as the
    weights read. A fixed 1 MB threshold returns each freed weight at once."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None:
            mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: nothing to tune
        pass


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _masked(weight: torch.Tensor, how: ParamSlice | None) -> torch.Tensor:
    """`weight` with every removed index of each cut dim zeroed, in place (mask mode in the
    weights; the original is not needed once its cut copy exists)."""
    if how is None:
        return weight
    out = weight
    for dim, index in how.gathers:
        keep = np.zeros(weight.shape[dim], dtype=bool)
        keep[index] = True
        drop = torch.as_tensor(np.flatnonzero(~keep), dtype=torch.long)
        if len(drop):
            out.index_fill_(dim, drop, 0)
    return out


def _input_embedding_name(model: torch.nn.Module) -> str:
    embedding = model.get_input_embeddings()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is embedding.weight:
            return name
    raise PruneScopeError("the model's input embedding has no weight")
