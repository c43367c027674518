"""Streamed pruning of a folder larger than memory (engine/stream.py): Llama-style folders
written with save_pretrained in several shards, pruned with --uniform --ratio 0.3 both ways;
the streamed hf/ must hold the normal path's weights and give its logits, and a child process
pruning a bigger folder must stay well under the model's size in resident memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import engine
from engine.errors import ModelLoadError
from engine.io.hf_config import rotary_heads
from engine.io.shards import ShardSet
from engine.io.staging import OWNER_FILE
from engine.stream import prune_streamed, should_stream
from tests.helpers import ROOT, cli, one_error_line


def _llama(folder, *, hidden, intermediate, layers, heads, kv_heads, vocab, shard):
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, vocab_size=vocab,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).eval().save_pretrained(folder, max_shard_size=shard)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A 3-layer folder in many shards, pruned the normal way and streamed."""
    root = tmp_path_factory.mktemp("stream")
    src = _llama(root / "src", hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2,
                 vocab=100, shard="40KB")
    # streamed mode keeps the rotary query/key pairs whole; the normal path, told the same,
    # must then give the same tensors
    analysis = engine.analyze(str(src))  # one capture: read for the pairs, then pruned
    pairs = rotary_heads(analysis).group
    result = engine.prune(analysis, ratio=0.3, uniform=True, pinned=[pairs])
    engine.save(result, root / "normal", onnx=False)
    report = prune_streamed(src, root / "stream", ratio=0.3)
    return src, root / "normal" / "hf", root / "stream", report


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_streamed_hf_holds_the_normal_paths_weights_in_the_input_layout(pruned):
    src, normal, stream, report = pruned
    want, got = _tensors(normal), _tensors(stream / "hf")
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 3
    assert sorted(p.name for p in (stream / "hf").glob("*.safetensors")) == shards
    index = json.loads((stream / "hf" / "model.safetensors.index.json").read_text())
    source_index = json.loads((src / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in got.values())
    config = json.loads((stream / "hf" / "config.json").read_text())
    normal_config = json.loads((normal / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        assert config.get(key) == normal_config.get(key), key
    assert config["hidden_size"] < 64 and config["intermediate_size"] < 128
    assert (stream / "hf" / "tokenizer.json").is_file()
    assert report["hf"]["carried"] == ["generation_config.json", "tokenizer.json"]
    assert not list(stream.glob("model.pt2")) and "model.pt2" in report["pt2"]


def test_streamed_hf_reloads_with_the_normal_paths_logits(pruned):
    _, normal, stream, _ = pruned
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = []
    for folder in (normal, stream / "hf"):
        model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert logits[0].shape == (2, 12, 100)
    assert torch.equal(logits[0], logits[1])


def test_report_sizes_and_block_verification(pruned, tmp_path):
    src, _, stream, report = pruned
    saved = json.loads((stream / "report.json").read_text())
    assert saved["mode"] == "streamed"
    normal = json.loads((stream.parent / "normal" / "report.json").read_text())
    assert saved["before"] == normal["before"] and saved["after"] == normal["after"]
    # layer 1 of a 2-layer capture repeated onto layer 2 (engine/graph/repeat.py) gives the
    # normal path's plan, captured with all layers
    assert saved["capture"] == {"layers": 3, "captured_layers": 2,
                                "repeated_from": "model.layers.1"}
    assert [(g["name"], g["kept"], g["pruned"]) for g in saved["groups"]] == [
        (g["name"], g["kept"], g["pruned"]) for g in normal["groups"]]
    assert saved["after"]["params"] < 0.75 * saved["before"]["params"]
    v = saved["verification"]
    assert v["blocks"] == 3 and [b["block"] for b in v["per_block"]] == [0, 1, 2]
    # the hidden size is pruned and RMSNorm normalises over it: not exact by design, as in
    # the normal path's verification
    assert v["exact_expected"] is False and v["inexact_groups"] == normal["verification"][
        "inexact_groups"]
    assert 0 < v["relative_diff_vs_masked"] < 0.5
    # with the hidden size kept, each pruned block must equal its masked original
    kept = prune_streamed(src, tmp_path / "kept", ratio=0.3, pinned=v["inexact_groups"])
    w = kept["verification"]
    assert w["exact_expected"] is True and w["exact"] is True
    assert w["relative_diff_vs_masked"] <= w["tolerance"]
    assert kept["after"]["params"] < kept["before"]["params"]


def test_cli_stream_flag_and_one_line_refusals(pruned, capfd, tmp_path):
    src = pruned[0]
    rc, out, _ = cli(capfd, "prune", src, "--uniform", "--ratio", "0.3", "--stream",
                     "--out", tmp_path / "o")
    assert rc == 0 and "streamed" in out and "3 blocks against mask mode" in out
    assert (tmp_path / "o" / "hf" / "model.safetensors.index.json").is_file()
    for extra, says in ((["--criterion", "random"], "--criterion random"),
                        ([], "--uniform is needed")):
        argv = ["prune", src, "--ratio", "0.3", "--stream", "--out", tmp_path / "p", *extra]
        if extra:
            argv.append("--uniform")
        rc, _, err = cli(capfd, *argv)
        assert rc != 0 and says in one_error_line(err)
    assert not (tmp_path / "p").exists()


def test_scoring_reads_the_shards_backwards_and_writing_forwards(pruned, tmp_path, monkeypatch):
    """Two passes over a model larger than the page cache: the scoring pass reads backwards,
    so the weights it read last (still cached) are the ones the writing pass reads first."""
    src = pruned[0]
    events: list[str] = []
    real_read = ShardSet.read

    def spy(self, key, **how):
        events.append(key)
        return real_read(self, key, **how)

    monkeypatch.setattr(ShardSet, "read", spy)
    # the staging folder a killed run left in OUT goes, as in the normal path
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    left = tmp_path / "o" / ".prunescope-killed"
    left.mkdir(parents=True)
    (left / OWNER_FILE).write_text(json.dumps({"pid": int(dead.stdout), "start": "1"}))
    with pytest.warns(UserWarning, match="removed 1 staging folder.*prunescope-killed"):
        prune_streamed(src, tmp_path / "o", ratio=0.3, progress=lambda msg: events.append(msg))
    assert not left.exists()
    scoring = events.index("scoring (reading the weights one at a time)")
    writing = next(i for i, e in enumerate(events) if e.startswith("writing hf/"))
    stored = ShardSet(src).ordered(ShardSet(src).entries)
    position = {k: i for i, k in enumerate(stored)}
    scored = events[scoring + 1:writing]
    assert len(scored) > 20 and len(set(scored)) == len(scored)
    # two weights are read and scored at once: each read comes before the one two later
    assert all(position[a] > position[b] for a, b in zip(scored, scored[2:]))
    assert position[scored[0]] > len(stored) - 4 and position[scored[-1]] < 3
    written = events[writing + 1:]
    written.remove("model.embed_tokens.weight")  # the block check's example embeddings
    assert written == stored
    assert written[0] in scored[-2:]


def test_the_writing_pass_leaves_the_input_out_of_the_page_cache(tmp_path):
    """Its last read of each weight drops the weight's pages from the page cache (room for
    the weights still to come, where the cache cannot hold the model)."""
    src = _llama(tmp_path / "src", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2,
                 vocab=64, shard="2MB")
    shards = sorted(src.glob("*.safetensors"))
    for path in shards:
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # written just now: clean pages only can leave the cache
            f.read()  # into the page cache
    assert _cached_share(shards) > 0.9
    prune_streamed(src, tmp_path / "out", ratio=0.3)
    # (about half of the pages go in this small folder, none without; why not all is open)
    assert _cached_share(shards) < 0.75


def _cached_share(paths) -> float:
    """The share of the files' pages in the page cache (mincore over a private map: its
    untouched pages are the page cache's)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    cached = total = 0
    for path in paths:
        size = path.stat().st_size
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
            view = (ctypes.c_char * size).from_buffer(m)
            try:
                assert libc.mincore(ctypes.addressof(view), size, vec) == 0, ctypes.get_errno()
            finally:
                del view
        cached += sum(b & 1 for b in vec.raw)
        total += pages
    return cached / total


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_stops_the_streamed_prune_naming_it(tmp_path, bad):
    src = _llama(tmp_path / "src", hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2,
                 vocab=50, shard="5MB")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][5, 7] = bad
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as error:
        prune_streamed(src, tmp_path / "out", ratio=0.3)
    assert str(error.value) == ("the model has NaN or infinite values in "
                                "model.layers.1.mlp.up_proj.weight; fix the weights before "
                                "pruning")
    assert not (tmp_path / "out" / "hf").exists()


def test_auto_streaming_follows_the_available_memory(pruned):
    src = pruned[0]
    size = sum(t.numel() * t.element_size() for t in _tensors(src).values())
    assert should_stream(src, available=int(1.9 * size))
    assert not should_stream(src, available=int(2.1 * size))


_CHILD = """
import sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch, transformers, engine.stream
base = peak()
engine.stream.prune_streamed(sys.argv[1], sys.argv[2], ratio=0.3)
print(base, peak())
"""


def test_streamed_prune_stays_well_under_the_model_size(tmp_path):
    """A 0.2 B-parameter float32 folder (8 layers, 780 MB): the child's resident memory may
    grow by less than 0.75x the model (the normal path grows by about 1.3x)."""
    src = _llama(tmp_path / "src", hidden=1536, intermediate=4096, layers=8, heads=12,
                 kv_heads=4, vocab=1000, shard="100MB")
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, peak = (int(x) for x in proc.stdout.split()[-2:])
    assert peak - base < 0.75 * size, (peak - base, size)
    written = sum(p.stat().st_size for p in (tmp_path / "out" / "hf").glob("*.safetensors"))
    assert 0.5 * size < written < 0.8 * size
