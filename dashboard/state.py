"""Session-state caches: one loaded model and its Analysis per model id.

The Analysis object is the expensive part (capture + group discovery); raw scores are
cached inside it by the engine per (criterion, seed, calibration). Keeping the same
Analysis object across reruns is what makes a norm, policy or ratio change a cheap redraw.
Functions take any MutableMapping so they work on ``st.session_state`` and in plain tests.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from dashboard import sources
from dashboard.sources import SessionFiles

MODELS_KEY = "_ps_models"
FILES_KEY = "_ps_files"
ACTIVE_KEY = "_ps_active_model"
MAX_MODELS = 2  # the demo plus the user's current model


@dataclass
class LoadedModel:
    key: str
    label: str
    captured: Any  # engine.Captured
    analysis: Any  # engine Analysis (raw scores cached inside)
    cache: dict[str, Any] = field(default_factory=dict)  # per-model derived artefacts


def session_files(state: MutableMapping, session_id: str | None = None) -> SessionFiles:
    """This session's private temporary folder (created on first use)."""
    files = state.get(FILES_KEY)
    if files is None or not files.alive:
        files = SessionFiles()
        state[FILES_KEY] = files
        if session_id is not None:
            sources.register(session_id, files)
    return files


def get_model(state: MutableMapping, key: str, label: str,
              load: Callable[[], tuple[Any, Any]]) -> LoadedModel:
    """The cached model for ``key``; ``load()`` -> (captured, analysis) runs only on a miss."""
    models: dict[str, LoadedModel] = state.setdefault(MODELS_KEY, {})
    model = models.get(key)
    if model is None:
        captured, analysis = load()
        model = LoadedModel(key=key, label=label, captured=captured, analysis=analysis)
        models[key] = model
        # Drop the oldest non-demo models so a session holds at most MAX_MODELS analyses.
        for old in [k for k in models if k != key and not k.startswith("demo:")]:
            if len(models) <= MAX_MODELS:
                break
            del models[old]
    return model


def active_model(state: MutableMapping) -> LoadedModel | None:
    key = state.get(ACTIVE_KEY)
    return state.get(MODELS_KEY, {}).get(key) if key else None


def set_active(state: MutableMapping, model: LoadedModel) -> None:
    state[ACTIVE_KEY] = model.key
