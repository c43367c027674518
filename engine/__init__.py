"""PruneScope engine: dependency-aware structured pruning of exportable PyTorch models.

Streamlit-free. Typical use::

    import engine
    result = engine.prune(model, (x,), engine.PruningOptions(layer_norm="tss_norm"), ratio=0.5)
    engine.save(result, "out/")
"""

from engine.errors import ExportError, ModelLoadError, OptionError, PruneScopeError
from engine.graph.capture import Captured, load_calibration, load_model
from engine.graph.dependency import FrozenInfo, GroupInfo
from engine.options import PruningOptions
from engine.pipeline import PruneResult, Scores, apply, masked, prune, save, score
from engine.quality.evaluate import (
    METRICS,
    EvalData,
    evaluate,
    load_calibration_data,
    load_eval_data,
    quality_report,
)
from engine.scoring.analysis import Analysis, analyze, plan
from engine.scoring.planning import GroupPlan, Plan

__all__ = [
    "Analysis",
    "Captured",
    "EvalData",
    "ExportError",
    "FrozenInfo",
    "GroupInfo",
    "GroupPlan",
    "METRICS",
    "ModelLoadError",
    "OptionError",
    "Plan",
    "PruneResult",
    "PruneScopeError",
    "PruningOptions",
    "Scores",
    "analyze",
    "apply",
    "evaluate",
    "load_calibration",
    "load_calibration_data",
    "load_eval_data",
    "load_model",
    "masked",
    "plan",
    "prune",
    "quality_report",
    "save",
    "score",
]
