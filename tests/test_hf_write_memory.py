"""hf/ of the normal (non-streamed) path is written from the pruned module's own tensors:
writing it takes no second copy of the weights (save_pretrained held a fresh model and its
serialised shards besides the pruned module). Measured as the peak resident memory of a
child process, writing a pruned ~70 MB Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import transformers as tf
    import engine
    import engine.io.hf_export as hf_export

    def resident(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    torch.manual_seed(0)
    # 2 layers (the capture's cost) and a large vocabulary (the weights' size, cheap to
    # capture): the embeddings hold most of the bytes
    config = tf.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, vocab_size=16000)
    result = engine.prune(tf.LlamaForCausalLM(config).eval(), ratio=0.3, uniform=True,
                          seq_len=8)
    weights = sum(p.numel() * p.element_size() for p in result.module.parameters())
    peaks = {}
    real_check = hf_export._check

    def check(*args, **kwargs):  # the reload check after writing: its own copy, not counted
        peaks["writing"] = resident("VmHWM")
        return real_check(*args, **kwargs)

    hf_export._check = check
    base = resident("VmRSS")
    reset_peak()
    entry = hf_export.write_hf(result, Path(sys.argv[1]))
    print(json.dumps({"written": entry["written"], "weights": weights,
                      "extra": peaks["writing"] - base}))
""")


@pytest.mark.slow
def test_writing_hf_takes_no_second_copy_of_the_weights(tmp_path: Path):
    script = tmp_path / "write_hf.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["written"]
    assert measured["weights"] > 40 * 2**20
    # save_pretrained's fresh model alone was one more copy (1.0x); the writer holds a
    # tensor at a time
    assert measured["extra"] < 0.25 * measured["weights"], measured
