"""Train PruneScope's built-in demo model: a small digit classifier on scikit-learn's load_digits.

The data ships with scikit-learn (1797 8x8 images, 10 classes), so nothing is downloaded.
The network is tiny but contains every structure a pruning option acts on: a residual add
(policy), a grouped convolution (group_policy), a depthwise convolution, and multi-head
attention built from separate q/k/v/out projections with a head split via view/transpose
(reshape_channel_axis).

    python assets/train_demo.py --out assets  # demo.pt2, demo_calib/eval.npz, demo_meta.json
    python assets/train_demo.py --data-only      # only the two data sets (the split, no training)

demo_calib.npz is the training split (with labels): the calibration set of recovery and of
data-aware criteria. demo_eval.npz is the held-out quarter, the only set quality is measured on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
WIDTH = 64
HEADS = 4
TEST_SIZE = 0.25


def normalise(pixels: np.ndarray) -> np.ndarray:
    """load_digits pixels are 0..16; the model expects (N, 1, 8, 8) float32 in [-1, 1]."""
    return (pixels.reshape(-1, 1, 8, 8).astype(np.float32) / 8.0) - 1.0


class GroupedResidualBlock(nn.Module):
    """x + f(x) where f holds a grouped 3x3 convolution (groups=4) and a 1x1 mix."""

    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return x + self.bn2(self.conv2(y))


class DepthwiseResidualBlock(nn.Module):
    """x + f(x) where f holds a depthwise 3x3 convolution and a 1x1 pointwise convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pwconv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.dwconv(x)))
        return x + self.bn2(self.pwconv(y))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out so the head split is a visible view/transpose."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.out_proj(y)


class DigitsNet(nn.Module):
    def __init__(self, width: int = WIDTH, heads: int = HEADS, classes: int = 10) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.block1 = GroupedResidualBlock(width, groups=4)
        self.block2 = DepthwiseResidualBlock(width)
        self.attn = SelfAttention(width, heads)
        self.attn_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        x = self.block1(x)
        x = self.block2(x)
        tokens = x.flatten(2).transpose(1, 2)  # (N, 64 positions, C)
        tokens = self.attn_norm(tokens + self.attn(tokens))
        return self.head(tokens.mean(dim=1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Every op used here has a deterministic CPU kernel, so this costs nothing.
    torch.use_deterministic_algorithms(True)


def split_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = normalise(digits.data)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    return x_tr, x_te, y_tr, y_te


def write_data(out: Path, seed: int) -> None:
    """The two data sets, from the same deterministic split the model is trained on."""
    x_tr, x_te, y_tr, y_te = split_data(seed)
    np.savez_compressed(out / "demo_calib.npz", x=x_tr, y=y_tr)
    np.savez_compressed(out / "demo_eval.npz", x=x_te, y=y_te)


def shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel: digits are small, this is the cheap regulariser."""
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def train(seed: int, epochs: int, batch_size: int = 64) -> tuple[DigitsNet, dict]:
    seed_everything(seed)
    x_tr, x_te, y_tr, y_te = split_data(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    xe, ye = torch.from_numpy(x_te), torch.from_numpy(y_te)

    model = DigitsNet()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch
    )
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size]
            xb = shift_augment(xt[idx], gen)
            loss = F.cross_entropy(model(xb), yt[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start

    model.eval()
    info = {
        "accuracy": round(accuracy(model, xe, ye), 4),
        "train_accuracy": round(accuracy(model, xt, yt), 4),
        "train_seconds": round(seconds, 1),
        "n_train": len(xt),
        "n_eval": len(xe),
        "x_eval": x_te,
        "y_eval": y_te,
    }
    return model, info


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},), strict=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (fixed so runs are repeatable)"
    )
    parser.add_argument("--data-only", action="store_true",
                        help="write demo_calib.npz and demo_eval.npz only (no training)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data_only:
        write_data(args.out, args.seed)
        return 0

    torch.set_num_threads(args.threads)
    model, info = train(args.seed, args.epochs)

    x_eval = info.pop("x_eval")
    info.pop("y_eval")
    program = export_program(model, torch.from_numpy(x_eval[:8]))
    torch.export.save(program, os.fspath(args.out / "demo.pt2"))
    write_data(args.out, args.seed)

    meta = {
        **info,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": args.seed,
        "epochs": args.epochs,
        "date": dt.date.today().isoformat(),
        "sklearn_version": sklearn.__version__,
        "torch_version": torch.__version__,
        "command": " ".join(
            ["python assets/train_demo.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    (args.out / "demo_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"test accuracy {meta['accuracy']:.4f} on {meta['n_eval']} held-out digits, "
        f"{meta['parameters']} parameters, trained in {meta['train_seconds']} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
