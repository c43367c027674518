"""What several `prunescope` commands share: model and option flags, parsing helpers, the
progress line and the frozen-layer report."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine.errors import OptionError
from engine.options import (
    CRITERIA,
    CRITERIA_NEEDING_DATA,
    CRITERION_TABLE,
    GROUP_POLICIES,
    LAYER_NORMS,
    METRICS,
    POLICIES,
    RESHAPE_CHANNEL_AXES,
    STEP_OPS,
    TEXT_MODES,
    PruningOptions,
    choices_help,
)

# exit statuses of the prunescope command (0: success)
EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_ONNX_FAILED = 3


DATA_FORMS_HELP = (".npz/.npy arrays, text (.txt one sample a line, .jsonl/.json, .csv/.tsv/"
                   ".parquet), a datasets save_to_disk folder, hf:NAME[:CONFIG]:SPLIT, a folder "
                   "of images, or a built-in name (demo, demo-lm)")


DEFAULT_METRIC_HELP = ("default: what fits the model: accuracy with labels, perplexity for a "
                       "causal language model, embedding metrics for an encoder's hidden "
                       "states, else agreement with the reference")
METRIC_HELP = f"one of {', '.join(METRICS)} ({DEFAULT_METRIC_HELP})"


# One definition of each flag that several commands take; a command adds only what is its
# own (required=True, a default, its own help) through `add_flag`.
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "--calibration": {"metavar": "FILE", "help": "data for nuclear_norm, the data-aware "
                      f"criteria and recovery (never the evaluation set): {DATA_FORMS_HELP}"},
    "--eval-data": {"metavar": "FILE",
                    "help": f"held-out data, never the calibration set: {DATA_FORMS_HELP}"},
    "--metric": {"help": METRIC_HELP},
    "--step-size": {"default": "2", "help": "kept channels align to this (>= 1)"},
    "--seed": {"default": "0", "help": "seed of the random criterion"},
    "--workers": {"metavar": "N", "help": "local processes (default: number of cores)"},
    "--ray": {"metavar": "ADDRESS",
              "help": "run on a Ray cluster (HOST:PORT), or `local` to start one"},
}


def add_flag(p: argparse.ArgumentParser | Any, flag: str, **own: Any) -> None:
    """`flag` as SHARED_FLAGS defines it, with this command's `own` settings on top."""
    p.add_argument(flag, **{**SHARED_FLAGS[flag], **own})


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model to load and how to load it."""
    p.add_argument("model", help="'demo', a .pt2 file, a Hugging Face model folder "
                   "(config.json + *.safetensors), or a .pt pickle (with --trust-pickle)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a .pt pickle (unpickling runs code from the file)")
    p.add_argument("--input-shape", action="append", default=[], metavar="1,3,224,224",
                   help="shape of an example input (repeat for several inputs)")
    p.add_argument("--seq-len", default=None, metavar="N",
                   help="tokens in the example inputs of a model folder's text model "
                        "(default 32)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the model runs (verification, data-aware scoring, evaluation, "
                        "recovery): cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--amp", default=None, metavar="DTYPE",
                   help="calibration passes in autocast: bf16 or fp16 (default: full "
                        "precision)")


def device_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """--device and --amp for engine calls that hand them on to workers (sweeps)."""
    return {"device": getattr(args, "device", None), "amp": getattr(args, "amp", None)}


def criterion_help() -> str:
    """--criterion's help, from the one criterion table (engine.options.CRITERION_TABLE)."""
    return (f"one of {', '.join(CRITERIA)} ({choices_help(CRITERION_TABLE)}); "
            f"{', '.join(CRITERIA_NEEDING_DATA)} need --calibration")


def add_option_args(p: argparse.ArgumentParser) -> None:
    """The pruning options of the spec (one value each)."""
    add_flag(p, "--calibration")
    p.add_argument("--indices", metavar="FILE.json",
                   help="criterion index: {layer: [filter indices to remove]}")
    p.add_argument("--criterion", default="l2", help=criterion_help())
    p.add_argument("--policy", default="average", help=f"one of {', '.join(POLICIES)}")
    p.add_argument("--layer-norm", default="standard_score",
                   help=f"one of {', '.join(LAYER_NORMS)}")
    p.add_argument("--group-policy", default="average",
                   help=f"one of {', '.join(GROUP_POLICIES)}")
    p.add_argument("--reshape-channel-axis", default="-1",
                   help=f"one of {', '.join(str(a) for a in RESHAPE_CHANNEL_AXES)}")
    add_flag(p, "--step-size")
    p.add_argument("--step-op", default="round", help=f"one of {', '.join(STEP_OPS)}")
    add_flag(p, "--seed")


def calibration_from(path: str | None, model: Any = None,
                     args: argparse.Namespace | None = None) -> Any:
    """--calibration (a file, folder or built-in name) read by the data loader: inputs, plus
    labels y when the data has them (the taylor criterion uses them). Text and images need
    the captured `model`; `args` carry the data options."""
    if path is None:
        return None
    from engine.io.data import load_calibration_data

    return load_calibration_data(path, model=model, options=data_options(args))


def add_data_args(p: argparse.ArgumentParser, *, max_samples: bool = True) -> None:
    """How text and images become the model's inputs (engine/io/data.py)."""
    g = p.add_argument_group("data forms (text, datasets, images)")
    g.add_argument("--text-field", metavar="NAME",
                   help="field/column holding the text in .jsonl/.json/.csv/.tsv/.parquet and "
                        "datasets (default: text)")
    g.add_argument("--label-field", metavar="NAME",
                   help="field/column holding the optional label (default: label)")
    g.add_argument("--text-mode", default="pad",
                   help=f"one of {', '.join(TEXT_MODES)}: pad = one sample per line/record, "
                        "padded or truncated to the sequence length; stream = all text "
                        "concatenated and cut into --seq-len windows (causal-LM perplexity)")
    g.add_argument("--tokenizer", metavar="FOLDER",
                   help="a folder holding the tokenizer, for a model without one (.pt2, module)")
    if max_samples:
        g.add_argument("--max-samples", metavar="N",
                       help="a seeded random subset of N samples of each data set")
    g.add_argument("--image-size", metavar="H,W",
                   help="resize images to H,W (models without an image processor)")
    g.add_argument("--mean", metavar="M[,M,M]", help="per-channel mean of pixels in [0, 1]")
    g.add_argument("--std", metavar="S[,S,S]", help="per-channel std of pixels in [0, 1]")


def data_options(args: argparse.Namespace | None) -> Any:
    """engine.io.data.DataOptions from the data flags (defaults where a command has none)."""
    from engine.io.data import DataOptions

    if args is None:
        return DataOptions()

    def floats(flag: str, value: str | None) -> tuple[float, ...] | None:
        if value is None:
            return None
        try:
            return tuple(float(v) for v in value.split(","))
        except ValueError:
            raise OptionError(f"option {flag}={value!r} must be comma-separated numbers") \
                from None

    size = floats("--image-size", getattr(args, "image_size", None))
    if size is not None and (len(size) not in (1, 2) or any(v < 1 or v != int(v) for v in size)):
        raise OptionError(f"option --image-size={args.image_size!r} must be H,W (or one "
                          "size), positive integers")
    max_samples = getattr(args, "max_samples", None)
    seq_len = getattr(args, "seq_len", None)
    seed = getattr(args, "seed", None)
    return DataOptions(
        text_field=getattr(args, "text_field", None),
        label_field=getattr(args, "label_field", None),
        text_mode=getattr(args, "text_mode", None) or "pad",
        seq_len=None if seq_len is None else int_option("seq-len", seq_len),
        tokenizer=getattr(args, "tokenizer", None),
        max_samples=None if max_samples is None else int_option("max-samples", max_samples),
        seed=0 if seed is None else int_option("seed", seed),
        image_size=None if size is None else (int(size[0]), int(size[-1])),
        mean=floats("--mean", getattr(args, "mean", None)),
        std=floats("--std", getattr(args, "std", None)),
    )


def model_for_data(args: argparse.Namespace, model: Any, *sources: str | None) -> Any:
    """The model, captured now when one of the data `sources` is text, images or a
    dataset (turning them into inputs needs its tokenizer and inputs); else unchanged."""
    from engine.io.data import needs_model

    if any(s is not None and needs_model(s) for s in sources):
        import engine

        return engine.load_model(model, **load_kwargs(args))
    return model


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Held-out data to measure the model on, and the metric."""
    add_flag(p, "--eval-data")
    add_flag(p, "--metric")


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """How `engine` loads the model named on the command line."""
    seq_len = getattr(args, "seq_len", None)
    if seq_len is not None:
        seq_len = int_option("seq-len", seq_len)
        if seq_len < 1:
            raise OptionError(f"option --seq-len={seq_len} must be an integer >= 1")
    kwargs = {"trust_pickle": args.trust_pickle, "input_shapes": shapes(args.input_shape) or None}
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    return kwargs


def options_from_args(args: argparse.Namespace) -> PruningOptions:
    axis = args.reshape_channel_axis
    try:
        axis = int(axis)
    except ValueError:
        pass
    step_size = int_option("step-size", args.step_size)
    seed = int_option("seed", args.seed)
    return PruningOptions(
        criterion=args.criterion, policy=args.policy, layer_norm=args.layer_norm,
        group_policy=args.group_policy, reshape_channel_axis=axis, step_size=step_size,
        step_op=args.step_op, seed=seed,
    )


def int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        least = 1 if name in ("step-size", "seq-len") else 0
        raise OptionError(
            f"option --{name}={value!r} is not an integer; allowed: an integer >= {least}"
        ) from None


def shapes(values: list[str]) -> list[tuple[int, ...]]:
    result = []
    for value in values:
        try:
            shape = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise OptionError(
                f"--input-shape {value!r} must be comma-separated integers, e.g. 1,3,224,224"
            ) from None
        if not shape or any(s < 1 for s in shape):
            raise OptionError(f"--input-shape {value!r} must have positive sizes")
        result.append(shape)
    return result


def read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise OptionError(f"{what} file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise OptionError(f"{what} file {path} is not valid JSON: {exc}") from None


def indices_from(path: str | None) -> dict[str, list[int]] | None:
    if path is None:
        return None
    data = read_json(path, "--indices")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise OptionError(f"--indices file {path} must hold a JSON object {{layer: [indices]}}")
    return data


class Progress:
    """A progress line on a terminal; silent otherwise."""

    def __init__(self, steps: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, file=sys.stderr, leave=False, bar_format="{l_bar}{bar}")

    def __call__(self, message: str) -> None:
        if self.bar is not None:
            self.bar.set_description(message)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def report_frozen(frozen: list[dict]) -> None:
    for item in frozen:
        print(f"frozen: {', '.join(item['layers'])}: {item['reason']}", file=sys.stderr)
