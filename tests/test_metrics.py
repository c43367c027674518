"""Model metrics against hand counts of params, bytes and conv/linear FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.errors import PruneScopeError
from engine.quality.metrics import count_flops, count_params, measure_latency, size_bytes


class Net(nn.Module):
    """conv(3->8, k3, pad 1) -> BN -> ReLU -> grouped conv(8->8, k3, stride 2, groups 4)
    -> flatten -> linear(8*4*4 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.gconv(x).flatten(1))


# Hand counts for Net.
CONV_P = 8 * 3 * 3 * 3 + 8  # 224
BN_P = 8 + 8
GCONV_P = 8 * (8 // 4) * 3 * 3  # 144
FC_P = 128 * 10 + 10  # 1290
NET_PARAMS = CONV_P + BN_P + GCONV_P + FC_P
BN_BUFFERS_BYTES = (8 + 8) * 4 + 8  # running mean/var (float32) + num_batches_tracked (int64)


def net_flops(batch: int) -> int:
    # A multiply-add counts 2; bias adds, BN and ReLU are not counted by torch's counter.
    conv = 2 * batch * 8 * 8 * 8 * (3 * 3 * 3)  # out 8x8x8, each from 3x3x3 inputs
    gconv = 2 * batch * 8 * 4 * 4 * (2 * 3 * 3)  # out 8x4x4, each from 2 channels x 3x3
    fc = 2 * batch * 128 * 10
    return conv + gconv + fc


def test_count_params_by_hand():
    assert count_params(Net()) == NET_PARAMS == 1674
    assert count_params(nn.Linear(5, 3, bias=False)) == 15


def test_size_bytes_by_hand():
    net = Net()
    assert size_bytes(net) == NET_PARAMS * 4 + BN_BUFFERS_BYTES
    half = Net().half()  # num_batches_tracked stays int64
    assert size_bytes(half) == NET_PARAMS * 2 + (8 + 8) * 2 + 8


class Tied(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: one tensor, two names
        self.again = self.proj  # the same module registered twice

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.again(self.emb(ids)))


def test_tied_weights_count_once():
    m = Tied()
    assert count_params(m) == 11 * 6 + 6 * 6 + 6
    assert size_bytes(m) == (11 * 6 + 6 * 6 + 6) * 4


def test_distinct_parameters_sharing_memory_count_once():
    m = nn.Module()
    base = torch.randn(4, 5)
    m.a = nn.Parameter(base)
    m.b = nn.Parameter(base)  # another Parameter object over the same storage
    m.c = nn.Parameter(base[:2].clone())
    assert count_params(m) == 20 + 10
    assert size_bytes(m) == (20 + 10) * 4


def test_count_flops_by_hand_eager_and_exported():
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    assert count_flops(net, (x,)) == net_flops(2)
    assert count_flops(net, x) == net_flops(2)
    exported = torch.export.export(net, (x,)).module()
    assert count_flops(exported, (x,)) == net_flops(2)
    assert count_params(exported) == NET_PARAMS
    assert size_bytes(exported) == size_bytes(net)


def test_count_flops_keyword_inputs_and_tied_model():
    ids = torch.tensor([[1, 2, 3]])
    # embedding: 0; proj: 2*3*6*6; head: 2*3*6*11
    assert count_flops(Tied(), {"ids": ids}) == 2 * 3 * 6 * 6 + 2 * 3 * 6 * 11


def test_flops_shrink_with_channels():
    small = nn.Conv2d(3, 4, 1)
    big = nn.Conv2d(3, 8, 1)
    x = torch.randn(1, 3, 5, 5)
    assert count_flops(small, (x,)) * 2 == count_flops(big, (x,)) == 2 * 8 * 25 * 3


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0
        self.inference_modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inference_modes.append(torch.is_inference_mode_enabled())
        return self.lin(x)


def test_measure_latency_runs_warmup_and_timed_passes_in_inference_mode():
    m = Counting()
    t = measure_latency(m, (torch.randn(2, 4),), warmup=3, runs=5)
    assert isinstance(t, float) and t > 0
    assert m.calls == 8
    assert all(m.inference_modes)
    assert not torch.is_inference_mode_enabled()


def test_metric_errors():
    with pytest.raises(PruneScopeError, match="nn.Module"):
        count_params("model")
    with pytest.raises(PruneScopeError, match="runs"):
        measure_latency(nn.Linear(2, 2), (torch.randn(1, 2),), runs=0)


def test_report_flops_are_for_the_example_given_where_the_batch_is_dynamic():
    """A transformers model is captured from two copies of a one-sample example (a size-1
    dimension would be fixed); the report still counts one sample, before and after, as
    torch's FlopCounterMode counts the eager models on the one-sample input."""
    import transformers

    import engine

    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_channels=3)
    torch.manual_seed(0)
    model = transformers.ResNetModel(config).eval()
    x = torch.randn(1, 3, 32, 32)
    result = engine.prune(model, (x,), ratio=0.5)
    assert result.analysis.captured.example_inputs[0].shape[0] == 2  # captured dynamic
    assert result.report["before"]["flops"] == count_flops(model, (x,))
    assert result.report["after"]["flops"] == count_flops(result.module, (x,))
    assert result.report["after"]["flops"] < result.report["before"]["flops"]


# --------------------------------------------- FLOPs read off the graph (count_graph_flops)

class _EachProduct(nn.Module):
    """One of each operation count_graph_flops counts, on small fixed shapes."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.linear = nn.Linear(6, 5)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(3, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "linear":  # (3, 4, 6) -> (3, 4, 5)
            return self.linear(x)
        if self.op == "matmul":  # (3, 4, 6) @ (6, 2)
            return torch.matmul(x, torch.ones(6, 2))
        if self.op == "bmm":  # (3, 4, 6) x (3, 6, 7)
            return torch.bmm(x, torch.ones(3, 6, 7))
        if self.op == "mm":  # (4, 6) x (6, 7)
            return torch.mm(x[0], torch.ones(6, 7))
        if self.op == "baddbmm":  # (3, 4, 7) + (3, 4, 6) x (3, 6, 7)
            return torch.baddbmm(torch.zeros(3, 4, 7), x, torch.ones(3, 6, 7))
        if self.op == "addmm":  # (4, 6) x (6, 7) + (7,)
            return torch.addmm(torch.zeros(7), x[0], torch.ones(6, 7))
        if self.op == "conv":  # (1, 2, 5, 5) -> (1, 3, 5, 5), weight (3, 2, 3, 3)
            return self.conv(x)
        if self.op == "deconv":  # (1, 3, 5, 5) -> (1, 2, 10, 10), weight (3, 2, 2, 2)
            return self.deconv(x)
        if self.op == "attention":  # q, k, v (2, 3, 4, 8)
            return torch.nn.functional.scaled_dot_product_attention(x, x * 2, x + 1)
        if self.op == "masked attention":  # q (3, 4, 8), k (3, 5, 8), v (3, 5, 6), a mask
            return torch.nn.functional.scaled_dot_product_attention(
                x, torch.ones(3, 5, 8), torch.ones(3, 5, 6), attn_mask=torch.zeros(4, 5))
        raise AssertionError(self.op)


# per op: the input, and the FLOPs worked out by hand (a multiply-add counts 2)
PRODUCTS = {
    "linear": ((3, 4, 6), 2 * (3 * 4 * 5) * 6),
    "matmul": ((3, 4, 6), 2 * (3 * 4 * 2) * 6),
    "bmm": ((3, 4, 6), 2 * (3 * 4 * 7) * 6),
    "mm": ((1, 4, 6), 2 * (4 * 7) * 6),
    "baddbmm": ((3, 4, 6), 2 * (3 * 4 * 7) * 6),
    "addmm": ((1, 4, 6), 2 * (4 * 7) * 6),
    "conv": ((1, 2, 5, 5), 2 * (3 * 5 * 5) * (2 * 3 * 3)),  # per output: in x kernel
    "deconv": ((1, 3, 5, 5), 2 * (3 * 5 * 5) * (2 * 2 * 2)),  # per input: out x kernel
    "attention": ((2, 3, 4, 8), 2 * (2 * 3) * 4 * 4 * (8 + 8)),  # q k^T, then times v
    "masked attention": ((3, 4, 8), 2 * 3 * 4 * 5 * (8 + 6)),  # the mask adds no product
}


@pytest.mark.parametrize("op", list(PRODUCTS))
def test_graph_flops_of_each_product_by_hand_and_as_torch_counts_them(op):
    from engine.quality.metrics import count_graph_flops

    shape, flops = PRODUCTS[op]
    model = _EachProduct(op).eval()
    x = torch.randn(*shape)
    program = torch.export.export(model, (x,))
    assert count_graph_flops(program.graph_module).flops == flops
    # torch's FlopCounterMode agrees, except on unmasked attention, whose CPU kernel
    # (_scaled_dot_product_flash_attention_for_cpu) it does not count: 0 (with a mask the
    # CPU takes the math path of batched products, which it counts)
    assert count_flops(model, (x,)) == (0 if op == "attention" else flops)
