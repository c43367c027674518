"""Which device runs the model: one resolution function and the helpers every run site uses.

The structural work (capture, analysis, slicing, export) stays on the CPU, where the weights
are loaded; only the forwards (verification, data-aware scoring, evaluation, recovery) run on
the chosen device. The public entry points take ``device=`` and set it for their duration with
``using(device)``; the run sites deep inside read it back with ``current()`` instead of
threading one more argument through every layer, and move what they run with ``module_on`` /
``to_device``. With the default (the CPU) these helpers return their argument unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.fx as fx

from engine.errors import PruneScopeError

DEVICES = ("cpu", "cuda", "cuda:N", "mps", "auto")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU = torch.device("cpu")


class DeviceError(PruneScopeError):
    """A device that does not exist here, or a device name that is not one."""


_CURRENT: ContextVar[torch.device] = ContextVar("prunescope_device", default=CPU)
_AMP: ContextVar[torch.dtype | None] = ContextVar("prunescope_amp", default=None)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """The devices this machine has, CPU first (what the dashboard offers)."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(_cuda_count())]
    return found + (["mps"] if _mps() else [])


def resolve_device(spec: str | torch.device | None = None, flag: str = "--device") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA, else MPS, else the CPU) as a
    torch.device that exists here; anything else is a one-line DeviceError. ``None`` is the
    CPU. A torch.device object is taken as it is (tests use ``meta``)."""
    if spec is None:
        return CPU
    if isinstance(spec, torch.device):
        return spec
    text = str(spec).strip().lower()
    allowed = f"allowed: {', '.join(DEVICES)}; here: {', '.join(available_devices())}"
    if text == "auto":
        if _cuda_count():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps() else CPU
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{flag} {spec!r} is not a device; {allowed}") from None
    if device.type == "cpu":
        return CPU
    if device.type == "cuda":
        count = _cuda_count()
        if not count:
            build = "this torch is a CPU build" if torch.version.cuda is None else \
                "no CUDA GPU is visible"
            raise DeviceError(f"{flag} {spec}: CUDA is not available ({build}, torch "
                              f"{torch.__version__}); {allowed}")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise DeviceError(f"{flag} {spec}: this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1}); {allowed}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps():
            raise DeviceError(f"{flag} {spec}: Apple MPS is not available here; {allowed}")
        return device
    raise DeviceError(f"{flag} {spec!r} is not supported; {allowed}")


def check_amp(amp: str | None, flag: str = "--amp") -> torch.dtype | None:
    """``bf16``, ``fp16`` or None (full precision) as the autocast dtype."""
    if amp is None or amp == "none":
        return None
    if amp not in AMP_DTYPES:
        raise DeviceError(f"{flag} {amp!r} is not allowed; allowed: {', '.join(AMP_DTYPES)}, "
                          "none")
    return AMP_DTYPES[amp]


@contextlib.contextmanager
def using(device: str | torch.device | None = None, amp: str | None = None) -> Iterator[
        torch.device]:
    """Run the enclosed engine calls on ``device`` (resolved here), calibration passes in
    ``amp`` autocast. ``device=None`` keeps the device already in force (nested calls)."""
    resolved = current() if device is None else resolve_device(device)
    dev_token = _CURRENT.set(resolved)
    amp_token = _AMP.set(check_amp(amp) if amp is not None else _AMP.get())
    try:
        yield resolved
    finally:
        _AMP.reset(amp_token)
        _CURRENT.reset(dev_token)


def device_scope(fn: Callable) -> Callable:
    """Makes the keyword arguments ``device`` (and ``amp``) that ``fn`` declares hold for the
    whole call (``using``), so its body and everything it calls run there."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with using(kwargs.get("device"), kwargs.get("amp")):
            return fn(*args, **kwargs)

    return wrapper


def current() -> torch.device:
    """The device the model runs on now (the CPU unless a caller chose another)."""
    return _CURRENT.get()


def calibration_autocast() -> contextlib.AbstractContextManager:
    """Autocast for a calibration pass when ``amp`` was asked for, else nothing."""
    dtype = _AMP.get()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=current().type, dtype=dtype)


def to_device(tree: Any, device: torch.device | None = None) -> Any:
    """Every tensor in a nest of tuples/lists/dicts moved to ``device`` (default: current)."""
    device = current() if device is None else device
    if isinstance(tree, torch.Tensor):
        return tree if tree.device == device else tree.to(device)
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(to_device(t, device) for t in tree)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and plain tensor attributes (lifted constants of a graph)."""
    found: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for value in (*sub._parameters.values(), *sub._buffers.values(), *vars(sub).values()):
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), value)
    return list(found.values())


def on_device(module: Any, device: torch.device | None = None) -> Any:
    """``module`` itself when all its tensors are on ``device`` (default: current), else a copy
    there: parameters, buffers and tensor constants moved (each copied once, never a second
    host copy), and in an fx graph every device argument (``arange``, ``zeros``,
    ``to`` recorded at capture) pointed at ``device``. Not a module: unchanged."""
    device = current() if device is None else device
    if not isinstance(module, torch.nn.Module):
        return module
    tensors = _tensors(module)
    if all(t.device == device for t in tensors) and not _graph_devices(module, device):
        return module
    memo: dict[int, Any] = {}
    for t in tensors:
        moved = t.detach().to(device)
        if isinstance(t, torch.nn.Parameter):
            moved = torch.nn.Parameter(moved, requires_grad=t.requires_grad)
        memo[id(t)] = moved
    copied = copy.deepcopy(module, memo)
    for sub in copied.modules():
        if isinstance(sub, fx.GraphModule) and _graph_devices(sub, device):
            for node in sub.graph.nodes:
                node.args = tuple(device if isinstance(a, torch.device) else a
                                  for a in node.args)
                node.kwargs = {k: device if isinstance(v, torch.device) else v
                               for k, v in node.kwargs.items()}
            sub.recompile()
    return copied


def _graph_devices(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether any fx graph inside ``module`` names another device than ``device``."""
    for sub in module.modules():
        if isinstance(sub, fx.GraphModule):
            for node in sub.graph.nodes:
                for value in (*node.args, *node.kwargs.values()):
                    if isinstance(value, torch.device) and value != device:
                        return True
    return False
