"""Custom ops named by a `.pt2` archive: registered from an allow-list, never by guessing.

An exported program can call ops that a library registers when one of its modules is
imported (``transformers`` registers ``transformers::grouped_mm_fallback`` for its mixtures
of experts in ``transformers.integrations.moe``). torch cannot read such an archive until the
op exists. Importing a module runs its code, so only the modules of this allow-list are ever
imported, and only when the library is installed; any other unknown namespace is an error
naming the op.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import warnings
import zipfile
from pathlib import Path

import torch

from engine.errors import ModelLoadError

# op namespace -> the module whose import registers that library's custom ops
KNOWN_CUSTOM_OPS: dict[str, str] = {
    "transformers": "transformers.integrations.moe",
}

# namespaces torch itself provides (present whenever torch is imported)
_BUILTIN = {"aten", "prims", "prim", "quantized", "_quantized", "higher_order", "profiler",
            "_c10d_functional", "c10d_functional", "_dtensor", "torchvision", "image"}

_TARGET = re.compile(r"torch\.ops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")


def archive_ops(path: Path) -> set[tuple[str, str]]:
    """(namespace, op) of every ``torch.ops`` target the archive's programs call."""
    found: set[tuple[str, str]] = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/models/" in f"/{name}" and name.endswith(".json"):
                text = archive.read(name).decode("utf-8", errors="replace")
                try:
                    json.loads(text)
                except ValueError:
                    continue  # not a program; the loader reports unreadable archives
                found.update(_TARGET.findall(text))
    return found


def _registered(namespace: str, op: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_archive_ops(path: Path) -> list[str]:
    """Make every custom op the archive names available; the modules imported, in order.

    Raises a one-line ModelLoadError for an op of a namespace outside the allow-list, or of
    an allowed library that is not installed.
    """
    imported: list[str] = []
    for namespace, op in sorted(archive_ops(path)):
        if namespace in _BUILTIN or _registered(namespace, op):
            continue
        module = KNOWN_CUSTOM_OPS.get(namespace)
        if module is None:
            raise ModelLoadError(
                f"model file {path} calls custom op {namespace}.{op}, which is not registered; "
                f"PruneScope registers only the custom ops of "
                f"{', '.join(sorted(KNOWN_CUSTOM_OPS))} and imports nothing else"
            )
        if importlib.util.find_spec(namespace) is None:
            raise ModelLoadError(
                f"model file {path} calls custom op {namespace}.{op} of the library "
                f"{namespace!r}, which is not installed"
            )
        if module not in imported:
            importlib.import_module(module)
            imported.append(module)
            warnings.warn(
                f"{path} calls custom op {namespace}.{op}: imported {module} to register it",
                UserWarning, stacklevel=3,
            )
        if not _registered(namespace, op):
            raise ModelLoadError(
                f"model file {path} calls custom op {namespace}.{op}, which {module} does not "
                f"register in the installed version"
            )
    return imported
