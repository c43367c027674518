"""The sidebar: model source, calibration/evaluation data and the pruning options."""

from __future__ import annotations

import os
import re

import numpy as np
import streamlit as st

from dashboard import sources, state
from dashboard.common import EVAL_KEY, session_files, upload_limit_mb, upload_limit_note
from engine.device import available_devices
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
    choices_help,
)
from engine.quality.evaluate import check_data

DEFAULTS = PruningOptions()
DEFAULT_RATIO = 0.5
OPTION_NAMES = ("criterion", "policy", "layer_norm", "group_policy", "reshape_channel_axis",
                "step_size", "step_op", "seed")

HELP = {
    "criterion": "How a channel's raw importance is measured: "
    + choices_help(CRITERION_TABLE)
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
_EVAL_PROBLEM = "_ps_eval_problem"
_UNIFORM_FOR = "_ps_uniform_for"


def sidebar_device() -> str:
    """Where the model runs (engine.device); a select only when this machine has a choice."""
    devices = available_devices()
    if len(devices) == 1:
        return devices[0]
    return st.sidebar.selectbox("Device", devices, key="device",
                                help="Where scoring on data, verification, evaluation and "
                                     "recovery run. Capture and slicing stay on the CPU.")


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
                       "you trust.", icon=":material/lock_open:")
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
        key = f"upload:{up.file_id}:{model.key}"  # tokenized for and checked against this model
        if cached is None or cached[0] != key:
            data, problem = None, None
            try:
                data = sources.load_upload(up.getvalue(), up.name, model=model.captured)
                check_data(model.captured, data)
            except Exception as e:
                problem = eval_data_problem(e, up.name, model, data is not None)
                data = None
            ss[EVAL_KEY] = cached = (key, data)
            ss[_EVAL_PROBLEM] = problem
        if cached[1] is not None:
            return cached[1]
        if ss.get(_EVAL_PROBLEM):
            st.sidebar.error(ss[_EVAL_PROBLEM], icon=":material/warning:")
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


def eval_data_problem(error: BaseException, name: str, model: state.LoadedModel,
                      loaded: bool) -> str:
    """One line for data that cannot be read, or that does not fit the model."""
    builtin = model.key.split(":", 1)[0] if model.key.startswith(("demo:", "demo-lm:")) else ""
    instead = (f" The {builtin} evaluation set is used instead." if builtin else
               " No evaluation data is used.")
    if not loaded:
        return f"{name} cannot be read: {sources.one_line(error)}.{instead}"
    return (f"{name} does not fit {model.label}: {sources.one_line(error)}. It is not "
            f"used.{instead}")


def index_example(analysis) -> str:
    """A valid line for criterion index on this model: one filter of the first prunable layer
    from each block it must keep equal (grouped layers and heads), or three filters."""
    for g in analysis.groups:
        if not g.layers or not g.prunable.any():
            continue
        layer = g.layers[-1] if len(g.layers) == 1 else g.layers[0]
        slots = g.slots[layer]
        if g.block_index is not None:
            channels = [int(row[0]) for row in g.block_index]
        else:
            channels = [int(c) for c in np.flatnonzero(g.prunable)[:3]]
        if not all(g.prunable[c] for c in channels) or len(channels) >= g.channels:
            continue
        filters = sorted({int(slots.slot_index[slots.channel == c][0]) for c in channels
                          if (slots.channel == c).any()})
        if filters:
            return f"{layer}: {', '.join(map(str, filters))}"
    return "layer: 0, 3, 5"


def _fill_index_example(example: str) -> None:
    st.session_state["opt_indices"] = example


def sidebar_options(analysis=None) -> tuple[PruningOptions, float, str]:
    st.sidebar.header("Pruning options")
    sb = st.sidebar
    # Defaults go into the session state, not into the widgets: a chosen comparison point
    # sets these keys, and a widget given both a default and a state value makes Streamlit
    # log a warning on every such click.
    ss = st.session_state
    for name in OPTION_NAMES:
        ss.setdefault(f"opt_{name}", getattr(DEFAULTS, name))
    ss.setdefault("opt_ratio", DEFAULT_RATIO)

    def select(label: str, values: tuple, name: str):
        return sb.selectbox(label, values, key=f"opt_{name}", help=HELP[name])

    # the ratio first: at 1440x900 it stays above the sidebar's fold
    ratio = sb.slider("Pruning ratio", min_value=0.0, max_value=0.95, step=0.01,
                      key="opt_ratio", help=HELP["ratio"])
    criterion = select("Criterion", CRITERIA, "criterion")
    policy = select("Policy", POLICIES, "policy")
    layer_norm = select("Layer norm", LAYER_NORMS, "layer_norm")
    group_policy = select("Group policy", GROUP_POLICIES, "group_policy")
    axis = select("Reshape channel axis", RESHAPE_CHANNEL_AXES, "reshape_channel_axis")
    step_size = sb.number_input("Step size", min_value=1, max_value=1024, step=1,
                                key="opt_step_size", help=HELP["step_size"])
    step_op = select("Step op", STEP_OPS, "step_op")
    seed = sb.number_input("Seed", min_value=0, step=1, key="opt_seed", help=HELP["seed"])
    indices_text = ""
    if criterion == "index":
        example = index_example(analysis) if analysis is not None else "layer: 0, 3, 5"
        indices_text = sb.text_area(
            "Channel indices to remove", key="opt_indices",
            placeholder=example,
            help="Criterion 'index': one line per layer, 'layer: i, j, k' (filter indices of "
            "that layer). Layer names are in the Plan tab. A layer that feeds grouped layers "
            "or attention heads must lose the same number of filters in every block.",
        )
        sb.button(f"Use the example ({example})", key="opt_indices_example",
                  on_click=_fill_index_example, args=(example,))
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

