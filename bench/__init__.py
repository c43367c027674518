"""PruneScope benchmarks: ``python -m bench`` (or ``make bench``) runs them all.

One module per benchmark, each with ``NAME``, ``TITLE`` and ``run(quick) -> Section``:

- ``e2e``: end to end against Torch-Pruning on ResNet-50, ViT-B/16 and BERT-base
- ``rerank``: re-planning from cached raw scores (ResNet-50 and a 1,000+ layer model)
- ``scaling``: Llama-style models at 4, 8 and 16 layers, time and peak memory
- ``latency``: CPU latency of original and pruned ResNet-50, ViT-B/16, BERT-base and a
  Llama-style model at step sizes 1, 8, 64 (torch eager, ONNX Runtime)
- ``coverage``: the zoo and transformers models through both tools
- ``quality``: demo accuracy per criterion x recovery x ratio (held-out data)
- ``sweep``: the demo's option sweep, sensitivity and automatic per-group ratios
- ``depth``: depth vs width pruning at equal parameter counts, batch-1 CPU latency
- ``coverage_v2``: about seventy real architectures (tiny configs) pruned, verified, exported
- ``hf_uniform``: Hugging Face folders pruned with and without ``--uniform`` (parameters,
  demo-lm held-out perplexity) and which architectures round-trip through OUT/hf/
- ``hf``: every transformers architecture of the coverage set saved as a folder and pruned
  with ``--uniform``: hf/ written or why not, parameters removed
- ``real``: a real pretrained sentence encoder (all-MiniLM-L6-v2) on Python's own docs text:
  FLOPs removed vs held-out embedding cosine / nearest-neighbour agreement per recovery
  method, and each pass against a plain batched forward
- ``large``: bf16 Llama-style 0.85 B and 3B-shaped `.pt2` files pruned by the CLI vs the floor
- ``large_hf``: a Llama-2-7B-shaped bf16 folder (13.5 GB) pruned streamed (`--stream`) vs the
  floor of reading and writing its shards

Wall-clock numbers live here and in ``bench/RESULTS.md``, never as assertions in tests.
"""

BENCHMARKS = (
    "e2e",
    "rerank",
    "scaling",
    "latency",
    "coverage",
    "depth",
    "quality",
    "sweep",
    "large",
    "large_hf",
    "coverage_v2",
    "hf_uniform",
    "hf",
    "real",
)
