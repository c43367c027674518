"""TEMPORARY stand-in for engine/quality/evaluate.py (issue 8, branch `eval`); deleted once
that lands on main. Same signatures, accuracy and agreement only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import OptionError


@dataclass
class EvalData:
    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None
    source: str


def load_eval_data(path_or_name: str, *, flag: str = "--eval-data") -> EvalData:
    if str(path_or_name) == "demo":
        from engine.demo import DEMO_EVAL_PATH

        path_or_name = str(DEMO_EVAL_PATH)
    try:
        with np.load(path_or_name, allow_pickle=False) as data:
            return EvalData((data["x"],), data["y"] if "y" in data else None, str(path_or_name))
    except OSError as exc:
        raise OptionError(f"{flag} file {path_or_name} cannot be read: {exc}") from None


@torch.no_grad()
def _outputs(model, data: EvalData, batch_size: int) -> np.ndarray:
    x = torch.as_tensor(data.inputs[0])
    outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    outs = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
    return torch.cat(outs).float().numpy()


def evaluate(model, data: EvalData, metric=None, *, reference=None, example_inputs=None,
             max_samples=None, batch_size=256) -> dict:
    metric = metric or ("accuracy" if data.labels is not None else "agreement")
    out = _outputs(model, data, batch_size)
    if metric == "accuracy":
        value = float(np.mean(out.argmax(1) == data.labels))
    else:
        ref = _outputs(reference, data, batch_size)
        value = float(np.mean(out.argmax(1) == ref.argmax(1)))
    return {"metric": metric, "value": value, "samples": int(len(out))}
