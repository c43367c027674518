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
from engine.scoring.analysis import Analysis, analyze, plan
from engine.scoring.planning import GroupPlan, Plan

__all__ = [
    "Analysis",
    "Captured",
    "ExportError",
    "FrozenInfo",
    "GroupInfo",
    "GroupPlan",
    "ModelLoadError",
    "OptionError",
    "Plan",
    "PruneResult",
    "PruneScopeError",
    "PruningOptions",
    "Scores",
    "analyze",
    "apply",
    "load_calibration",
    "load_model",
    "masked",
    "plan",
    "prune",
    "save",
    "score",
]
