"""A model's outputs as a flat list of tensors, whatever container holds them, and the
capture that must never lose them."""

from __future__ import annotations

import collections
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import engine
from engine.errors import ModelLoadError
from engine.graph.outputs import tensor_leaves

ROOT = Path(__file__).resolve().parent.parent


class Unregistered(collections.OrderedDict):
    """Like a transformers ModelOutput whose pytree registration is missing."""


@dataclasses.dataclass
class Pair:
    first: torch.Tensor
    second: object


def test_containers_pytree_does_not_know_are_opened_in_order() -> None:
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    out = (a, Unregistered(logits=b, loss=None, hidden=(c,)), Pair(d, "text"))
    assert [float(t) for t in tensor_leaves(out)] == [0.0, 1.0, 2.0, 3.0]
    assert tensor_leaves({"x": None, "y": [1, 2]}) == []


class NoTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict:
        self.fc(x)
        return {"status": "ok"}


def test_a_model_returning_no_tensors_is_one_line() -> None:
    with pytest.raises(ModelLoadError, match="returns no tensors"):
        engine.analyze(NoTensors().eval(), (torch.randn(2, 4),))


def test_transformers_outputs_survive_an_import_inside_an_export_trace() -> None:
    """The order that once captured a ViT with no outputs: transformers first imported inside
    a traced forward, then a transformers model captured (a fresh process, so the import
    really happens first there)."""
    script = textwrap.dedent("""
        import tempfile
        import torch
        from torch import nn
        import engine

        class ImportsWhileTraced(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 8)

            def forward(self, x):
                import transformers.integrations.moe  # noqa: F401
                return self.fc(x)

        engine.prune(ImportsWhileTraced().eval(), (torch.randn(2, 8),), ratio=0.5)
        import transformers as tf
        torch.manual_seed(0)
        config = tf.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=4, image_size=32, patch_size=8)
        result = engine.prune(tf.ViTForImageClassification(config).eval(), None, ratio=0.5)
        print(len(result.program.graph_signature.output_specs),
              tuple(result.module(*result.example_inputs)[0].shape))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # transformers models are captured with a dynamic batch from an example batch of 2
    assert done.stdout.split("\n")[-2] == "1 (2, 2)"
