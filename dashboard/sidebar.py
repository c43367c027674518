"""The sidebar: model source, calibration/evaluation data and the pruning options."""

from __future__ import annotations

import os
import re

import streamlit as st

from dashboard import sources, state
from dashboard.common import EVAL_KEY, session_files, show_error, upload_limit_mb, upload_limit_note
from engine.errors import PruneScopeError
from engine.io.data import DataSet
from engine.options import (
    CRITERIA,
    CRITERIA_NEEDING_DATA,
    CRITERION_TABLE,
    GROUP_POLICIES,
    LAYER_NORMS,
    POLICIES,
    RESHAPE_CHANNEL_AXES,
    STEP_OPS,
    PruningOptions,
)

DEFAULTS = PruningOptions()
DEFAULT_RATIO = 0.5

HELP = {
    "criterion": "How a channel's raw importance is measured: "
    + "; ".join(f"{c.name} = {c.help}" for c in CRITERION_TABLE)
    + f". {', '.join(CRITERIA_NEEDING_DATA)} need calibration data.",
    "policy": "How the members of a connected group (e.g. the convs feeding a residual add) "
    "are combined into one score per channel: sum or average of their normalized scores, "
    "or backward = normalize the sum of the raw scores (the post-residual feature map).",
    "layer_norm": "Makes layers comparable before the global ranking: standard_score (z-score), "
    "tss_norm (divide by the sum), linear_scaling (min-max to 0..1), softmax_norm, or none "
    "(compare raw scores).",
    "group_policy": "Grouped convolutions and head reshapes must keep the same number of "
    "channels per block: sum/average score an in-block index over all blocks; count removes "
    "the smallest per-block count under the cut; none removes the same number per block.",
    "reshape_channel_axis": "For a channel split into (blocks, size), e.g. 12 heads × 64: "
    "-1/1 prune inside every block, -2/0 prune whole blocks (heads).",
    "step_size": "The number of channels kept in each group is aligned to a multiple of this "
    "(hardware-friendly sizes); 1 disables alignment.",
    "step_op": "How the kept count is aligned to the step size: round, round_up, round_down, or "
    "none (no alignment).",
    "ratio": "Fraction of all prunable channels to remove, ranked together across layers by "
    "normalized score (0 ≤ ratio < 1). Groups with their own ratio in the Plan tab use that.",
    "seed": "Seed of the random criterion (and any other seeded choice).",
    "uniform": "Every repeated layer of the same kind (layer 0's MLP, layer 1's MLP, …) loses "
    "the same number of channels: the ranking's total for the kind is spread evenly, and each "
    "layer still drops its own lowest-scoring channels. A transformers config has one size per "
    "kind of layer, so only such a plan gives a standard config: with it the Prune step also "
    "writes hf/, a folder transformers loads with from_pretrained (offered as a zip). On by "
    "default for transformers models (a Hugging Face folder); the built-in demo-lm is a .pt2, "
    "load its folder assets/demo_lm by path for hf/.",
}
UNIFORM_KEY = "opt_uniform"
_UNIFORM_FOR = "_ps_uniform_for"


def sidebar_model() -> sources.ModelRequest | None:
    """Model source widgets; returns the request to load (None while waiting for a file)."""
    st.sidebar.header("Model")
    initial = os.environ.get("PRUNESCOPE_MODEL", "demo")
    if initial != "demo" and "source" not in st.session_state:
        # `prunescope dashboard MODEL` opens on that file
        st.session_state["source"] = sources.LOCAL_PATH
        st.session_state["local_path"] = initial
    source = st.sidebar.radio(
        "Model source",
        sources.SOURCES,
        key="source",
        help="Start with the built-in demo; bring your own model as a torch.export .pt2 "
        "(upload or path on this machine), or a pickled .pt if you trust it.",
    )
    limit = upload_limit_mb()
    files = session_files()
    if source == sources.DEMO:
        st.sidebar.caption("A small digit classifier (8×8 images) with residual, grouped, "
                           "depthwise and attention blocks, plus its own evaluation set.")
        return sources.demo_request()
    if source == sources.DEMO_LM:
        st.sidebar.caption("A small byte-level Llama (RMSNorm, rotary embeddings, grouped-query "
                           "attention, SwiGLU) trained on Python source, with its own held-out "
                           "text: the quality measure is perplexity.")
        return sources.demo_lm_request()
    if source == sources.UPLOAD_PT2:
        up = st.sidebar.file_uploader(
            "Model file (.pt2)", type=["pt2"], key="upload_pt2",
            help="A program saved with torch.export.save.",
        )
        upload_limit_note(limit)
        if up is None:
            return None
        path = files.store_upload(up.file_id, up.name, up)
        return sources.path_request(path, label=f"upload {up.name}", shown_as=up.name)
    if source == sources.LOCAL_PATH:
        raw = st.sidebar.text_input(
            "Path to a model file or Hugging Face folder on this machine", key="local_path",
            placeholder="/models/resnet50.pt2",
            help="Read in place, never copied: for models too large to upload. A folder holds "
                 "config.json and *.safetensors, as save_pretrained writes them.",
        )
        trust = False
        shapes = None
        if raw.strip().lower().endswith((".pt", ".pth")):
            trust = st.sidebar.checkbox(
                "I trust this file: loading a .pt pickle runs code from it",
                key="trust_path_pickle",
            )
            shapes_text = st.sidebar.text_input(
                "Input shape(s)", key="path_shapes", placeholder="1,3,224,224",
                help="One shape per model input, ';' between inputs.",
            )
            shapes = sources.parse_shapes(shapes_text) if trust and shapes_text.strip() else None
        if not raw.strip():
            return None
        return sources.path_request(raw, trust_pickle=trust, input_shapes=shapes)
    # Pickled .pt upload: needs explicit trust and the input shapes.
    st.sidebar.warning("A .pt pickle can run arbitrary code when loaded. Only load files "
                       "you trust.", icon="🔓")
    trust = st.sidebar.checkbox("I trust this file: loading a .pt pickle runs code from it",
                                key="trust_pickle")
    shapes_text = st.sidebar.text_input(
        "Input shape(s)", key="pt_shapes", placeholder="1,3,224,224",
        help="One shape per model input (batch first), ';' between inputs.",
    )
    up = st.sidebar.file_uploader("Model file (.pt)", type=["pt", "pth"], key="upload_pt",
                                  disabled=not trust)
    upload_limit_note(limit)
    if up is None or not trust:
        return None
    shapes = sources.parse_shapes(shapes_text)
    path = files.store_upload(up.file_id, up.name, up)
    return sources.path_request(path, trust_pickle=True, input_shapes=shapes,
                                label=f"upload {up.name}", shown_as=up.name)


def sidebar_eval(model: state.LoadedModel) -> DataSet | None:
    up = st.sidebar.file_uploader(
        "Calibration / evaluation data (optional)", type=sources.upload_types(),
        key="upload_eval",
        help="An .npz with 'x' (model inputs, samples on the first axis) and optional integer "
        "labels 'y', or text: .txt (one sample a line), .jsonl/.json/.csv/.tsv/.parquet with "
        "a 'text' and an optional 'label' field, tokenized with the model's tokenizer. Used "
        "by the nuclear_norm and data-aware criteria and for the before/after fidelity. "
        "The demo brings its own.",
    )
    ss = st.session_state
    cached = ss.get(EVAL_KEY)
    if up is not None:
        key = f"upload:{up.file_id}:{model.key}"  # text is tokenized for this model
        if cached is None or cached[0] != key:
            try:
                data = sources.load_upload(up.getvalue(), up.name, model=model.captured)
            except Exception as e:
                show_error(e)
                data = None
            ss[EVAL_KEY] = cached = (key, data)
        if cached[1] is not None:
            return cached[1]
    if model.key.startswith("demo:"):
        key = "demo"
        if cached is None or cached[0] != key:
            ss[EVAL_KEY] = cached = (key, sources.builtin_eval(key))
        return cached[1]
    if model.key.startswith("demo-lm:"):
        key = "demo-lm"
        if cached is None or cached[0] != key:
            ss[EVAL_KEY] = cached = (key, sources.builtin_eval(key))
        return cached[1]
    return None


def sidebar_options() -> tuple[PruningOptions, float, str]:
    st.sidebar.header("Pruning options")
    sb = st.sidebar

    def select(label: str, values: tuple, name: str):
        default = getattr(DEFAULTS, name)
        return sb.selectbox(label, values, index=values.index(default), key=f"opt_{name}",
                            help=HELP[name])

    criterion = select("Criterion", CRITERIA, "criterion")
    policy = select("Policy", POLICIES, "policy")
    layer_norm = select("Layer norm", LAYER_NORMS, "layer_norm")
    group_policy = select("Group policy", GROUP_POLICIES, "group_policy")
    axis = select("Reshape channel axis", RESHAPE_CHANNEL_AXES, "reshape_channel_axis")
    step_size = sb.number_input("Step size", min_value=1, max_value=1024,
                                value=DEFAULTS.step_size, step=1, key="opt_step_size",
                                help=HELP["step_size"])
    step_op = select("Step op", STEP_OPS, "step_op")
    ratio = sb.slider("Pruning ratio", min_value=0.0, max_value=0.95, value=DEFAULT_RATIO,
                      step=0.01, key="opt_ratio", help=HELP["ratio"])
    seed = sb.number_input("Seed", min_value=0, value=DEFAULTS.seed, step=1, key="opt_seed",
                           help=HELP["seed"])
    indices_text = ""
    if criterion == "index":
        indices_text = sb.text_area(
            "Channel indices to remove", key="opt_indices",
            placeholder="block1.conv1: 0, 3, 5",
            help="Criterion 'index': one line per layer, 'layer: i, j, k' (filter indices of "
            "that layer). Layer names are in the Plan tab.",
        )
    options = PruningOptions(
        criterion=criterion, policy=policy, layer_norm=layer_norm, group_policy=group_policy,
        reshape_channel_axis=int(axis), step_size=int(step_size), step_op=step_op,
        seed=int(seed),
    )
    return options, float(ratio), indices_text


def sidebar_uniform(model: state.LoadedModel, criterion: str) -> bool:
    """The "uniform" switch; its default follows the model (on for transformers models)."""
    ss = st.session_state
    if ss.get(_UNIFORM_FOR) != model.key:  # a new model: start from its own default
        ss[UNIFORM_KEY] = model.captured.hf is not None
        ss[_UNIFORM_FOR] = model.key
    explicit = criterion == "index"  # named removals cannot be evened out
    on = st.sidebar.toggle("Same count per repeated layer (uniform)", key=UNIFORM_KEY,
                           help=HELP["uniform"], disabled=explicit)
    if explicit and on:
        st.sidebar.caption("Uniform counts do not apply to criterion index (named channels).")
    return bool(on) and not explicit


def parse_indices(text: str) -> dict[str, list[int]] | None:
    """``layer: 0, 3, 5`` lines to {layer: [0, 3, 5]}; None when empty."""
    out: dict[str, list[int]] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        name, sep, rest = line.rpartition(":")
        if not sep or not name.strip():
            raise PruneScopeError(f"bad indices line {line.strip()!r}: use 'layer: 0, 3, 5'")
        try:
            out[name.strip()] = [int(v) for v in re.split(r"[,\s]+", rest.strip()) if v]
        except ValueError:
            raise PruneScopeError(
                f"bad indices line {line.strip()!r}: indices must be integers"
            ) from None
    return out or None

