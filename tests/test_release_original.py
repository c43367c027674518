"""Pruning a model file gives its weights up as the slices are made (the original and the
pruned weights are never all in memory together): same result as the ordinary path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import engine


class TiedLm(nn.Module):
    """Tied embedding / head, an MLP and a norm: shared tensors must be released once."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.norm(h))


def _saved(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    path = tmp_path / "lm.pt2"
    torch.export.save(torch.export.export(TiedLm().eval(), (ids,)), path)
    return path, ids


def test_file_prune_matches_in_memory_prune_and_releases_weights(tmp_path: Path) -> None:
    path, ids = _saved(tmp_path)
    from_file = engine.prune(path, ratio=0.4, release_original=True)
    in_memory = engine.prune(torch.export.load(path), ratio=0.4)
    assert from_file.report["before"] == in_memory.report["before"]
    assert from_file.report["after"] == in_memory.report["after"]
    assert from_file.report["verification"] == in_memory.report["verification"]
    with torch.no_grad():
        torch.testing.assert_close(from_file.module(ids), in_memory.module(ids), rtol=0, atol=0)

    # every original tensor is gone (meta) unless the pruned model still uses it
    kept = {t.data_ptr() for t in list(from_file.module.parameters())
            + list(from_file.module.buffers())}
    gm = from_file.analysis.gm
    originals = list(gm.parameters()) + list(gm.buffers())
    assert originals
    assert all(t.is_meta or t.data_ptr() in kept for t in originals)
    assert sum(t.is_meta for t in originals) >= 4  # embed (tied), up, down, norm
    program = from_file.analysis.captured.program
    assert all(t.is_meta or t.data_ptr() in kept for t in program.state_dict.values())
    # the in-memory path leaves its original alone
    assert not any(t.is_meta for t in in_memory.analysis.gm.parameters())

    # the released analysis refuses to be used again
    with pytest.raises(engine.PruneScopeError, match="analyse the model again"):
        engine.apply(from_file.analysis, from_file.plan)
    with pytest.raises(engine.PruneScopeError, match="analyse the model again"):
        engine.masked(from_file.analysis, from_file.plan)

    # the pruned model saves and reloads with the same outputs
    paths = engine.save(from_file, tmp_path / "out", onnx=False)
    reloaded = torch.export.load(paths["model.pt2"]).module()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), from_file.module(ids))
