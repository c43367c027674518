"""Small models, one per channel-coupling case, shared by the engine tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNResidual(nn.Module):
    """Residual add joins conv_a and conv_c; BN follows each conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.conv_b = nn.Conv2d(16, 24, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(24)
        self.conv_c = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        a = F.relu(self.bn_a(self.conv_a(x)))
        b = F.relu(self.bn_b(self.conv_b(a)))
        y = a + self.conv_c(b)
        return self.head(y.mean(dim=(2, 3)))


class GroupedDepthwise(nn.Module):
    """A grouped conv (groups=4), a depthwise conv with channel multiplier 2, pointwise after."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 64, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(64, 8, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.grouped(x))
        x = F.relu(self.depthwise(x))
        return self.pointwise(x).flatten(1)


class CatSplitFlatten(nn.Module):
    """cat of two branches, a chunk, and flatten into a linear (index maps over H*W)."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 6, 3, padding=1)
        self.right = nn.Conv2d(3, 10, 3, padding=1)
        self.mix = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(6 * 4 * 4, 7)
        self.fc2 = nn.Linear(6 * 4 * 4, 7)

    def forward(self, x):
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        a, b = self.mix(x).chunk(2, dim=1)
        return self.fc(a.flatten(1)) + self.fc2(torch.sigmoid(b).flatten(1))


class SEGate(nn.Module):
    """Squeeze-excitation: a channel gate multiplies the feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.squeeze = nn.Linear(16, 4)
        self.excite = nn.Linear(4, 16)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean(dim=(2, 3))))))
        return self.out(x * gate[:, :, None, None]).mean(dim=(2, 3))


class SwiGLU(nn.Module):
    """Llama-style MLP: silu(gate) * up, then down; residual stream frozen by the output."""

    def __init__(self, dim: int = 16, hidden: int = 40) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.fused = nn.Linear(dim, 2 * hidden)
        self.down2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        g, u = self.fused(x).chunk(2, dim=-1)
        return x + self.down2(F.silu(g) * u)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections, no normalisation."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int | None = None,
                 manual: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.head_dim = dim // heads
        self.manual = manual
        self.embed = nn.Linear(6, dim)
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.fc = nn.Linear(dim, 64)
        self.proj = nn.Linear(64, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.embed(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim)
            k = k.reshape(b, self.heads, t, self.head_dim)
            v = v[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim)
            v = v.reshape(b, self.heads, t, self.head_dim)
        if self.manual:
            scores = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
            a = scores.softmax(dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        h = h + self.o(a)
        h = h + self.proj(F.gelu(self.fc(h)))
        return self.head(h)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle between two grouped convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        b, c, h, w = x.shape
        x = x.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.conv3(F.relu(self.conv2(x))).flatten(1)


class PixelShuffle(nn.Module):
    """Sub-pixel convolution: 4 channels of conv1 become one channel of the shuffled map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.shuffle(self.conv1(x)))).flatten(1)


class TiedEmbedding(nn.Module):
    """Embedding and output head share one weight (GPT-2 style weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 24)
        self.mlp_in = nn.Linear(24, 48)
        self.mlp_out = nn.Linear(48, 24)
        self.lm_head = nn.Linear(24, 50, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        h = self.wte(ids)
        h = h + self.mlp_out(F.gelu(self.mlp_in(h)))
        return self.lm_head(h)


class Unsupported(nn.Module):
    """A channel that flows into an op without a rule (cummax) must be frozen, not pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = torch.cummax(self.a(x), dim=1).values
        return self.c(torch.cat([a, F.relu(self.b(x))], dim=1)).flatten(1)


class ConvTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(12, 10, 2, stride=2)
        self.out = nn.Conv2d(10, 3, 1)

    def forward(self, x):
        return self.out(F.relu(self.up(F.relu(self.conv(x))))).flatten(1)


class EinsumAttention(nn.Module):
    """Attention written with einsum on (batch, tokens, heads, head_dim) tensors."""

    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.embed(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * self.head_dim**-0.5
        a = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, -1)
        return self.head(h + self.out(a))


class Conv1d3d(nn.Module):
    """1-D and 3-D convolutions with their batch norms and pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(12)
        self.c2 = nn.Conv1d(12, 6, 1)
        self.c3 = nn.Conv3d(1, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(8)
        self.c4 = nn.Conv3d(8, 4, 1)

    def forward(self, x):
        seq = x.flatten(2)[:, :2]
        a = self.c2(F.relu(self.bn1(self.c1(seq)))).mean(-1)
        b = self.c4(F.relu(self.bn3(self.c3(x[:, :1, None])))).mean(dim=(2, 3, 4))
        return torch.cat([a, b], dim=1)


class Tiny(nn.Module):
    """Three convolutions: groups 'a' and 'b' (8 channels each) are prunable, 'c' reaches the
    output. The robustness tests' smallest real model."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x))))).mean(dim=(2, 3))


def tiny() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(2, 3, 6, 6),)


def image(batch: int = 2, size: int = 4) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, size, size),)


ZOO = {
    "conv_bn_residual": (ConvBNResidual, lambda: image()),
    "grouped_depthwise": (GroupedDepthwise, lambda: image()),
    "cat_split_flatten": (CatSplitFlatten, lambda: image()),
    "se_gate": (SEGate, lambda: image()),
    "swiglu": (SwiGLU, lambda: (torch.randn(2, 5, 16),)),
    "attention_sdpa": (lambda: Attention(), lambda: (torch.randn(2, 5, 6),)),
    "attention_matmul": (lambda: Attention(manual=True), lambda: (torch.randn(2, 5, 6),)),
    "attention_gqa": (
        lambda: Attention(dim=32, heads=4, kv_heads=2),
        lambda: (torch.randn(2, 5, 6),),
    ),
    "channel_shuffle": (ChannelShuffle, lambda: image()),
    "pixel_shuffle": (PixelShuffle, lambda: image()),
    "tied_embedding": (TiedEmbedding, lambda: (torch.randint(0, 50, (2, 7)),)),
    "conv_transpose": (ConvTranspose, lambda: image(size=8)),
    "einsum_attention": (EinsumAttention, lambda: (torch.randn(2, 4, 5),)),
    "conv1d_conv3d": (Conv1d3d, lambda: image()),
}


def build(name: str, seed: int = 0):
    factory, inputs = ZOO[name]
    torch.manual_seed(seed)
    model = factory().eval()
    # non-trivial BN statistics so that masking errors show up
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model, inputs()
