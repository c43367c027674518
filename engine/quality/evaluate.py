"""Evaluation: one number saying how well a model does on held-out data.

Data is what ``engine.io.data`` reads: a ``.npz`` with ``x`` (or ``x0``, ``x1``, ... for a
model with several inputs) and optional labels ``y``, a ``.npy`` holding ``x`` only, or a
built-in model's name (``demo``, ``demo-lm``: its held-out evaluation set).

Metrics (of the model's first output):

- ``accuracy``: top-1 over the last axis against the labels ``y``;
- ``perplexity``: a causal language model (``x`` = token ids ``[N, T]``, first output logits
  ``[N, T, V]``): exp of the mean next-token negative log-likelihood;
- ``agreement``: share of top-1 predictions equal to a reference model's;
- ``relative_error``: ``||out - ref|| / ||ref||`` against a reference model's output.

- ``embedding_cosine``, ``embedding_spearman``, ``neighbor_agreement``: an encoder's pooled
  embeddings against a reference model's (``engine/quality/embedding.py``).

The default follows what the model returns (``choose_metric``): ``accuracy`` with labels and
class scores; ``perplexity`` for a causal language model whose logits span the tokenizer's
vocabulary; the embedding metrics for an encoder's hidden states ``[N, T, H]`` (never
perplexity); otherwise ``agreement`` (which needs a reference). Results name the metric and
the reason it was chosen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from engine.device import current, device_scope, on_device, to_device
from engine.errors import OptionError, PruneScopeError
from engine.graph.capture import Captured, load_model
from engine.graph.inputs import sample_chunks, user_input_shapes, user_inputs
from engine.graph.outputs import tensor_leaves
from engine.io.data import (  # noqa: F401 - importable from here, as before
    DataOptions,
    DataSet,
    as_model_inputs,
    load_calibration_data,
    load_eval_data,
    same_data_file,
)
from engine.options import METRICS
from engine.pipeline import PruneResult
from engine.quality.embedding import EMBEDDING_METRICS, embedding_metrics, mean_pool
from engine.scoring.analysis import Analysis
from engine.threads import exclusive

HIGHER_IS_BETTER = {"accuracy": True, "perplexity": False, "agreement": True,
                    "relative_error": False, **dict.fromkeys(EMBEDDING_METRICS, True)}
NEEDS_REFERENCE = ("agreement", "relative_error", *EMBEDDING_METRICS)
# transformers classes whose logits predict the next token (perplexity applies)
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
EvalData = DataSet  # the public name of held-out data (engine.EvalData)


# --------------------------------------------------------------------------- the model side

class _Runner:
    """Runs one model on chunks of samples and returns its first output.

    An exported program may have a static batch size: it is then fed fixed-size chunks, the
    last one padded with copies of its last sample. A module that fails on a free batch size
    is retried with its example inputs' batch size.
    """

    def __init__(self, module: Callable, expected: list[tuple] | None,
                 fixed_batch: int | None, fallback_batch: int | None, name: str) -> None:
        self.module = module
        self.expected = expected  # per input: (shape with None for free sizes, dtype)
        self.fixed_batch = fixed_batch
        self.fallback_batch = fallback_batch
        self.name = name
        self.captured: Any = None  # the captured model where known (its inputs, hf class)
        self._placed: tuple[torch.device, Callable] | None = None

    @property
    def model_class(self) -> str | None:
        """The transformers class name of the model, where known."""
        return getattr(getattr(self.captured, "hf", None), "model_class", None)

    def placed(self) -> Callable:
        """The module on the current device (copied there once)."""
        where = current()
        if self._placed is None or self._placed[0] != where:
            self._placed = (where, on_device(self.module, where))
        return self._placed[1]

    @torch.no_grad()
    def __call__(self, chunk: Sequence[torch.Tensor], data: EvalData) -> torch.Tensor:
        module = self.placed()
        chunk = to_device(tuple(chunk))
        if self.fixed_batch is None:
            try:
                return _first_tensor(module(*chunk))
            except PruneScopeError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried with the example's batch size
                if self.fallback_batch is None:
                    raise self._error(exc, chunk, data) from None
                self.fixed_batch = self.fallback_batch
        size = self.fixed_batch
        outs = []
        for part, real in sample_chunks(chunk, size, fixed=True, fill=True):
            try:
                outs.append(_first_tensor(module(*part))[:real])
            except PruneScopeError:
                raise
            except Exception as exc:  # noqa: BLE001 - the user's data or model: one line
                raise self._error(exc, part, data) from None
        return torch.cat(outs)

    def _error(self, exc: Exception, chunk, data: EvalData) -> OptionError:
        text = str(exc).strip().splitlines()
        shapes = ", ".join(str(tuple(x.shape)) for x in chunk)
        return OptionError(f"{self.name} fails on {data.flag} {data.source} (inputs {shapes}): "
                           f"{type(exc).__name__}: {text[0] if text else ''}"[:400])


def _first_tensor(output: Any) -> torch.Tensor:
    leaves = tensor_leaves(output)
    if not leaves:
        raise OptionError(f"the model's output ({type(output).__name__}) holds no tensor")
    return leaves[0].detach().cpu()


def _runner(model: Any, example_inputs: tuple | None, load_kwargs: dict) -> _Runner:
    program = captured = None
    if isinstance(model, PruneResult):
        examples = example_inputs or model.example_inputs
        captured = model.analysis.captured
        program = captured.program  # same input constraints as the pruned one
        module, name = model.module, "the pruned model"
    elif isinstance(model, torch.export.ExportedProgram):
        program, module, name = model, model.module(), "the program"
        stored = getattr(model, "example_inputs", None)
        examples = example_inputs or (stored[0] if stored else None)
    elif isinstance(model, torch.nn.Module):
        module, examples, name = model, example_inputs, type(model).__name__
    else:
        if isinstance(model, Analysis):
            model = model.captured
        captured = model if isinstance(model, Captured) else load_model(
            model, example_inputs, **load_kwargs)
        program, module = captured.program, captured.program.module()
        examples, name = captured.example_inputs, f"model {captured.source}"
    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    expected = _expected_inputs(program, examples)
    fixed = None
    if program is not None and expected and expected[0][0] and expected[0][0][0] is not None:
        fixed = expected[0][0][0]
    fallback = None
    if examples and isinstance(examples[0], torch.Tensor) and examples[0].ndim:
        fallback = int(examples[0].shape[0])
    runner = _Runner(module, expected, fixed, fallback, name)
    runner.captured = captured
    return runner


def _expected_inputs(program, examples) -> list[tuple] | None:
    """Per user input: its shape (None where the size is free) and dtype."""
    if program is not None:
        vals = [val for _name, val in user_inputs(program)]
        if all(isinstance(val, torch.Tensor) for val in vals):
            return [(shape, val.dtype) for shape, val in zip(user_input_shapes(program), vals)]
    if examples:
        # An eager module: only the batch size is known to be free.
        return [((None, *x.shape[1:]), x.dtype) for x in examples
                if isinstance(x, torch.Tensor)] or None
    return None


def _as_tensors(data: EvalData, runner: _Runner) -> tuple[torch.Tensor, ...]:
    """The data as the model's input tensors; a mismatch with the model's inputs is one line."""
    where = f"{data.flag} {data.source}"
    expected = runner.expected
    if expected is not None and len(expected) != len(data.inputs):
        got = "x" if len(data.inputs) == 1 else ", ".join(f"x{i}" for i in range(len(data.inputs)))
        raise OptionError(f"{where} holds {len(data.inputs)} input array(s) ({got}) but "
                          f"{runner.name} takes {len(expected)}; give x for one input or x0, "
                          "x1, ... for several")
    tensors = []
    for i, x in enumerate(data.inputs):
        name = "x" if len(data.inputs) == 1 else f"x{i}"
        if expected is None:
            dtype = torch.get_default_dtype() if x.dtype.kind == "f" else None
            t = torch.from_numpy(np.ascontiguousarray(x))
            tensors.append(t.to(dtype) if dtype is not None else t)
            continue
        shape, dtype = expected[i]
        want = "(" + ", ".join("N" if s is None and d == 0 else "*" if s is None else str(s)
                               for d, s in enumerate(shape)) + ")"
        if x.ndim != len(shape) or any(s is not None and d > 0 and x.shape[d] != s
                                       for d, s in enumerate(shape)):
            raise OptionError(f"{where}: {name} has shape {x.shape}, but {runner.name} takes "
                              f"inputs of shape {want}")
        if (x.dtype.kind == "f") != dtype.is_floating_point:
            kind = "floating-point" if dtype.is_floating_point else "integer"
            raise OptionError(f"{where}: {name} has dtype {x.dtype}, but {runner.name} takes "
                              f"{kind} inputs ({str(dtype).removeprefix('torch.')})")
        tensors.append(torch.from_numpy(np.ascontiguousarray(x)).to(dtype))
    return tuple(tensors)


# ------------------------------------------------------------------------------ the metrics

class _Accumulator:
    def __init__(self, metric: str, data: EvalData, runner_name: str) -> None:
        self.metric, self.data, self.name = metric, data, runner_name
        self.total = 0.0
        self.count = 0
        self.ref_total = 0.0
        self.pooled: list[np.ndarray] = []  # embedding metrics: the model's pooled outputs
        self.ref_pooled: list[np.ndarray] = []

    def add(self, out: torch.Tensor, x: Sequence[torch.Tensor], labels: np.ndarray | None,
            ref: torch.Tensor | None, mask: np.ndarray | None = None) -> None:
        where = f"{self.data.flag} {self.data.source}"
        if self.metric == "accuracy":
            pred = out.argmax(dim=-1).numpy() if out.ndim >= 2 else None
            if pred is None or pred.shape != labels.shape:
                raise OptionError(
                    f"accuracy on {where}: labels y have shape {labels.shape[1:]} per sample, "
                    f"but {self.name}'s first output has shape {tuple(out.shape[1:])} (top-1 "
                    "over its last axis must give one prediction per label)")
            self.total += float((pred == labels).sum())
            self.count += pred.size
        elif self.metric == "perplexity":
            tokens = x[0]
            if not _is_lm(out, tokens):
                raise OptionError(
                    f"perplexity on {where} needs a causal language model: x = token ids "
                    f"[N, T] and a first output of logits [N, T, V]; got x {tuple(tokens.shape)}"
                    f" ({str(tokens.dtype).removeprefix('torch.')}) and output "
                    f"{tuple(out.shape)}; use --metric accuracy, agreement or relative_error")
            # float32 is enough for one chunk's sum; the total is accumulated in Python floats
            logits = out[:, :-1].float() if out.dtype != torch.float64 else out[:, :-1]
            targets = tokens[:, 1:].long()
            if int(targets.min()) < 0 or int(targets.max()) >= out.shape[-1]:
                raise OptionError(f"perplexity on {where}: token ids must lie in "
                                  f"[0, {out.shape[-1]}) (the vocabulary of the logits)")
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            if mask is not None:  # padding is not text: only real next tokens count
                real = torch.from_numpy(np.ascontiguousarray(mask[:, 1:])).reshape(-1) > 0
                nll = nll[real]
            self.total += float(nll.sum())
            self.count += nll.numel()
        elif self.metric in EMBEDDING_METRICS:
            if ref.shape != out.shape:
                raise OptionError(f"{self.metric}: the reference's first output has shape "
                                  f"{tuple(ref.shape)}, the model's {tuple(out.shape)}")
            if out.ndim not in (2, 3):
                raise OptionError(f"{self.metric} needs embeddings [N, H] or hidden states "
                                  f"[N, T, H]; the first output has shape {tuple(out.shape)}")
            use_mask = mask if out.ndim == 3 and mask is not None and \
                mask.shape == tuple(out.shape[:2]) else None
            self.pooled.append(mean_pool(out, use_mask))
            self.ref_pooled.append(mean_pool(ref, use_mask))
            self.count += int(out.shape[0])
        else:
            if ref.shape != out.shape:
                raise OptionError(f"{self.metric}: the reference's first output has shape "
                                  f"{tuple(ref.shape)}, the model's {tuple(out.shape)}")
            if self.metric == "agreement":
                if out.ndim < 2:
                    raise OptionError(f"agreement needs class scores (top-1 over the last "
                                      f"axis); the first output has shape {tuple(out.shape)}")
                same = out.argmax(dim=-1) == ref.argmax(dim=-1)
                self.total += float(same.sum())
                self.count += same.numel()
            else:
                self.total += float(((out.double() - ref.double()) ** 2).sum())
                self.ref_total += float((ref.double() ** 2).sum())
                self.count += out.numel()

    def embedding(self) -> dict[str, float]:
        return embedding_metrics(np.concatenate(self.pooled), np.concatenate(self.ref_pooled))

    def value(self) -> float:
        if self.metric in EMBEDDING_METRICS:
            return self.embedding()[self.metric] if self.count else float("nan")
        if self.metric == "perplexity":
            return math.exp(self.total / self.count) if self.count else float("nan")
        if self.metric == "relative_error":
            if self.ref_total == 0:
                return 0.0 if self.total == 0 else float("inf")
            return math.sqrt(self.total / self.ref_total)
        return self.total / self.count if self.count else float("nan")


def _is_lm(out: torch.Tensor, tokens: torch.Tensor) -> bool:
    return (not tokens.is_floating_point() and tokens.ndim == 2 and tokens.shape[1] >= 2
            and out.ndim == 3 and tuple(out.shape[:2]) == tuple(tokens.shape)
            and out.is_floating_point())


def _is_hidden_states(out: torch.Tensor, tokens: torch.Tensor) -> bool:
    """Token ids [N, T] in, float [N, T, H] out (an encoder's hidden states)."""
    return (not tokens.is_floating_point() and tokens.ndim == 2 and out.ndim == 3
            and tuple(out.shape[:2]) == tuple(tokens.shape) and out.is_floating_point())


def causal_lm_reason(out: torch.Tensor, tokens: torch.Tensor, vocab_size: int | None,
                     model_class: str | None) -> tuple[bool, str]:
    """Whether perplexity applies (a causal LM whose logits span the tokenizer's
    vocabulary), and why (not)."""
    if not _is_lm(out, tokens):
        return False, (f"the first output {tuple(out.shape)} is not next-token logits [N, T, V] "
                       f"over token ids [N, T] {tuple(tokens.shape)}")
    width = int(out.shape[-1])
    if model_class is not None and not model_class.endswith(CAUSAL_LM_SUFFIXES):
        return False, f"{model_class} is not a causal language model"
    if vocab_size is not None and width < vocab_size:
        return False, (f"the last axis of the first output ({width}) does not span the "
                       f"tokenizer's vocabulary of {vocab_size}: hidden states, not logits")
    top = int(tokens.max()) if tokens.numel() else 0
    if vocab_size is None and top >= width:
        return False, (f"token ids reach {top}, beyond the last axis of the first output "
                       f"({width}): hidden states, not logits")
    vocab = f"the tokenizer's vocabulary of {vocab_size}" if vocab_size is not None else \
        "every token id of the data"
    who = model_class or "the model"
    return True, (f"{who} returns next-token logits [N, T, {width}] spanning {vocab}: a "
                  "causal language model")


def choose_metric(data: EvalData, out: torch.Tensor, x: Sequence[torch.Tensor],
                  has_reference: bool, model_class: str | None = None) -> tuple[str, str]:
    """The metric that fits what the model returns on this data, and why: accuracy for class
    scores with labels; perplexity for a causal LM (logits spanning the tokenizer's
    vocabulary); embedding metrics for an encoder's hidden states; agreement otherwise."""
    where = f"{data.flag} {data.source}"
    labels_fit = data.labels is not None and out.ndim == data.labels.ndim + 1 and \
        tuple(out.shape[:-1]) == (out.shape[0], *data.labels.shape[1:])
    if labels_fit:
        return "accuracy", f"{where} has labels and the model returns class scores"
    tokens = x[0]
    causal, why = causal_lm_reason(out, tokens, data.vocab_size, model_class)
    if causal:
        return "perplexity", why
    encoder = _is_hidden_states(out, tokens) or (
        out.ndim == 2 and out.is_floating_point() and model_class is not None
        and not model_class.endswith(("ForSequenceClassification", "ForImageClassification",
                                      "ForAudioClassification")) and data.form == "text")
    if encoder and has_reference:
        return "embedding_cosine", (
            f"the model returns hidden states {tuple(out.shape)} ({why}): an encoder, so its "
            "embeddings (mean pooling over the attention mask) are compared with the "
            "original's: cosine, rank correlation of pairwise similarities, nearest neighbours")
    if encoder:
        raise OptionError(
            f"{where}: the model returns hidden states {tuple(out.shape)} (an encoder; {why}); "
            "embedding metrics compare them with a reference: give --reference MODEL (prune "
            "compares with the original)")
    if data.labels is not None and not encoder:
        return "accuracy", f"{where} has labels"  # accuracy says why the shapes do not fit
    if has_reference:
        return "agreement", f"{where} has no labels: top-1 agreement with the reference"
    raise OptionError(
        f"{where} has no labels y, so accuracy is not possible; give "
        "--metric perplexity for a causal language model, or a reference model (agreement, "
        "relative_error: prunescope evaluate --reference MODEL; prune compares with the original)")


def check_metric(metric: str | None, flag: str = "--metric") -> str | None:
    if metric is not None and metric not in METRICS:
        raise OptionError(f"{flag} {metric!r} is not allowed; allowed: {', '.join(METRICS)}")
    return metric


def _load(data: Any, runner: _Runner, options: DataOptions | None) -> EvalData:
    if isinstance(data, EvalData):
        return data
    return load_eval_data(data, model=runner.captured, options=options)


@exclusive
@device_scope
def evaluate(
    model: Any,
    data: EvalData | str | os.PathLike,
    metric: str | None = None,
    *,
    reference: Any = None,
    example_inputs: tuple | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    trust_pickle: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    seq_len: int | None = None,
    data_options: DataOptions | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Measure `model` on `data` (run on `device`): ``{"metric", "value", "samples", "data",
    "reason"}`` (+ ``"tokens"`` for perplexity, ``"embedding"`` (all three) for the embedding
    metrics).

    `model` and `reference` may be an nn.Module/GraphModule (with `example_inputs` to check
    the data against), an ExportedProgram, a PruneResult, a Captured or Analysis, a path or a
    built-in name. `reference` may also be an array of the reference's first outputs on `data`.
    `data` may be any form ``engine.load_data`` reads (text and images are made into the
    model's inputs; `data_options` say how).
    """
    check_metric(metric)
    if batch_size < 1:
        raise OptionError(f"batch_size {batch_size} must be >= 1")
    if max_samples is not None and max_samples < 1:
        raise OptionError(f"max_samples {max_samples} must be >= 1")
    load_kwargs = {"trust_pickle": trust_pickle, "input_shapes": input_shapes,
                   "seq_len": seq_len}
    runner = _runner(model, example_inputs, load_kwargs)
    data = _load(data, runner, data_options).head(max_samples)
    inputs = _as_tensors(data, runner)
    ref_runner = ref_array = None
    if isinstance(reference, np.ndarray | torch.Tensor):
        ref_array = torch.as_tensor(reference)
        if ref_array.shape[0] < len(data):
            raise OptionError(f"reference outputs hold {ref_array.shape[0]} samples, the data "
                              f"{len(data)}")
    elif reference is not None:
        ref_runner = _runner(reference, example_inputs, load_kwargs)
        ref_runner.name = f"the reference ({ref_runner.name})"
        ref_inputs = _as_tensors(data, ref_runner)
    if metric in NEEDS_REFERENCE and reference is None:
        raise OptionError(f"metric {metric} compares with a reference model; give one "
                          "(prunescope evaluate --reference MODEL), or --metric accuracy / "
                          "perplexity")
    model_class = runner.model_class or (ref_runner.model_class if ref_runner else None)
    mask = data.named("attention_mask")
    acc: _Accumulator | None = None
    reason = "chosen by --metric"
    was_training = _set_eval(runner.module)
    try:
        for start in range(0, len(data), batch_size):
            chunk = [x[start:start + batch_size] for x in inputs]
            out = runner(chunk, data)
            if acc is None:
                if metric is None:
                    metric, reason = choose_metric(data, out, chunk, reference is not None,
                                                   model_class)
                elif metric == "perplexity":
                    causal, why = causal_lm_reason(out, chunk[0], data.vocab_size, model_class)
                    if not causal:
                        raise OptionError(f"perplexity on {data.flag} {data.source} needs a "
                                          f"causal language model: {why}; use --metric "
                                          f"{', '.join(m for m in METRICS if m != 'perplexity')}")
                acc = _Accumulator(metric, data, runner.name)
            ref = None
            if metric in NEEDS_REFERENCE:
                if ref_array is not None:
                    ref = ref_array[start:start + len(chunk[0])]
                else:
                    ref = ref_runner([x[start:start + batch_size] for x in ref_inputs], data)
            labels = None if data.labels is None else data.labels[start:start + batch_size]
            part = None if mask is None else mask[start:start + batch_size]
            acc.add(out.float() if metric != "perplexity" else out, chunk, labels, ref, part)
    finally:
        _restore_training(runner.module, was_training)
    result: dict[str, Any] = {"metric": metric, "value": acc.value(), "samples": len(data),
                              "data": data.source, "reason": reason}
    if metric == "perplexity":
        result["tokens"] = acc.count
    if metric in EMBEDDING_METRICS:
        result["embedding"] = acc.embedding()
    return result


@device_scope
@torch.no_grad()
def predict(model: Any, data: EvalData | str | os.PathLike, *, example_inputs: tuple | None = None,
            max_samples: int | None = None, batch_size: int = 256,
            device: str | torch.device | None = None) -> np.ndarray:
    """The model's first output on every sample of `data`, as one array (float32), e.g. to
    pass as `reference` to several `evaluate` calls without running the reference again."""
    runner = _runner(model, example_inputs, {})
    data = _load(data, runner, None).head(max_samples)
    inputs = _as_tensors(data, runner)
    was_training = _set_eval(runner.module)
    try:
        outs = [runner([x[start:start + batch_size] for x in inputs], data).float()
                for start in range(0, len(data), batch_size)]
    finally:
        _restore_training(runner.module, was_training)
    return torch.cat(outs).numpy()


def check_data(model: Any, data: EvalData, example_inputs: tuple | None = None) -> None:
    """Raise the one-line OptionError `evaluate` would raise for inputs that do not fit the
    model (count, shape, dtype), without running it: checked before a long pruning run."""
    _as_tensors(data, _runner(model, example_inputs, {}))


def _set_eval(module: Any) -> bool | None:
    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.fx.GraphModule):
        was = module.training
        module.eval()
        return was
    return None


def _restore_training(module: Any, was_training: bool | None) -> None:
    if was_training:
        module.train()


def quality_report(original: Any, pruned: Any, data: EvalData | str, metric: str | None = None,
                   recovered: Any = None, **kwargs: Any) -> dict[str, Any]:
    """``report["quality"]``: the metric of the original and the pruned model (and of the
    recovered one, when recovery ran) on the same held-out data; references are the original.
    ``metric_reason`` says why the metric fits the model; with the embedding metrics,
    ``embedding`` holds all three for the pruned (and recovered) model."""
    if not isinstance(data, EvalData):
        data = load_eval_data(data, model=as_model_inputs(_captured_of(original)))
    before = evaluate(original, data, metric, reference=original, **kwargs)
    metric = before["metric"]
    after = evaluate(pruned, data, metric, reference=original, **kwargs)
    report = {"metric": metric, "metric_reason": before["reason"], "original": before["value"],
              "pruned": after["value"], "samples": before["samples"], "data": data.source}
    if "embedding" in after:
        report["embedding"] = {"pruned": after["embedding"]}
    if recovered is not None:
        again = evaluate(recovered, data, metric, reference=original, **kwargs)
        report["recovered"] = again["value"]
        if "embedding" in again:
            report["embedding"]["recovered"] = again["embedding"]
    return report


def _captured_of(model: Any) -> Any:
    """The captured model inside `model` where there is one (for reading text or images)."""
    if isinstance(model, Captured) or hasattr(model, "captured") or hasattr(model, "analysis"):
        return model
    if isinstance(model, str | os.PathLike):
        return load_model(model)
    return None


def format_value(metric: str, value: float) -> str:
    fixed = ("accuracy", "agreement", "perplexity", *EMBEDDING_METRICS)
    return f"{value:.4f}" if metric in fixed else f"{value:.4g}"


def quality_line(quality: dict[str, Any]) -> str:
    """One line for the CLI: ``quality: accuracy original 0.9933, pruned 0.2533 (...)``."""
    metric = quality["metric"]
    parts = [f"{key} {format_value(metric, quality[key])}"
             for key in ("original", "pruned", "recovered") if key in quality]
    line = f"quality: {metric} {', '.join(parts)} ({quality['samples']} samples of " \
           f"{quality['data']})"
    for key, values in quality.get("embedding", {}).items():
        line += f"\nquality: {key}: " + ", ".join(f"{name} {value:.4f}"
                                                  for name, value in values.items())
    return line
