"""The stages of PruneScope as a stack: each module imports only its own stage and those
below it. tests/test_layers.py checks every import of engine/ and dashboard/ against this
table (an import circle, an upward import, a private name taken from another module or an
in-function import of a project module outside the front stage fails the build).

A module belongs to the stage that lists it or, failing that, the package nearest above it
(the longest listed prefix), so the leaf helpers listed under "io" leave the rest of their
package in its own stage. The package `engine` itself (its lazy public names) is front;
every other module must be covered by an entry.
Nothing here is imported at run time; this file is the declaration.
"""

from __future__ import annotations

# lowest first: (stage, module prefixes, what it holds)
LAYERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("base", ("engine.errors", "engine.options", "engine.threads", "engine.layers",
              "engine.device", "engine.offline"),
     "the error hierarchy, the pruning options and their allowed values, the device"),
    ("io", ("engine.graph.safety", "engine.graph.custom_ops", "engine.graph.outputs",
            "engine.graph.inputs", "engine.graph.frequencies", "engine.demo", "engine.io",
            "engine.io.data", "engine.io.hf",
            "engine.io.hf_config", "engine.io.hf_depth", "engine.io.export",
            "engine.io.custom_ops_onnx"),
     "files and formats: model files read safely, data sets, Hugging Face folders and config "
     "rules, .pt2/ONNX/JSON writing, a graph's inputs and outputs; no channel analysis"),
    ("graph", ("engine.graph",),
     "capture and re-capture, op rules, the tracer, channel groups (Structure), blocks"),
    ("scoring", ("engine.scoring",), "criteria, normalisation, plans, the Analysis"),
    ("transform", ("engine.transform",),
     "applying a plan: channels removed or masked, blocks and experts removed"),
    ("metrics", ("engine.quality.metrics",), "params, FLOPs, bytes, latency"),
    ("writers", ("engine.io.hf_export",), "the pruned model as a transformers folder (hf/)"),
    ("pipeline", ("engine.pipeline", "engine.stream"),
     "score, prune (apply + verify + metrics), save; the streamed prune of a big folder"),
    ("quality", ("engine.quality",),
     "evaluation, recovery, sweeps, sensitivity, target searches"),
    ("front", ("engine.cli", "engine.__main__", "dashboard"),
     "the prunescope command, the public `engine` package and the Streamlit dashboard"),
)

# Only the front imports project modules inside functions: `prunescope --help`, `import
# engine` and the dashboard's first paint must not pay for torch.
LAZY_STAGES = ("front",)


def stage_of(module: str) -> str:
    """The stage a dotted module name belongs to (ValueError when none declares it)."""
    if module == "engine":
        return "front"
    matches = [(len(p), name) for name, prefixes, _what in LAYERS for p in prefixes
               if module == p or module.startswith(p + ".")]
    if not matches:
        raise ValueError(f"{module} is in no stage of engine/layers.py")
    return max(matches)[1]


def rank(stage: str) -> int:
    return [name for name, _prefixes, _what in LAYERS].index(stage)
