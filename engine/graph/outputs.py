"""A model's output as the flat list of its tensors, the form every comparison in the engine
uses (verification, evaluation, recovery, export checks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, in pytree order. A container pytree does not know is
    opened by its shape (mapping, sequence, dataclass): transformers registers each
    ``ModelOutput`` class with pytree when the class is created, and we have seen such a class
    unregistered in a process where transformers was first imported inside a
    ``torch.export`` trace; a pytree leaf there would make the model's outputs vanish."""
    found: list[torch.Tensor] = []
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif isinstance(leaf, Mapping):
            found.extend(tensor_leaves(list(leaf.values())))
        elif isinstance(leaf, (list, tuple)):
            found.extend(tensor_leaves(list(leaf)))
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            found.extend(tensor_leaves([getattr(leaf, f.name) for f in dataclasses.fields(leaf)]))
    return found
