"""Mixtures of experts: width inside experts, whole experts, the custom-op loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import engine
from engine.transform.experts import find_routers
from tests.helpers import assert_equals_mask_mode, cli, one_error_line

E, K, DIM, HIDDEN, TOKENS = 4, 2, 16, 32, 12


def _grouped_mm(x, w, offs):
    """The grouped product transformers runs on CPU (its custom op)."""
    import transformers.integrations.moe  # noqa: F401 - registers the op

    return torch.ops.transformers.grouped_mm_fallback(x, w, offs=offs)


class StackedMoE(nn.Module):
    """Experts stored as 3-D weights and run through a grouped matrix product, routed the
    way transformers 5 does it (softmax, top-k, tokens sorted per expert, histc offsets)."""

    def __init__(self, experts: int = E, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.experts = experts
        self.inp = nn.Linear(8, DIM)
        self.router = nn.Linear(DIM, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * HIDDEN, DIM, generator=g) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, DIM, HIDDEN, generator=g) * 0.3)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x):
        h = self.inp(x)
        probs = F.softmax(self.router(h), dim=-1)
        weights, chosen = torch.topk(probs, K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        experts_sorted, perm = torch.sort(chosen.reshape(-1))
        tokens = h[perm // K]
        counts = torch.histc(experts_sorted.float(), bins=self.experts, min=0,
                             max=self.experts - 1)
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        gate_up = _grouped_mm(tokens, self.gate_up.transpose(-2, -1), offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        out = _grouped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offsets)
        out = out * weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        y = out[inverse].view(x.shape[0], K, DIM).sum(dim=1)
        return self.head(h + y)


class DenseMoE(nn.Module):
    """One nn.Linear pair per expert, every expert weighted by its (top-k) routing weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(8, DIM)
        self.router = nn.Linear(DIM, E, bias=False)
        self.up = nn.ModuleList(nn.Linear(DIM, HIDDEN) for _ in range(E))
        self.down = nn.ModuleList(nn.Linear(HIDDEN, DIM) for _ in range(E))
        with torch.no_grad():
            for e, layer in enumerate(self.up):  # experts of different weight scales
                layer.weight.mul_(0.3 + e)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x):
        h = self.inp(x)
        probs = F.softmax(self.router(h), dim=-1)
        weights, chosen = torch.topk(probs, K, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, chosen, weights)
        y = sum(gates[:, e:e + 1] * self.down[e](F.relu(self.up[e](h))) for e in range(E))
        return self.head(h + y)


def _tokens(n: int = TOKENS, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def _rows_kept(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of `original` (dim 1 of a stacked (E, rows, cols) weight) `pruned` kept,
    found by exact comparison, the same rows in every expert."""
    kept = []
    for r in range(pruned.shape[1]):
        match = [k for k in range(original.shape[1]) if torch.equal(original[:, k], pruned[:, r])]
        assert len(match) == 1
        kept.append(match[0])
    return kept


@pytest.fixture(scope="module")
def stacked() -> tuple[StackedMoE, engine.Analysis]:
    """StackedMoE captured once on _tokens(); each prune of it copies what it cuts."""
    model = StackedMoE().eval()
    return model, engine.analyze(model, (_tokens(),))


def test_stacked_experts_width_keeps_the_same_channels_in_every_expert(stacked):
    model, analysis = stacked
    x = _tokens()
    (group,) = [g for g in analysis.groups if g.layers == ["gate_up"]]
    assert group.channels == HIDDEN  # gate j and up j are one channel, across all experts
    result = engine.apply(analysis, engine.plan(analysis, ratios={group.name: 0.5}))
    gm = result.module
    gate_up = dict(gm.named_parameters())["gate_up"]
    assert gate_up.shape[0] == E and gate_up.shape[1] < 2 * HIDDEN
    kept = _rows_kept(model.gate_up.detach(), gate_up.detach())
    gates = [k for k in kept if k < HIDDEN]
    ups = [k - HIDDEN for k in kept if k >= HIDDEN]
    assert gates == ups  # gate j and up j go together (they meet in silu(gate) * up)
    # independent mask mode: the original with the dropped intermediate channels zeroed
    reference = StackedMoE().eval()
    reference.load_state_dict(model.state_dict())
    dropped = [j for j in range(HIDDEN) if j not in gates]
    with torch.no_grad():
        reference.down[:, :, dropped] = 0
    assert len(dropped) == HIDDEN // 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
    assert result.report["verification"]["exact"]


def test_dense_experts_keep_different_channel_counts_and_verify_exactly():
    model = DenseMoE().eval()
    x = _tokens()
    result = engine.prune(model, (x,), {"layer_norm": "none", "step_op": "none"}, ratio=0.5)
    kept = {g["name"]: len(g["kept"]) for g in result.report["groups"]
            if g["name"].startswith("up.")}
    assert len(kept) == E and len(set(kept.values())) > 1, kept
    assert result.report["verification"]["exact"]
    assert_equals_mask_mode(result)
    router = [f for f in result.report["frozen"] if "router" in f["layers"]]
    assert router and "routing" in router[0]["reason"]


def _without_experts(model: StackedMoE, removed: list[int]) -> StackedMoE:
    """The model rebuilt by hand with fewer experts (router rows and weights dropped)."""
    keep = [e for e in range(model.experts) if e not in removed]
    small = StackedMoE(experts=len(keep)).eval()
    with torch.no_grad():
        small.inp.load_state_dict(model.inp.state_dict())
        small.head.load_state_dict(model.head.state_dict())
        small.router.weight.copy_(model.router.weight[keep])
        small.gate_up.copy_(model.gate_up[keep])
        small.down.copy_(model.down[keep])
    return small


def test_removing_whole_experts_equals_the_model_built_without_them(stacked):
    model, analysis = stacked
    x = _tokens()
    result = engine.prune(analysis, expert_ratio=0.25)
    section = result.report["experts"]
    (router,) = section["routers"]
    assert router["layer"] == "router" and router["experts"] == E and router["top_k"] == K
    removed = router["removed"]
    assert len(removed) == 1
    # weights criterion: the expert with the smallest weight norm goes
    with torch.no_grad():
        norms = [float(torch.sqrt(model.gate_up[e].square().sum() + model.down[e].square().sum()))
                 for e in range(E)]
    assert removed == [int(np.argmin(norms))]
    params = dict(result.module.named_parameters())
    assert params["router.weight"].shape[0] == E - 1 and params["gate_up"].shape[0] == E - 1
    with torch.no_grad():
        expected = _without_experts(model, removed)(x)
        torch.testing.assert_close(result.module(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x), expected, atol=1e-4)  # routing really changed
    assert section["verification"]["exact"]
    assert result.report["before"]["params"] > result.report["after"]["params"]


def test_routing_frequency_scores_count_the_tokens_each_expert_gets(stacked):
    model, analysis = stacked
    calibration = _tokens(5 * TOKENS, seed=3).numpy()  # whole batches of 12
    (router,) = find_routers(analysis)
    from engine.transform.experts import routing_scores

    scores = routing_scores(analysis, [router], calibration)["router"]
    with torch.no_grad():
        h = model.inp(torch.as_tensor(calibration))
        probs = F.softmax(model.router(h), dim=-1)
        values, chosen = torch.topk(probs, K, dim=-1)
    freq = np.bincount(chosen.reshape(-1).numpy(), minlength=E) / chosen.numel()
    mass = np.array([float(values[chosen == e].sum()) for e in range(E)])
    np.testing.assert_allclose(scores, 0.5 * freq + 0.5 * mass / mass.sum(), rtol=1e-6)
    result = engine.prune(analysis, expert_ratio=0.5, calibration=calibration)
    removed = result.report["experts"]["routers"][0]["removed"]
    assert sorted(removed) == sorted(np.argsort(scores, kind="stable")[:2].tolist())
    assert result.report["experts"]["criterion"] == "routing"


def test_experts_keep_at_least_top_k(stacked):
    result = engine.prune(stacked[1], expert_ratio=0.9)
    assert len(result.report["experts"]["routers"][0]["removed"]) == E - K


# ----------------------------------------------------------------- transformers models


def _mixtral(layers: int = 2):
    config = tf.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100,
        use_cache=False)
    return tf.MixtralForCausalLM(config)


def _mixtral_one_layer():
    return _mixtral(layers=1)


def _qwen2_moe():
    config = tf.Qwen2MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=100,
        use_cache=False)
    return tf.Qwen2MoeForCausalLM(config)


def _qwen3_moe():
    config = tf.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        vocab_size=100, use_cache=False, head_dim=16)
    return tf.Qwen3MoeForCausalLM(config)


def _deepseek_v3():
    config = tf.DeepseekV3Config(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, vocab_size=100, use_cache=False)
    return tf.DeepseekV3ForCausalLM(config)


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def _program(build) -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model = Logits(build().eval())
    return torch.export.export(model, (torch.randint(0, 100, (1, 8)),), strict=False)


@pytest.fixture(scope="module")
def captured():
    """One export and one analysis per architecture, shared by its width and whole-expert
    tests (a prune copies what it cuts, so the shared analysis stays the original's)."""
    cache: dict = {}

    def get(build) -> tuple[torch.export.ExportedProgram, engine.Analysis]:
        if build not in cache:
            program = _program(build)
            cache[build] = (program, engine.analyze(program))
        return cache[build]

    return get


@pytest.fixture(scope="module")
def mixtral_pt2(tmp_path_factory):
    """A one-layer Mixtral archive for the file-level tests (CLI with ONNX, the fresh-process
    loader, a tampered namespace): one routed layer holds every op they look at, and the
    ONNX conversion and each load cost about half of the two-layer model's."""
    path = tmp_path_factory.mktemp("moe") / "mixtral.pt2"
    program = _program(_mixtral_one_layer)
    assert sum(str(n.target) == "transformers.grouped_mm_fallback.default"
               for n in program.graph.nodes) == 2  # gate_up and down of the one MoE layer
    torch.export.save(program, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("build", [_mixtral, _qwen2_moe, _qwen3_moe, _deepseek_v3])
def test_transformers_moe_width_prunes_the_experts_and_verifies(build, captured):
    program, analysis = captured(build)
    ops = {str(n.target) for n in program.graph.nodes}
    assert "transformers.grouped_mm_fallback.default" in ops
    result = engine.prune(analysis, ratio=0.5)
    report = result.report
    removed = 1 - report["after"]["params"] / report["before"]["params"]
    assert removed >= 0.2
    experts = [g for g in report["groups"] if g["name"].endswith("experts.gate_up_proj")]
    assert experts and all(g["pruned"] for g in experts)
    verification = report["verification"]
    assert verification["exact"] or not verification["exact_expected"]
    assert verification["relative_diff_vs_masked"] <= 1e-4 or verification["inexact_groups"]


@pytest.mark.slow
@pytest.mark.parametrize(("build", "routers"), [
    (_mixtral, 2), (_qwen2_moe, 2), (_qwen3_moe, 2),
    (_deepseek_v3, 1),  # sigmoid router, score bias, group mask, gather; layer 0 is dense
])
def test_transformers_moe_whole_experts_are_exact(build, routers, captured):
    result = engine.prune(captured(build)[1], expert_ratio=0.5)
    section = result.report["experts"]
    assert len(section["routers"]) == routers
    for router in section["routers"]:
        assert len(router["removed"]) == 2 and len(router["weights"]) == 2
    assert section["verification"]["exact"]
    params = dict(result.module.named_parameters())
    stacked = [p for name, p in params.items() if name.endswith("experts.gate_up_proj")]
    assert stacked and all(p.shape[0] == 2 for p in stacked)
    # with nothing else removed the whole run is exact too
    assert result.report["verification"]["relative_diff_vs_masked"] == 0.0


@pytest.mark.slow
def test_cli_prunes_a_moe_pt2_with_experts_and_onnx(mixtral_pt2, tmp_path, capfd):
    rc, out, err = cli(capfd, "prune", mixtral_pt2, "--ratio", "0.3", "--expert-ratio", "0.5",
                       "--out", tmp_path / "out")
    assert rc == 0, err
    assert "experts: model.model.layers.0.mlp.gate: removed 2 of 4" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["onnx"]["max_abs_diff_vs_torch"] < 1e-3
    assert (tmp_path / "out" / "model.onnx").is_file()


@pytest.mark.slow
def test_custom_op_archive_loads_in_a_fresh_process(mixtral_pt2):
    code = textwrap.dedent(f"""
        import sys, warnings
        import engine
        assert "transformers.integrations.moe" not in sys.modules
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            analysis = engine.analyze({str(mixtral_pt2)!r})
        assert "transformers.integrations.moe" in sys.modules
        print([str(w.message) for w in caught])
        print(len(analysis.groups))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr
    assert "imported transformers.integrations.moe" in done.stdout
    assert "transformers.grouped_mm_fallback" in done.stdout


def test_unknown_custom_op_namespace_is_refused_in_one_line(mixtral_pt2, tmp_path, capfd):
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(mixtral_pt2) as source, zipfile.ZipFile(bad, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("models/model.json"):
                data = data.replace(b"torch.ops.transformers.", b"torch.ops.evilpkg.")
            target.writestr(info, data)
    rc, _out, err = cli(capfd, "prune", bad, "--ratio", "0.5", "--out", tmp_path / "o")
    line = one_error_line(err)
    assert rc == 2
    assert "evilpkg.grouped_mm_fallback" in line and "imports nothing else" in line
    assert "evilpkg" not in sys.modules


@pytest.mark.parametrize("value", ["1", "-0.1", "abc", "1.5"])
def test_bad_expert_ratio_is_one_line(tiny_pt2, tmp_path, capfd, value):
    rc, _out, err = cli(capfd, "prune", tiny_pt2, "--expert-ratio", value, "--out", tmp_path)
    assert rc == 2
    assert "--expert-ratio" in one_error_line(err)


def test_expert_ratio_on_a_model_without_experts_is_one_line(tiny_pt2, tmp_path, capfd):
    rc, _out, err = cli(capfd, "prune", tiny_pt2, "--expert-ratio", "0.5", "--out", tmp_path)
    assert rc == 2
    assert "no routed experts" in one_error_line(err)


class SharedExpertGate(nn.Module):
    """Qwen2-MoE's shared expert: a one-output gate, sigmoid, times the expert's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(8, DIM)
        self.gate = nn.Linear(DIM, 1, bias=False)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + torch.sigmoid(self.gate(h)) * self.down(F.relu(self.up(h))))


def test_a_one_channel_gate_does_not_fuse_the_stream_it_scales():
    model = SharedExpertGate().eval()
    x = _tokens()
    analysis = engine.analyze(model, (x,))
    (stream,) = [g for g in analysis.groups if "inp" in g.layers]
    assert stream.channels == DIM  # not one channel fused with the gate's single output
    assert any("gate" in f.layers and "broadcast" in f.reason for f in analysis.frozen)
    result = engine.apply(analysis, engine.plan(analysis, ratios={stream.name: 0.5}))
    assert result.report["verification"]["exact"]
    assert_equals_mask_mode(result)
    (pruned,) = [g for g in result.report["groups"] if "inp" in g["layers"]]
    assert 0 < len(pruned["pruned"]) < DIM
    kept = pruned["kept"]
    reference = SharedExpertGate().eval()
    with torch.no_grad():  # independent mask mode: the stream's dropped channels zeroed
        dropped = [c for c in range(DIM) if c not in kept]
        for layer in (reference.inp, reference.down):
            layer.weight[dropped] = 0
            layer.bias[dropped] = 0
        torch.testing.assert_close(result.module(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_group_limited_routing_refuses_expert_removal_in_one_line():
    def build():
        config = tf.DeepseekV3Config(
            hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
            q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, vocab_size=100, use_cache=False)
        return tf.DeepseekV3ForCausalLM(config)

    analysis = engine.analyze(_program(build))
    with pytest.raises(engine.PruneScopeError, match="cannot be removed") as caught:
        engine.prune(analysis, expert_ratio=0.5)
    assert "\n" not in str(caught.value)
    assert engine.prune(analysis, ratio=0.5).report["verification"]["output_shapes_match"]
