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
import engine.transform.depth as depth_module
import engine.transform.experts as experts_module
from engine.errors import PruneScopeError
from engine.pipeline import apply, prune_unverified
from engine.scoring.analysis import analyze, plan
from tests.test_verifier_faults import _remove_the_wrong_block

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


# --------------------------------------------------------------- depth and experts
def _spy_compare(monkeypatch, module) -> list[list[int]]:
    """The batch of every output each `compare_exact` of `module` is given (both sides)."""
    seen = []
    real = module.compare_exact

    def compare(expected, got, *args, **kwargs):
        seen.append([t.shape[0] for t in [*expected, *got] if t.dim()])
        return real(expected, got, *args, **kwargs)

    monkeypatch.setattr(module, "compare_exact", compare)
    return seen


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=32)
    ids = torch.randint(1, 100, (1, SEQ), generator=torch.Generator().manual_seed(3))
    return tf.LlamaForCausalLM(config).eval(), (ids,)


@pytest.fixture(scope="module")
def mixtral() -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    config = tf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2,
                              num_local_experts=4, num_experts_per_tok=2, vocab_size=100,
                              use_cache=False)
    ids = torch.randint(1, 100, (1, SEQ), generator=torch.Generator().manual_seed(4))
    return tf.MixtralForCausalLM(config).eval(), (ids,)


def test_depth_verification_runs_on_the_sample_once(llama, monkeypatch) -> None:
    model, inputs = llama
    analysis = analyze(model, inputs)
    assert analysis.captured.repeated_sample
    seen = _spy_compare(monkeypatch, depth_module)
    reduced, report = depth_module.prune_depth(analysis, remove_blocks=2)
    assert seen and all(batch == 1 for batch in seen[0]), seen
    assert report["verification"]["exact"]
    # the re-captured model keeps the captured batch for what follows
    assert reduced.captured.example_inputs[0].shape[0] == 2


def test_depth_verification_on_one_sample_still_catches_a_wrong_block(llama, monkeypatch):
    model, inputs = llama
    analysis = analyze(model, inputs)
    seen = _remove_the_wrong_block(monkeypatch)
    with pytest.raises(PruneScopeError, match=r"^depth verification failed"):
        depth_module.prune_depth(analysis, remove_blocks=1)
    assert seen and seen[0][0] != seen[0][1]


def test_expert_verification_runs_on_the_sample_once(mixtral, monkeypatch) -> None:
    model, inputs = mixtral
    analysis = analyze(model, inputs)
    assert analysis.captured.repeated_sample
    seen = _spy_compare(monkeypatch, experts_module)
    _, report = experts_module.prune_experts(analysis, 0.5)
    assert seen and all(batch == 1 for batch in seen[0]), seen
    assert report["verification"]["exact"]
