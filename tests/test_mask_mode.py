"""Mask mode (the verifier's reference) on a statistic taken per channel over the tokens.

A removed channel's statistic is zeroed after each op; `rsqrt` of it or a division by it is
then infinite in that channel, and zeroing by multiplication (0 * inf = NaN) used to let the
NaN reach the kept channels through the next layer: the prune of a model with a per-channel
RMS over the token axis stopped with "verification failed: ... NaN or infinite outputs"
although the pruned model was right. Expected values come from a smaller model built by hand
with the kept channels' weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engine
from tests.helpers import assert_equals_mask_mode


class _PerChannelOverTokens(nn.Module):
    """Each channel scaled by a statistic of its own values over the tokens (dim 1)."""

    def __init__(self, width: int, style: str) -> None:
        super().__init__()
        self.style = style
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.style == "rms, eps":
            return h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-2) * self.weight
        if self.style == "rms, no eps":
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(1, keepdim=True)))
        if self.style == "divided by mean size":
            return h / (h.abs().mean(1, keepdim=True) + 1e-2) * self.weight
        raise AssertionError(self.style)


def _model(width: int, style: str) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, width), _PerChannelOverTokens(width, style),
                         nn.Linear(width, 3)).eval()


@pytest.mark.parametrize("style", ["rms, eps", "rms, no eps", "divided by mean size"])
def test_a_statistic_per_channel_over_tokens_prunes_exactly(style):
    model = _model(8, style)
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(4))  # (samples, tokens, 4)
    removed = [1, 2, 6]
    kept = [c for c in range(8) if c not in removed]
    program = torch.export.export(model, (x,))
    result = engine.prune(program, options={"criterion": "index"}, indices={"0": removed})
    assert result.report["verification"]["exact"] is True

    # by hand: the same model 5 channels wide, holding the kept channels' weights
    small = _model(5, style)
    with torch.no_grad():
        small[0].weight.copy_(model[0].weight[kept])
        small[0].bias.copy_(model[0].bias[kept])
        small[1].weight.copy_(model[1].weight[kept])
        small[2].weight.copy_(model[2].weight[:, kept])
        small[2].bias.copy_(model[2].bias)
        want, got = small(x), result.module(x)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_equals_mask_mode(result)  # mask mode itself is finite and agrees
