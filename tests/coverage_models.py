"""Small models, one per coverage case of issue 11 (ops and weight forms the first zoo lacks)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReshapeAs(nn.Module):
    """Tokens back to a feature map with ``reshape_as`` (vision transformers do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        f = F.relu(self.stem(x))
        tokens = self.mix(f.flatten(2).transpose(1, 2))  # (b, hw, c)
        back = tokens.transpose(1, 2).reshape_as(f)
        return self.out(F.relu(back + f)).mean(dim=(2, 3))


class RollSpatial(nn.Module):
    """Shifted windows: a roll over height and width passes the channels through."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = torch.roll(F.relu(self.a(x)), shifts=(1, -2), dims=(2, 3))
        z = torch.roll(F.relu(self.b(y)), shifts=(-1, 2), dims=(2, 3))
        return self.head(z).mean(dim=(2, 3))


class RollChannels(nn.Module):
    """A roll over the channels is a cyclic permutation of them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        y = torch.roll(F.relu(self.a(x)), shifts=5, dims=1)
        return self.b(y).mean(dim=(2, 3))


class StdConv(nn.Conv2d):
    """BiT/timm-style weight standardisation, in the two forms found in the wild."""

    def __init__(self, *args, form: str = "batch_norm", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.form = form

    def forward(self, x):
        if self.form == "batch_norm":
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                             training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        else:
            var, mean = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True,
                                       unbiased=False)
            w = (self.weight - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WeightStandardised(nn.Module):
    """Two standardised convs in a row, then a plain conv: the first's outputs feed a
    standardised conv (inexact), the second's a plain one (exact)."""

    def __init__(self, form: str = "batch_norm") -> None:
        super().__init__()
        self.a = StdConv(3, 16, 3, padding=1, form=form)
        self.b = StdConv(16, 24, 3, padding=1, form=form)
        self.c = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x))))).mean(dim=(2, 3))


class WeightNorm(nn.Module):
    """``torch.nn.utils.parametrizations.weight_norm`` on a conv and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.conv = wn(nn.Conv2d(3, 16, 3, padding=1))
        self.fc = wn(nn.Linear(16, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(F.relu(self.fc(h)))


class OddReductions(nn.Module):
    """Reductions called every way the ATen schemas allow (ints, lists, floats, dtypes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        f = torch.multiply(F.relu(self.conv(x)), 0.5)  # aten.multiply, an alias of mul
        parts = [
            f.mean(dim=-1).mean(2),
            f.sum(dim=(2, 3), dtype=torch.float64).float(),
            f.amax(dim=3).amin(dim=2),
            f.var(dim=(2, 3), correction=0.5),
            f.std(dim=[2, 3], unbiased=False),
            torch.norm(f, p=2.0, dim=(2, 3)),
            torch.linalg.vector_norm(f, ord=1.5, dim=(2, 3)),
            f.logsumexp(dim=(2, 3)),
            f.max(dim=3).values.max(dim=2).values,
        ]
        return self.head(sum(parts))


class RelativeBiasAttention(nn.Module):
    """Swin/BEiT-style attention with a per-head relative position bias table read through
    an index (positions x heads), added to the attention scores."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 6) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(8, dim)
        self.qkv_q = nn.Linear(dim, dim)
        self.qkv_k = nn.Linear(dim, dim)
        self.qkv_v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        pos = torch.arange(tokens)
        self.register_buffer("rel_index", (pos[:, None] - pos[None, :] + tokens - 1).view(-1))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.embed(x)

        def split(t):
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.qkv_q(h)), split(self.qkv_k(h)), split(self.qkv_v(h))
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        bias = self.table[self.rel_index].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = (scores + bias.unsqueeze(0)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.head(F.relu(self.proj(out)))


class DataDependentGather(nn.Module):
    """Channels picked by data (``gather`` over the channel dim): cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        idx = h.argsort(dim=-1)[..., :16]
        return self.b(torch.gather(h, -1, idx))


class UnfoldFold(nn.Module):
    """MobileViT-style patches: ``unfold`` to (N, C * k * k, L), a pointwise mix, ``fold``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv1d(8 * 4, 8 * 4, 1)
        self.b = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        f = F.relu(self.a(x))
        patches = F.unfold(f, kernel_size=2, stride=2)
        back = F.fold(self.mix(patches), output_size=f.shape[-2:], kernel_size=2, stride=2)
        return self.b(F.relu(back)).mean(dim=(2, 3))


COVERAGE = {
    "unfold_fold": (UnfoldFold, lambda: (torch.randn(2, 3, 4, 4),)),
    "reshape_as": (ReshapeAs, lambda: (torch.randn(2, 3, 4, 4),)),
    "roll_spatial": (RollSpatial, lambda: (torch.randn(2, 3, 5, 5),)),
    "roll_channels": (RollChannels, lambda: (torch.randn(2, 3, 4, 4),)),
    "weight_std_batch_norm": (lambda: WeightStandardised("batch_norm"),
                              lambda: (torch.randn(2, 3, 5, 5),)),
    "weight_std_var_mean": (lambda: WeightStandardised("var_mean"),
                            lambda: (torch.randn(2, 3, 5, 5),)),
    "weight_norm": (WeightNorm, lambda: (torch.randn(2, 3, 5, 5),)),
    "odd_reductions": (OddReductions, lambda: (torch.randn(2, 3, 5, 5),)),
    "relative_bias_attention": (RelativeBiasAttention, lambda: (torch.randn(2, 6, 8),)),
    "data_dependent_gather": (DataDependentGather, lambda: (torch.randn(2, 5, 6),)),
}


def build(name: str, seed: int = 0):
    factory, inputs = COVERAGE[name]
    torch.manual_seed(seed)
    return factory().eval(), inputs()
