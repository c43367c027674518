"""A transformers model given one example sample is captured with that sample twice (a batch
of 1 would be captured fixed). The prune's two verification forwards (mask mode and the
pruned model) run on the sample once, half the work; the report must not change: the
pruned model's FLOPs are those of the captured batch, as a run on the full example batch
measures them, and the verification still compares every output."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

import engine
from engine.pipeline import apply, prune_unverified
from engine.scoring.analysis import analyze, plan

SEQ = 10


class _Batches(TorchDispatchMode):
    """The batch (dim 0 of the first input) of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
                    torch.ops.aten.bmm.default, torch.ops.aten.convolution.default):
            first = args[1] if func is torch.ops.aten.addmm.default else args[0]
            self.batches.add(int(first.shape[0]))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def bert() -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=32, num_labels=3)
    model = tf.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 100, (1, SEQ), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


@pytest.fixture(scope="module")
def vit() -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    config = tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, num_labels=5)
    model = tf.ViTForImageClassification(config).eval()
    return model, (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)),)


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_pruned_flops_are_the_captured_batch_ones(which: str, request) -> None:
    model, inputs = request.getfixturevalue(which)
    analysis = analyze(model, inputs)
    assert analysis.captured.repeated_sample
    assert analysis.captured.example_inputs[0].shape[0] == 2
    the_plan = plan(analysis, engine.PruningOptions(criterion="l2"), ratio=0.5)
    result = apply(analysis, the_plan)
    # the same pruned graph run on the whole captured batch (both samples)
    _, full_batch = prune_unverified(analysis, the_plan)
    assert result.report["after"] == full_batch
    assert 0 < result.report["after"]["flops"] < result.report["before"]["flops"]
    assert result.report["verification"]["output_shapes_match"]


def test_verification_forwards_run_on_the_sample_once(bert) -> None:
    model, inputs = bert
    analysis = analyze(model, inputs)
    the_plan = plan(analysis, engine.PruningOptions(criterion="l2"), ratio=0.5)
    with _Batches() as seen:
        result = apply(analysis, the_plan)
    # mask mode and the pruned model: the linear layers ran on the SEQ tokens of the one
    # sample, never on the 2 x SEQ tokens of the captured batch of 2 copies
    assert SEQ in seen.batches and 2 * SEQ not in seen.batches, seen.batches
    assert result.report["verification"]["max_abs_diff_vs_masked"] >= 0.0


def test_a_real_batch_is_verified_whole(bert) -> None:
    model, _ = bert
    ids = torch.randint(1, 100, (3, SEQ), generator=torch.Generator().manual_seed(3))
    analysis = analyze(model, (ids,))
    assert not analysis.captured.repeated_sample
    the_plan = plan(analysis, engine.PruningOptions(criterion="l2"), ratio=0.5)
    with _Batches() as seen:
        apply(analysis, the_plan)
    assert 3 * SEQ in seen.batches, seen.batches
