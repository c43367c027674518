"""What every tab is drawn from: one `PageState` per script run, built by app.py from the
sidebar (model, data, options) before any tab runs. A tab's ``render(page)`` reads it and
never re-reads the sidebar's widgets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dashboard.state import LoadedModel
from engine.io.data import DataSet
from engine.options import PruningOptions


@dataclass(frozen=True)
class PageState:
    model: LoadedModel  # the model in view: captured program, analysis, per-session cache
    options: PruningOptions  # the sidebar's pruning options
    ratio: float  # the sidebar's global pruning ratio
    eval_data: DataSet | None  # held-out data the page measures on (None: none given)
    calibration: Any  # what calibration criteria score on (a built-in name or the upload)
    plan_args: dict[str, Any] = field(default_factory=dict)  # make_plan's keyword arguments
    structures: dict[str, Any] = field(default_factory=dict)  # whole blocks / experts to remove
    signature: str = ""  # JSON of everything a Prune result depends on (stale-result check)
    plan: Any | None = None  # engine Plan of these options; None when they cannot plan
