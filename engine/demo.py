"""The built-in demo models: a digit classifier (`demo`, assets/train_demo.py) and a small
byte-level Llama language model (`demo-lm`, assets/train_demo_lm.py), each with its own
calibration set (the training split) and evaluation set (held out).

The assets live in the repository's assets/ folder next to engine/ (the package is installed
editable), so they are found relative to this file.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import ModelLoadError
from engine.threads import TORCH_EXPORT_LOCK

if TYPE_CHECKING:
    import torch

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEMO_PATH = ASSETS_DIR / "demo.pt2"
DEMO_EVAL_PATH = ASSETS_DIR / "demo_eval.npz"
DEMO_META_PATH = ASSETS_DIR / "demo_meta.json"
DEMO_CALIB_PATH = ASSETS_DIR / "demo_calib.npz"
DEMO_LM_PATH = ASSETS_DIR / "demo_lm.pt2"
DEMO_LM_CALIB_PATH = ASSETS_DIR / "demo_lm_calib.npz"
DEMO_LM_EVAL_PATH = ASSETS_DIR / "demo_lm_eval.npz"
DEMO_LM_META_PATH = ASSETS_DIR / "demo_lm_meta.json"
DEMO_LM_HF_DIR = ASSETS_DIR / "demo_lm"

# name -> (model, calibration set, evaluation set, `make` target that recreates them)
BUILTINS: dict[str, tuple[Path, Path, Path, str]] = {
    "demo": (DEMO_PATH, DEMO_CALIB_PATH, DEMO_EVAL_PATH, "demo"),
    "demo-lm": (DEMO_LM_PATH, DEMO_LM_CALIB_PATH, DEMO_LM_EVAL_PATH, "demo-lm"),
}
BUILTIN_NAMES = tuple(BUILTINS)


def _require(path: Path, target: str = "demo") -> Path:
    if not path.is_file():
        raise ModelLoadError(f"demo asset {path} is missing; run `make {target}` to recreate it")
    return path


def is_builtin(name: object) -> bool:
    return isinstance(name, str) and name in BUILTINS


def builtin_data_path(name: str, kind: str) -> Path:
    """The calibration (`kind="calibration"`) or evaluation (`"eval"`) set of a built-in model."""
    model, calib, evaluation, target = BUILTINS[name]
    return _require(calib if kind == "calibration" else evaluation, target)


def load_builtin_program(name: str) -> torch.export.ExportedProgram:
    """A built-in model's program, deserialised once per process (about 0.7 s for demo-lm,
    paid by every dashboard session, sweep point and CLI call that names it); each caller
    gets its own copy of the weights and graph, so one caller changing its program never
    reaches another."""
    model, _, _, target = BUILTINS[name]
    # copying builds graph nodes, which read torch.fx's global node meta that an export in
    # another thread writes: the copy holds the lock too
    with TORCH_EXPORT_LOCK:
        return _program_copy(_loaded_program(_require(model, target)))


def builtin_example_inputs(name: str, batch: int = 8) -> tuple[torch.Tensor]:
    """A few real samples of the model's evaluation set, for capturing or checking it."""
    import torch

    with np.load(builtin_data_path(name, "eval"), allow_pickle=False) as data:
        return (torch.from_numpy(data["x"][:batch]).clone(),)


def load_demo_program() -> torch.export.ExportedProgram:
    """The demo model as saved by torch.export.save (batch dimension dynamic, 1..4096)."""
    return load_builtin_program("demo")


# path -> (its size and modification time when loaded, the program): a rebuilt asset
# (`make demo`) is read again
_LOADED: dict[Path, tuple[tuple[int, int], torch.export.ExportedProgram]] = {}


def _loaded_program(path: Path) -> torch.export.ExportedProgram:
    import torch  # here: engine.io.data reads the built-in data sets without torch

    stat = path.stat()
    stamp = (stat.st_size, stat.st_mtime_ns)
    with TORCH_EXPORT_LOCK:
        held = _LOADED.get(path)
        if held is None or held[0] != stamp:
            held = _LOADED[path] = (stamp, torch.export.load(os.fspath(path)))
        return held[1]


def _program_copy(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A program with its own graph, weights and constants; the read-only metadata (input
    ranges, call graph, example inputs) is shared. ``copy.deepcopy`` of a whole program
    trips a deprecation inside torch's pytree specs, hence the parts."""
    import torch

    graph_module = copy.deepcopy(program.graph_module)
    state = {key: torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
             if isinstance(value, torch.nn.Parameter) else value.clone()
             for key, value in program.state_dict.items()}
    constants = {key: value.clone() if isinstance(value, torch.Tensor) else value
                 for key, value in program.constants.items()}
    return torch.export.ExportedProgram(
        root=graph_module, graph=graph_module.graph,
        graph_signature=copy.deepcopy(program.graph_signature), state_dict=state,
        range_constraints=dict(program.range_constraints),
        module_call_graph=list(program.module_call_graph),
        example_inputs=program.example_inputs, constants=constants,
        verifiers=program.verifiers,
    )


def load_demo_eval() -> tuple[np.ndarray, np.ndarray]:
    """The held-out evaluation set: x float32 (N, 1, 8, 8), normalised as the model expects,
    and y int64 (N,) class labels."""
    with np.load(_require(DEMO_EVAL_PATH)) as data:
        return data["x"], data["y"]


def demo_example_inputs(batch: int = 8) -> tuple[torch.Tensor]:
    """A small batch of real evaluation digits, for capturing or checking the model."""
    import torch

    x, _ = load_demo_eval()
    return (torch.from_numpy(x[:batch]).clone(),)
