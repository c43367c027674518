"""The built-in demo model: a digit classifier trained by assets/train_demo.py.

The assets live in the repository's assets/ folder next to engine/ (the package is installed
editable), so they are found relative to this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from engine.errors import ModelLoadError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEMO_PATH = ASSETS_DIR / "demo.pt2"
DEMO_EVAL_PATH = ASSETS_DIR / "demo_eval.npz"
DEMO_META_PATH = ASSETS_DIR / "demo_meta.json"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"demo asset {path} is missing; run `make demo` to recreate it")
    return path


def load_demo_program() -> torch.export.ExportedProgram:
    """The demo model as saved by torch.export.save (batch dimension dynamic, 1..4096)."""
    return torch.export.load(os.fspath(_require(DEMO_PATH)))


def load_demo_eval() -> tuple[np.ndarray, np.ndarray]:
    """The held-out evaluation set: x float32 (N, 1, 8, 8), normalised as the model expects,
    and y int64 (N,) class labels."""
    with np.load(_require(DEMO_EVAL_PATH)) as data:
        return data["x"], data["y"]


def demo_example_inputs(batch: int = 8) -> tuple[torch.Tensor]:
    """A small batch of real evaluation digits, for capturing or checking the model."""
    x, _ = load_demo_eval()
    return (torch.from_numpy(x[:batch]).clone(),)
