"""Depth pruning: residual blocks found in the graph, scored, removed and verified."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.graph.blocks import find_blocks
from tests.helpers import assert_equals_mask_mode, cli, one_error_line


class Bottleneck(nn.Module):
    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv2.weight.mul_(scale)  # blocks of clearly different importance

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    """Three identity blocks, then a block with a projection shortcut (not removable)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(Bottleneck(8, s) for s in (1.0, 0.05, 0.5))
        self.down_conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.down_proj = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Linear(16, 5)
        self.skip: set[int] = set()

    def forward(self, x):
        x = F.relu(self.stem(x))
        for k, block in enumerate(self.blocks):
            x = F.relu(x) if k in self.skip else block(x)
        x = self.down_conv(x) + self.down_proj(x)
        return self.head(x.mean(dim=(2, 3)))


class PreNormLM(nn.Module):
    """Pre-norm transformer: x + attn(ln(x)), x + mlp(ln(x)); a GELU polynomial x + c x^3."""

    def __init__(self, layers: int = 3, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, dim)
        self.heads = heads
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.ln1 = nn.LayerNorm(dim)
            layer.qkv = nn.Linear(dim, 3 * dim)
            layer.out = nn.Linear(dim, dim)
            layer.ln2 = nn.LayerNorm(dim)
            layer.up = nn.Linear(dim, 2 * dim)
            layer.down = nn.Linear(2 * dim, dim)
            self.layers.append(layer)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 50)
        self.skip: set[tuple[int, str]] = set()
        self.record: list | None = None

    def _attn(self, layer, x):
        b, t, d = x.shape
        q, k, v = layer.qkv(layer.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return layer.out(y.transpose(1, 2).reshape(b, t, d))

    def _mlp(self, layer, x):
        h = layer.up(layer.ln2(x))
        h = h + 0.044715 * h ** 3  # an add of a value and a function of it, with no weight
        return layer.down(torch.tanh(h))

    def forward(self, ids):
        x = self.embed(ids)
        for k, layer in enumerate(self.layers):
            for kind, fn in (("attn", self._attn), ("mlp", self._mlp)):
                if (k, kind) in self.skip:
                    continue
                branch = fn(layer, x)
                if self.record is not None:
                    self.record.append((f"layers.{k}", kind, x.detach(), branch.detach()))
                x = x + branch
        return self.head(self.norm(x))


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (batch, 10), generator=torch.Generator().manual_seed(seed))


def test_blocks_are_the_residual_branches_with_weights():
    lm = engine.analyze(PreNormLM().eval(), (_ids(),))
    names = [b.name for b in find_blocks(lm.gm)]
    # attention and MLP of each layer share their module prefix: named by add order
    assert names == ["layers.0", "layers.0#2", "layers.1", "layers.1#2", "layers.2", "layers.2#2"]
    cnn = engine.analyze(ResCNN().eval(), (torch.randn(1, 3, 8, 8),))
    blocks = find_blocks(cnn.gm)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]  # no projection
    assert all(b.numel == 2 * 8 * 8 * 9 + 2 * 2 * 8 for b in blocks)  # convs and BN scales


def _branch_scores(model: PreNormLM, batches: list[torch.Tensor], influence: bool) -> list:
    model.record = []
    with torch.no_grad():
        for ids in batches:
            model(ids)
    records, model.record = model.record, None
    per_block: dict[tuple, list[float]] = {}
    for layer, kind, x, branch in records:
        if influence:
            after = x + branch
            cos = (x * after).sum(-1) / (x.norm(dim=-1) * after.norm(dim=-1))
            value = float((1 - cos).mean())
        else:
            value = float(branch.norm() / x.norm())
        per_block.setdefault((layer, kind), []).append(value)
    return [float(np.mean(v)) for v in per_block.values()]


def test_removed_blocks_equal_the_model_run_without_them():
    model = PreNormLM().eval()
    ids = _ids()
    result = engine.prune(model, (ids,), remove_blocks=2)
    blocks = result.report["blocks"]
    expected_scores = _branch_scores(model, [ids], influence=False)
    np.testing.assert_allclose([b["score"] for b in blocks], expected_scores, rtol=1e-6)
    removed = [k for k, b in enumerate(blocks) if b["removed"]]
    assert removed == sorted(np.argsort(expected_scores)[:2].tolist())
    model.skip = {(k // 2, "attn" if k % 2 == 0 else "mlp") for k in removed}
    with torch.no_grad():
        torch.testing.assert_close(result.module(ids), model(ids), rtol=1e-6, atol=1e-6)
    assert result.report["depth"]["verification"]["exact"]
    removed_params = sum(b["params"] for b in blocks if b["removed"])
    assert result.report["before"]["params"] - result.report["after"]["params"] == removed_params


def test_block_influence_with_calibration_data():
    model = PreNormLM().eval()
    calibration = torch.randint(0, 50, (6, 10), generator=torch.Generator().manual_seed(5))
    result = engine.prune(model, (_ids(),), block_ratio=0.5, calibration=calibration.numpy())
    blocks = result.report["blocks"]
    assert result.report["depth"]["criterion"] == "block_influence"
    expected = _branch_scores(model, list(calibration.split(2)), influence=True)
    np.testing.assert_allclose([b["score"] for b in blocks], expected, rtol=1e-5)
    assert sum(b["removed"] for b in blocks) == 3
    lowest = set(np.argsort(expected)[:3].tolist())
    assert {k for k, b in enumerate(blocks) if b["removed"]} == lowest


def test_cnn_blocks_removed_exactly_and_combined_with_width():
    model = ResCNN().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    depth = engine.prune(model, (x,), remove_blocks=1)
    blocks = depth.report["blocks"]
    assert [b["removed"] for b in blocks] == [False, True, False]  # the block scaled by 0.05
    model.skip = {1}
    with torch.no_grad():
        torch.testing.assert_close(depth.module(x), model(x), rtol=1e-6, atol=1e-6)
    model.skip = set()
    both = engine.prune(model, (x,), ratio=0.5, remove_blocks=1)
    assert both.report["blocks"] == blocks
    assert both.report["after"]["params"] < depth.report["after"]["params"]
    assert both.report["before"] == depth.report["before"]
    assert both.report["verification"]["exact"]
    assert_equals_mask_mode(both)
    names = {layer for g in both.report["groups"] for layer in g["layers"]}
    assert not any(name.startswith("blocks.1.") for name in names)


def test_blocks_only_reuse_the_recaptured_program_until_the_module_changes():
    """Removing whole blocks re-captures the model; with no channels removed after that, the
    pruned program is that capture (no second export), as long as the module is unchanged."""
    model = ResCNN().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    depth = engine.prune(model, (x,), remove_blocks=1)
    assert depth.program is depth.analysis.captured.program
    with torch.no_grad():
        torch.testing.assert_close(depth.program.module()(x), depth.module(x))

    changed = engine.prune(model, (x,), remove_blocks=1)
    with torch.no_grad():
        changed.module.get_parameter("head.bias").add_(1.0)  # fine-tuned in place
        assert changed.program is not changed.analysis.captured.program
        torch.testing.assert_close(changed.program.module()(x), changed.module(x))

    width = engine.prune(model, (x,), ratio=0.5, remove_blocks=1)
    assert width.program is not width.analysis.captured.program
    with torch.no_grad():
        torch.testing.assert_close(width.program.module()(x), width.module(x))


@pytest.fixture(scope="module")
def cnn_pt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("depth") / "cnn.pt2"
    torch.export.save(torch.export.export(ResCNN().eval(), (torch.randn(2, 3, 8, 8),)), path)
    return path


def test_cli_reports_blocks(cnn_pt2, tmp_path, capfd):
    rc, out, err = cli(capfd, "prune", cnn_pt2, "--block-ratio", "0.4", "--out", tmp_path / "o")
    assert rc == 0, err
    assert "blocks: removed 1 of 3: blocks.1" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [b["name"] for b in report["blocks"]] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [b["removed"] for b in report["blocks"]] == [False, True, False]
    assert all(isinstance(b["score"], float) for b in report["blocks"])
    assert report["onnx"]["max_abs_diff_vs_torch"] < 1e-3


@pytest.mark.parametrize(("flags", "words"), [
    (["--remove-blocks", "3"], "has 3 removable residual blocks"),
    (["--remove-blocks", "-1"], "negative"),
    (["--remove-blocks", "1.5"], "not an integer"),
    (["--remove-blocks", "two"], "not an integer"),
    (["--block-ratio", "1"], "--block-ratio"),
    (["--block-ratio", "-0.2"], "--block-ratio"),
    (["--block-ratio", "0.5", "--remove-blocks", "1"], "not both"),
])
def test_bad_block_options_are_one_line(cnn_pt2, tmp_path, capfd, flags, words):
    rc, _out, err = cli(capfd, "prune", cnn_pt2, *flags, "--out", tmp_path / "o")
    assert rc == 2
    assert words in one_error_line(err)
    assert not (tmp_path / "o" / "report.json").exists()


def test_remove_blocks_on_a_model_without_blocks_is_one_line(tiny_pt2, tmp_path, capfd):
    rc, _out, err = cli(capfd, "prune", tiny_pt2, "--remove-blocks", "1", "--out", tmp_path)
    assert rc == 2
    assert "no removable residual blocks" in one_error_line(err)
