"""PruneScope engine: dependency-aware structured pruning of exportable PyTorch models.

Streamlit-free. Typical use::

    import engine
    result = engine.prune(model, (x,), engine.PruningOptions(layer_norm="tss_norm"), ratio=0.5)
    engine.save(result, "out/")

The public names are imported on first use (module __getattr__), so `import engine` and
`prunescope --help` do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.errors import ExportError, ModelLoadError, OnnxExportError, OptionError, PruneScopeError

if TYPE_CHECKING:  # for type checkers and editors; at run time these load lazily
    from engine.device import available_devices, resolve_device
    from engine.graph.capture import Captured, load_model
    from engine.graph.dependency import FrozenInfo, GroupInfo
    from engine.io.data import DataOptions, ModelInputs, load_calibration, load_data, model_inputs
    from engine.options import PruningOptions
    from engine.pipeline import PruneResult, Scores, apply, masked, prune, save, save_onnx, score
    from engine.quality.embedding import embedding_metrics, mean_pool
    from engine.quality.evaluate import (
        METRICS,
        EvalData,
        choose_metric,
        evaluate,
        load_calibration_data,
        load_eval_data,
        quality_report,
    )
    from engine.quality.recovery import recover
    from engine.quality.sensitivity import sensitivity
    from engine.quality.sweep import sweep
    from engine.quality.targets import ratios_for_target
    from engine.scoring.analysis import Analysis, analyze, plan
    from engine.scoring.planning import GroupPlan, Plan

_LAZY = {
    "Captured": "engine.graph.capture",
    "available_devices": "engine.device",
    "resolve_device": "engine.device",
    "load_calibration": "engine.io.data",
    "load_data": "engine.io.data",
    "DataOptions": "engine.io.data",
    "ModelInputs": "engine.io.data",
    "model_inputs": "engine.io.data",
    "choose_metric": "engine.quality.evaluate",
    "embedding_metrics": "engine.quality.embedding",
    "mean_pool": "engine.quality.embedding",
    "load_model": "engine.graph.capture",
    "FrozenInfo": "engine.graph.dependency",
    "GroupInfo": "engine.graph.dependency",
    "PruningOptions": "engine.options",
    "PruneResult": "engine.pipeline",
    "Scores": "engine.pipeline",
    "apply": "engine.pipeline",
    "masked": "engine.pipeline",
    "prune": "engine.pipeline",
    "save": "engine.pipeline",
    "save_onnx": "engine.pipeline",
    "score": "engine.pipeline",
    "METRICS": "engine.quality.evaluate",
    "EvalData": "engine.quality.evaluate",
    "evaluate": "engine.quality.evaluate",
    "load_calibration_data": "engine.quality.evaluate",
    "load_eval_data": "engine.quality.evaluate",
    "quality_report": "engine.quality.evaluate",
    "recover": "engine.quality.recovery",
    "Analysis": "engine.scoring.analysis",
    "analyze": "engine.scoring.analysis",
    "plan": "engine.scoring.analysis",
    "GroupPlan": "engine.scoring.planning",
    "Plan": "engine.scoring.planning",
    "sweep": "engine.quality.sweep",
    "sensitivity": "engine.quality.sensitivity",
    "ratios_for_target": "engine.quality.targets",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    try:  # `engine.pipeline` and friends after a bare `import engine`
        return importlib.import_module(f"engine.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"engine.{name}":
            raise
        raise AttributeError(f"module 'engine' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Analysis",
    "Captured",
    "DataOptions",
    "EvalData",
    "ExportError",
    "FrozenInfo",
    "GroupInfo",
    "GroupPlan",
    "METRICS",
    "ModelInputs",
    "ModelLoadError",
    "OnnxExportError",
    "OptionError",
    "Plan",
    "PruneResult",
    "PruneScopeError",
    "PruningOptions",
    "Scores",
    "analyze",
    "apply",
    "available_devices",
    "choose_metric",
    "embedding_metrics",
    "evaluate",
    "load_calibration",
    "load_calibration_data",
    "load_data",
    "load_eval_data",
    "load_model",
    "masked",
    "mean_pool",
    "model_inputs",
    "plan",
    "prune",
    "quality_report",
    "ratios_for_target",
    "recover",
    "resolve_device",
    "save",
    "save_onnx",
    "score",
    "sensitivity",
    "sweep",
]
