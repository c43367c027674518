"""Pruning options: names, allowed values and defaults from shared/spec/pruning-options.md."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.errors import OptionError


@dataclass(frozen=True)
class Choice:
    """One allowed value of an option that has a table (criteria, recovery methods): its
    name and the help the CLI and the dashboard show for it."""

    name: str
    help: str


@dataclass(frozen=True)
class Criterion(Choice):
    """A criterion; `needs_data`: it scores on calibration data. Its scoring function is
    registered under the same name in engine/scoring/analysis.py (SCORERS; a test checks
    that both list the same)."""

    needs_data: bool = False


@dataclass(frozen=True)
class RecoveryMethod(Choice):
    """A recovery method; `data_light`: it runs in the shared data-light pass over the
    calibration data (else it trains). Its function is registered under the same name in
    engine/quality/recovery/__init__.py."""

    data_light: bool = False


def choice_names(table: Iterable[Choice], where: Callable[[Choice], bool] | None = None
                 ) -> tuple[str, ...]:
    """The names of a table's entries (those `where` accepts), in table order."""
    return tuple(c.name for c in table if where is None or where(c))


def choices_help(table: Iterable[Choice]) -> str:
    """"name = help; ..." for every entry: the part of a flag's help that lists its values."""
    return "; ".join(f"{c.name} = {c.help}" for c in table)


# the spec's criteria, then the data-aware ones (beyond the spec; they need calibration data)
CRITERION_TABLE: tuple[Criterion, ...] = (
    Criterion("l2", "L2 norm of its filter"),
    Criterion("l1", "L1 norm of its filter"),
    Criterion("gm", "distance to the other filters (redundant filters score low)"),
    Criterion("nuclear_norm", "size of its feature maps on the calibration data",
              needs_data=True),
    Criterion("random", "seeded baseline"),
    Criterion("index", "you name the channels to remove (--indices; charts show l2)"),
    Criterion("activation", "mean |output| on the calibration data", needs_data=True),
    Criterion("wanda", "|weight| x input norm over the weights the channel removes",
              needs_data=True),
    Criterion("taylor", "|weight x gradient| of the loss (labels y when given)",
              needs_data=True),
    Criterion("fluctuation", "variance of the channel's input x squared weights reading it "
              "(FLAP)", needs_data=True),
)
CRITERIA = choice_names(CRITERION_TABLE)
CRITERIA_NEEDING_DATA = choice_names(CRITERION_TABLE, lambda c: c.needs_data)

# in the order the data-light pass applies them at each node
RECOVERY_TABLE: tuple[RecoveryMethod, ...] = (
    RecoveryMethod("bias", "the mean of what a layer's lost inputs carried, into its bias",
                   data_light=True),
    RecoveryMethod("lsq", "least-squares refit of each linear/conv layer that drifted",
                   data_light=True),
    RecoveryMethod("bn", "BatchNorm statistics recomputed where their input changed",
                   data_light=True),
    RecoveryMethod("norm", "LayerNorm/RMSNorm/GroupNorm refitted to the kept channels",
                   data_light=True),
    RecoveryMethod("distill", "knowledge distillation from the original (time budget or "
                              "fixed steps)"),
)
RECOVERY_METHODS = choice_names(RECOVERY_TABLE)
RECOVERY_DATA_LIGHT = choice_names(RECOVERY_TABLE, lambda m: m.data_light)
RECOVERY_AUTO = "auto"  # the data-light methods with something to act on, then distill

POLICIES = ("sum", "average", "backward")
LAYER_NORMS = ("standard_score", "tss_norm", "linear_scaling", "softmax_norm", "none")
GROUP_POLICIES = ("sum", "average", "count", "none")
RESHAPE_CHANNEL_AXES = (0, 1, -1, -2)
STEP_OPS = ("round", "round_up", "round_down", "none")
# What `engine.evaluate` measures (held-out data; see engine/quality/evaluate.py).
# How text data becomes samples (engine/io/data.py): "pad" one sample per line/record, padded
# or truncated to the model's sequence length; "stream" all text concatenated and cut into
# windows of that length (the perplexity protocol of causal language models).
TEXT_MODES = ("pad", "stream")
METRICS = ("accuracy", "perplexity", "agreement", "relative_error", "embedding_cosine",
           "embedding_spearman", "neighbor_agreement")

ALLOWED: dict[str, tuple] = {
    "criterion": CRITERIA,
    "policy": POLICIES,
    "layer_norm": LAYER_NORMS,
    "group_policy": GROUP_POLICIES,
    "reshape_channel_axis": RESHAPE_CHANNEL_AXES,
    "step_op": STEP_OPS,
}


@dataclass(frozen=True)
class PruningOptions:
    criterion: str = "l2"
    policy: str = "average"
    layer_norm: str = "standard_score"
    group_policy: str = "average"
    reshape_channel_axis: int = -1
    step_size: int = 2
    step_op: str = "round"
    seed: int = 0

    def __post_init__(self) -> None:
        axis = self.reshape_channel_axis
        if not isinstance(axis, (bool, str, int)):
            try:
                object.__setattr__(self, "reshape_channel_axis", operator.index(axis))
            except TypeError:
                pass
        if isinstance(axis, str):
            try:
                object.__setattr__(self, "reshape_channel_axis", int(axis.strip()))
            except ValueError:
                raise OptionError(_bad("reshape_channel_axis", axis)) from None
        for name, allowed in ALLOWED.items():
            value = getattr(self, name)
            if isinstance(value, bool) or value not in allowed:
                raise OptionError(_bad(name, value))
        for name in ("step_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            elif not isinstance(value, bool):
                try:
                    value = operator.index(value)  # numpy integers too, never floats
                except TypeError:
                    pass
            object.__setattr__(self, name, value)
            if not isinstance(value, int) or isinstance(value, bool):
                least = 1 if name == "step_size" else 0
                raise OptionError(
                    f"option {name}={value!r} is not an integer; allowed: an integer >= {least}"
                )
        if self.step_size < 1:
            raise OptionError(f"option step_size={self.step_size} must be an integer >= 1")
        if self.seed < 0:
            raise OptionError(f"option seed={self.seed} must be an integer >= 0")

    @property
    def prunes_whole_blocks(self) -> bool:
        """reshape_channel_axis -2/0 removes whole blocks (heads); -1/1 shrinks every block."""
        return self.reshape_channel_axis in (0, -2)

    @property
    def step_enabled(self) -> bool:
        return self.step_op != "none" and self.step_size > 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_any(cls, options: PruningOptions | dict[str, Any] | None) -> PruningOptions:
        if options is None:
            return cls()
        if isinstance(options, PruningOptions):
            return options
        if isinstance(options, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise OptionError(
                    f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
                )
            return cls(**options)
        raise OptionError(f"options must be PruningOptions or a dict, not {type(options).__name__}")


def _bad(name: str, value: Any) -> str:
    allowed = ", ".join(str(v) for v in ALLOWED[name])
    return f"option {name}={value!r} is not allowed; allowed values: {allowed}"


def check_ratio(ratio: Any, what: str = "ratio") -> float:
    """A pruning ratio must be a number with 0 <= r < 1."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise OptionError(f"{what}={ratio!r} is not a number; allowed: 0 <= ratio < 1") from None
    if not (0.0 <= value < 1.0):
        raise OptionError(f"{what}={ratio!r} is out of range; allowed: 0 <= ratio < 1")
    return value
