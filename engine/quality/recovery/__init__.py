"""Recovery: get back the accuracy pruning took, from a little calibration data.

`recover(result, calibration, methods)` returns a new PruneResult whose module has the same
shapes as the pruned one, with refitted weights. Data-light methods (`bias`, `lsq`, `bn`,
`norm`) need one pass over the calibration data each and no gradients; `distill` trains
against the original model for a time budget or a fixed number of steps. Quality is measured
on calibration samples held back from every method, never on evaluation data.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.demo import is_builtin
from engine.device import CPU, device_scope, on_device, to_device
from engine.errors import OptionError, PruneScopeError
from engine.graph.capture import copy_module, load_model
from engine.graph.outputs import tensor_leaves
from engine.io.data import as_data
from engine.io.hf_export import parameter_places
from engine.options import RECOVERY_AUTO, RECOVERY_DATA_LIGHT, RECOVERY_METHODS
from engine.pipeline import PruneResult
from engine.quality.evaluate import check_metric
from engine.quality.metrics import flops_samples, model_metrics
from engine.quality.recovery import bias, bn, data, distill, lsq, norm
from engine.quality.recovery.lockstep import Context, Layout
from engine.threads import exclusive
from engine.transform.apply import pruned_roots

# Data-light methods share one pass over the calibration data, node by node in network order,
# so each correction sees the corrections upstream of it; at one layer a bias shift comes
# before a least-squares refit (which refits the bias too).
DATA_LIGHT = RECOVERY_DATA_LIGHT
METHODS = RECOVERY_METHODS
ALLOWED = (*METHODS, RECOVERY_AUTO)
MAX_SAMPLES = 2048  # samples one data-light pass runs on at once
RecoverProgress = Callable[[str, float], None]

# data-light method -> its correction (engine.options.RECOVERY_TABLE names them; distill
# trains and runs after them)
CORRECTIONS = {"bias": bias.correct, "lsq": lsq.correct, "bn": bn.correct,
                "norm": norm.correct}
_NOTHING = {
    "bias": "no layer lost input channels",
    "lsq": "no linear or convolution layer's output changed",
    "bn": "no BatchNorm input changed",
    "norm": "no LayerNorm/RMSNorm/GroupNorm lost normalised channels",
}


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """A comma list or sequence of method names, checked; `auto` stays as given."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [str(m).strip() for m in names if str(m).strip()]
    if not names:
        raise OptionError(f"no recovery method given; allowed: {', '.join(ALLOWED)}")
    for name in names:
        if name not in ALLOWED:
            raise OptionError(f"unknown recovery method {name!r}; allowed: {', '.join(ALLOWED)}"
                              " (comma-separated)")
    return list(dict.fromkeys(names))


def check_budget(budget_s: Any, flag: str = "budget_s") -> float | None:
    if budget_s is None:
        return None
    if isinstance(budget_s, str):
        try:
            budget_s = float(budget_s)
        except ValueError:
            budget_s = math.nan
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or \
            not math.isfinite(budget_s) or budget_s < 0:
        raise OptionError(f"{flag} {budget_s!r} is not allowed; allowed: a positive number "
                          "of seconds")
    return float(budget_s)


def check_steps(steps: Any, flag: str = "steps") -> int | None:
    if steps is None:
        return None
    if isinstance(steps, str):
        try:
            steps = int(steps)
        except ValueError:
            steps = -1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OptionError(f"{flag} {steps!r} is not allowed; allowed: a positive integer")
    return steps


@exclusive
@device_scope
def recover(result, calibration: Any, methods: str | Sequence[str] = "auto", *,
            budget_s: float | None = 30, steps: int | None = None, seed: int = 0,
            progress: RecoverProgress | None = None, eval_holdout: float = 0.1,
            metric: str | None = None, stop: Callable[[], bool] | None = None,
            device: str | torch.device | None = None):
    """Recover a pruned model's quality; returns a new PruneResult (the input is untouched).

    `device`: where the original and the pruned model run (both passes and distillation);
    the result comes back on the CPU, like the input.

    `methods`: "auto" or names from bias, lsq, bn, norm, distill (comma string or list).
    `budget_s` bounds the distillation's training time in seconds; `steps` fixes the number
    of distillation steps instead (reproducible with `seed`; the budget is then ignored).
    `eval_holdout`: the fraction of calibration samples held back to measure the result and
    to pick the best distillation state. `metric`: the held-back measure (default: the one
    evaluation chooses for this model and data, see engine.quality.evaluate.choose_metric);
    a method is kept only if it improves it. `stop()`, asked between methods and between
    distillation steps, ends the recovery early with what is done so far (the report's
    `recovery.stopped` is then true and the methods not run are listed under `skipped`).
    """
    result.analysis.check_not_released()  # recovery fits to the original's outputs
    start = time.monotonic()
    names = parse_methods(methods)
    budget_s = check_budget(budget_s)
    steps = check_steps(steps)
    if not 0 <= eval_holdout < 1:
        raise OptionError(f"eval_holdout {eval_holdout!r} is not allowed; allowed: 0 <= f < 1")
    say = progress or (lambda _msg, _fraction: None)
    stopped = stop or (lambda: False)
    analysis = result.analysis
    calibration = as_data(calibration, model=analysis.captured)
    xs, y, where = list(calibration.inputs), calibration.labels, calibration.where
    examples = analysis.captured.example_inputs
    shapes = data.expected_shapes(analysis.captured.program)
    input_names = getattr(analysis.captured.hf, "input_names", ())
    xs, filled = data.with_attention_mask(xs, input_names if len(shapes) == 2 else ())
    full = data.check(xs, y, shapes, examples, where, ["x", *filled] if filled else None,
                      input_names)
    full = dataclasses.replace(full, xs=to_device(full.xs), y=to_device(full.y))
    fit, holdout = _split(full, eval_holdout, seed)
    batch = full.batch
    if batch is not None and len(fit) < batch:
        raise OptionError(f"{where} holds {len(full)} sample(s), {len(holdout)} of them held "
                          f"back to measure the result; the model runs a fixed batch of "
                          f"{batch}: give at least {batch + len(holdout)} samples, or a "
                          "smaller eval_holdout")

    wanted = list(DATA_LIGHT) if "auto" in names else [m for m in DATA_LIGHT if m in names]
    distilling = "distill" in names or ("auto" in names and (steps or (budget_s or 0) > 0))
    module = on_device(copy_module(result.module))
    original_here = _original(analysis)
    original = on_device(original_here)
    teacher_hold = data.outputs(original, holdout) if len(holdout) else None
    model_class = getattr(analysis.captured.hf, "model_class", None)
    probe = holdout if len(holdout) else full.take(torch.arange(min(len(full), 8)))
    metric_name, why = data.fitting_metric(
        (teacher_hold or data.outputs(original, probe))[0], calibration, probe, model_class)
    if metric is not None and check_metric(metric, "metric") != metric_name:
        metric_name, why = metric, "chosen by the caller"

    def measure(candidate) -> float | None:
        if not len(holdout):
            return None
        return round(data.metric_value(metric_name, data.outputs(candidate, holdout),
                                       teacher_hold, holdout), 6)

    before = current = measure(module)
    applied: list[str] = []
    skipped: dict[str, str] = {}
    changed: dict[str, list[str]] = {}
    verdicts: dict[str, dict[str, Any]] = {}
    if wanted:
        structure = analysis.structure(result.plan.options.prunes_whole_blocks)
        layout = Layout(structure, pruned_roots(structure, result.plan))
        # hf/ is written: keep the folder loadable (no parameter its config cannot describe)
        may_add = parameter_places(analysis.captured.hf) if analysis.captured.hf is not None \
            else None
        layer_skips: dict[str, str] = {}
        light = fit.take(torch.arange(_light_samples(len(fit), batch)))
        chunks = None if batch is None else [tuple(chunk) for chunk in light.chunks()]
        for k, name in enumerate(wanted):
            if stopped():
                skipped[name] = "stopped before it started"
                continue
            reason = _nothing_to_do(name, module, layout)
            if reason is not None:
                skipped[name] = reason
                continue
            say(f"recovery: {name}", 0.6 * k / len(wanted) if distilling else k / len(wanted))
            trial = copy_module(module)
            ctx = Context(original, trial, layout, light.token_mask, may_add=may_add)
            layers = _light_pass(ctx, name, light, chunks)
            layer_skips.update(ctx.skipped)
            if not layers:
                skipped[name] = _NOTHING[name]
                continue
            after = measure(trial)
            kept = after is None or data.better(metric_name, after, current)
            verdicts[name] = _verdict(metric_name, current, after, kept)
            if kept:
                module, current = trial, after
                applied.append(name)
                changed[name] = layers
    details: dict[str, Any] = {}
    nothing_pruned = all(len(gp.pruned) == 0 for gp in result.plan.groups)
    if distilling and stopped():
        skipped["distill"] = "stopped before it started"
    elif distilling and nothing_pruned:
        skipped["distill"] = "nothing was pruned: the model is the original"
    elif distilling:
        if steps is None and not budget_s:
            skipped["distill"] = "no time budget (give --recover-budget or --recover-steps)"
        else:
            base = 0.6 if wanted else 0.0
            trial = copy_module(module)
            details = distill.run(
                trial, fit, data.outputs(original, fit), holdout if len(holdout) else None,
                teacher_hold, seconds=budget_s, steps=steps, seed=seed,
                progress=lambda msg, f: say(msg, base + (1 - base) * f), stop=stopped,
                hidden_states=metric_name == "embedding_cosine",
            )
            trial.recompile()
            after = measure(trial)
            kept = after is None or data.better(metric_name, after, current)
            verdicts["distill"] = _verdict(metric_name, current, after, kept)
            if kept:
                module, current = trial, after
                applied.append("distill")
    module.recompile()
    module = on_device(module, CPU)
    _check_shapes(module, original_here, examples, analysis.captured.example_kwargs)
    say("recovery: done", 1.0)
    report = copy.deepcopy(result.report)
    report["after"] = model_metrics(module, flops_samples(analysis.captured),
                                    report["before"].get("flops_uncounted", ()))
    report["recovery"] = {
        "methods": applied,
        "skipped": skipped,
        "layers": changed,
        **({"skipped_layers": layer_skips} if wanted and layer_skips else {}),
        "seconds": round(time.monotonic() - start, 3),
        "stopped": bool(stop is not None and stopped()),
        "metric": metric_name if len(holdout) else None,
        "metric_why": why if len(holdout) else None,
        "metric_before": before,
        "metric_after": current,
        "per_method": verdicts,
        "output_shapes_match": True,  # checked above; a mismatch is an error
        "holdout_samples": len(holdout),
        "calibration_samples": len(fit),
        **({"distill": details} if details else {}),
        **({"filled_inputs": filled} if filled else {}),
        **({"chunking": _chunking(batch, len(fit), len(holdout), bool(wanted), details)}
           if batch is not None else {}),
    }
    return PruneResult(module, report, result.plan, analysis, result.example_inputs)


def _light_pass(ctx: Context, name: str, light: data.CalibrationSet,
                chunks: list[tuple] | None) -> list[str]:
    """One data-light method over the calibration set, node by node in network order (each
    correction sees the ones upstream of it); the layers it changed."""
    changed: list[str] = []
    method = CORRECTIONS[name]

    def correct(node, step) -> None:
        layer = method(ctx, node, step)
        if layer is not None:
            changed.append(layer)

    if chunks is None:
        ctx.run(tuple(light.xs), correct)
    else:  # the graph runs `batch` samples at a time; the method sees them all joined
        ctx.run_chunks(chunks, correct)
    return changed


def _nothing_to_do(name: str, module: torch.fx.GraphModule, layout: Layout) -> str | None:
    """Why method `name` cannot change this pruned model (None: it may), decided from the
    graph alone, so a method with nothing to do costs no pass over the data."""
    nodes = [n for n in module.graph.nodes if n.op == "call_function"]
    if name == "bn" and not any(n.target in bn.BATCH_NORMS for n in nodes):
        return _NOTHING["bn"]
    if name == "norm" and not any(n.target == torch.ops.aten.rsqrt.default for n in nodes):
        # no written-out RMSNorm: a norm layer must have lost some of its input channels
        if not any(not keep.all() for n in nodes
                   if n.target in norm.NORMS and isinstance(n.args[0], torch.fx.Node)
                   for keep in layout.kept(n.args[0].name).values()):
            return _NOTHING["norm"]
    return None


def _verdict(metric: str, before: float | None, after: float | None, kept: bool) -> dict:
    """A method's entry in report["recovery"]["per_method"]."""
    if after is None:
        return {"before": None, "after": None, "kept": True,
                "why": "no held-back samples to measure it on: kept untested"}
    direction = "higher" if data.HIGHER_IS_BETTER[metric] else "lower"
    why = (f"{metric} {before:.6g} -> {after:.6g} on the held-back split ({direction} is "
           f"better): " + ("it helps, kept" if kept else "it does not help, dropped"))
    return {"before": before, "after": after, "kept": kept, "why": why}


def _light_samples(n_fit: int, batch: int | None) -> int:
    """Samples of the data-light pass: at most MAX_SAMPLES, a whole number of batches."""
    n = min(n_fit, MAX_SAMPLES)
    return n if batch is None else max(batch, n - n % batch)


def _chunking(batch: int, n_fit: int, n_hold: int, light: bool, details: dict) -> dict:
    """How a model with a fixed batch size was fed: the report says what was left out."""
    n_light = _light_samples(n_fit, batch)
    out: dict[str, Any] = {
        "captured_batch": batch,
        "note": f"the model was captured with a fixed batch of {batch}: every pass runs "
                f"{batch} sample(s) at a time",
    }
    if light:
        out["layer_pass"] = {"samples": n_light, "chunks": n_light // batch,
                             "left_out": n_fit - n_light}
        if n_fit - n_light:
            out["note"] += f"; the layer-wise pass used {n_light} of {n_fit} samples"
    if details:
        out["distill"] = {"minibatch": details["minibatch"],
                          "per_epoch_left_out": n_fit % details["minibatch"]}
        if n_fit % details["minibatch"]:
            out["note"] += (f"; distillation minibatches of {details['minibatch']} leave "
                            f"{n_fit % details['minibatch']} sample(s) out of each epoch")
    if n_hold:
        out["holdout"] = {"chunks": -(-n_hold // batch),
                          "padded": (-n_hold) % batch}  # copies whose outputs are dropped
    return out


def _original(analysis) -> torch.fx.GraphModule:
    """The original model with its weights. A prune of a model file gives the analysed
    weights up (engine.prune releases them to save memory); a .pt2 or built-in model is then
    loaded again, the same program with the same node names."""
    if not getattr(analysis, "released", False):
        return analysis.gm
    source = analysis.captured.source
    if not (is_builtin(source) or (Path(source).suffix == ".pt2" and Path(source).is_file())):
        raise OptionError(
            f"recovery needs the original weights, which pruning {source} gave up to save "
            "memory; load the model first (engine.load_model(...)) and prune that")
    return load_model(source).program.module()


def _split(full: data.CalibrationSet, fraction: float, seed: int):
    n = len(full)
    n_hold = int(round(n * fraction)) if n >= 10 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return full.take(order[n_hold:].sort().values), full.take(order[:n_hold].sort().values)


def _check_shapes(module, original, inputs: tuple, kwargs: dict | None) -> None:
    with torch.no_grad():
        got = tensor_leaves(module(*inputs, **(kwargs or {})))
        want = tensor_leaves(original(*inputs, **(kwargs or {})))
    if [t.shape for t in got] != [t.shape for t in want]:
        raise PruneScopeError("recovery changed the model's output shapes (an engine bug)")


__all__ = ["ALLOWED", "METHODS", "check_budget", "check_steps", "parse_methods", "recover"]
