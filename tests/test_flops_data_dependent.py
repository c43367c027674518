"""FLOPs of a graph with a data-dependent size (an `.item()` slice, as DeBERTa's relative
positions): the countable operations are counted, the others named, and a prune never fails
on the metric."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engine
from engine.quality.metrics import count_graph_flops, graph_flops, model_metrics
from engine.stream import report_sizes


class SpanSlice(nn.Module):
    """A static linear, then a linear over the first `span` rows of a table, `span` read from
    the input's values (torch.export: an unbacked size)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)
        self.table = nn.Parameter(torch.randn(6, 4))
        self.span_proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        span = x[0, 0].abs().clamp(1, 6).to(torch.int64).item()
        torch._check(span >= 1)
        torch._check(span <= 6)
        rows = self.span_proj(self.table[:span])
        return self.out(torch.relu(self.inner(x))) + rows.sum()


@pytest.fixture(scope="module")
def exported() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = SpanSlice().eval()
    x = torch.full((1, 8), 3.0)
    return model, x, torch.export.export(model, (x,)).module()


def test_graph_flops_counts_the_static_operations_and_names_the_data_dependent_one(exported):
    _, _, gm = exported
    count = count_graph_flops(gm)
    static = 2 * (8 * 16 + 16 * 4)  # the two static linears, batch 1
    assert count.flops == static
    assert graph_flops(gm) == static
    # the span linear's size is only known at run time: named, not guessed
    assert len(count.uncounted) == 1
    (name,) = count.uncounted
    node = next(n for n in gm.graph.nodes if n.name == name)
    assert node.target == torch.ops.aten.linear.default
    assert node.args[1].name.startswith("span_proj")


def test_skip_leaves_the_same_operations_out_of_both_counts(exported):
    _, _, gm = exported
    uncounted = count_graph_flops(gm).uncounted
    first = next(n.name for n in gm.graph.nodes
                 if n.target == torch.ops.aten.linear.default and n.name not in uncounted)
    skipped = count_graph_flops(gm, skip=[first])
    assert set(skipped.uncounted) == {first, *uncounted}
    assert skipped.flops == count_graph_flops(gm).flops - 2 * 8 * 16  # the inner linear
    metrics = model_metrics(gm)
    assert metrics["flops_uncounted"] == list(uncounted)


def test_prune_reports_what_the_flops_leave_out():
    torch.manual_seed(0)
    result = engine.prune(SpanSlice().eval(), (torch.full((1, 8), 3.0),), ratio=0.5)
    before, after = result.report["before"], result.report["after"]
    assert before["flops_uncounted"] == after["flops_uncounted"]
    assert len(before["flops_uncounted"]) == 1
    # inner/out lost channels: fewer FLOPs over the same counted operations
    assert 0 < after["flops"] < before["flops"]


def test_the_streamed_report_leaves_out_what_the_normal_one_does():
    """engine/stream.py's before/after sizes count the same operations as the normal path's
    report: the span linear, uncounted in the original, stays out of the pruned count."""
    torch.manual_seed(0)
    result = engine.prune(SpanSlice().eval(), (torch.full((1, 8), 3.0),), ratio=0.5)
    before, after = report_sizes(result.analysis.gm, result.module, 1)
    assert (before, after) == (result.report["before"], result.report["after"])
    assert after["flops_uncounted"] == before["flops_uncounted"]
