"""The recovery flags of `prunescope prune`: --recover, --recover-budget, --recover-steps."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from engine.errors import OptionError
from engine.options import RECOVERY_AUTO, RECOVERY_METHODS, RECOVERY_TABLE, choices_help

METHODS_HELP = f"{', '.join(RECOVERY_METHODS)} or {RECOVERY_AUTO}"


def add_recovery_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recover", metavar="METHODS",
                   help=f"recover accuracy after pruning from --calibration data: a comma list "
                        f"of {METHODS_HELP} ("
                        f"{choices_help(RECOVERY_TABLE)})")
    p.add_argument("--recover-budget", metavar="SECONDS",
                   help="time for distillation (default 30)")
    p.add_argument("--recover-steps", metavar="N",
                   help="fixed number of distillation steps instead of a time budget "
                        "(reproducible with --seed)")


def check_recovery_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The engine.recover arguments, checked before any work starts (None: no recovery)."""
    from engine.quality.recovery import parse_methods

    given = [f for f, v in (("--recover-budget", args.recover_budget),
                            ("--recover-steps", args.recover_steps)) if v is not None]
    if args.recover is None:
        if given:
            raise OptionError(f"{given[0]} needs --recover METHODS ({METHODS_HELP})")
        return None
    methods = parse_methods(args.recover)
    if args.calibration is None:
        raise OptionError("--recover needs calibration data: --calibration FILE.npz "
                          "(array x, optional labels y) or a built-in name such as demo")
    budget = 30.0
    if args.recover_budget is not None:
        try:
            budget = float(args.recover_budget)
        except ValueError:
            budget = math.nan
        if not math.isfinite(budget) or budget <= 0:
            raise OptionError(f"--recover-budget {args.recover_budget!r} is not allowed; "
                              "allowed: a positive number of seconds")
    steps = None
    if args.recover_steps is not None:
        try:
            steps = int(args.recover_steps)
        except ValueError:
            steps = 0
        if steps < 1:
            raise OptionError(f"--recover-steps {args.recover_steps!r} is not allowed; "
                              "allowed: a positive integer")
    seed = int(args.seed) if str(args.seed).isdigit() else 0
    return {"methods": methods, "budget_s": budget, "steps": steps, "seed": seed}


class _Bar:
    """A recovery progress bar on a terminal; silent otherwise."""

    def __init__(self) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=1000, file=sys.stderr, leave=False, bar_format="{l_bar}{bar}")

    def __call__(self, message: str, fraction: float) -> None:
        if self.bar is not None:
            self.bar.set_description(message)
            self.bar.update(max(0, int(fraction * 1000) - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_recovery(result, calibration: str, settings: dict[str, Any]):
    """engine.recover with a progress bar, and a summary on stdout."""
    import engine

    bar = _Bar()
    try:
        recovered = engine.recover(result, calibration, settings["methods"],
                                   budget_s=settings["budget_s"], steps=settings["steps"],
                                   seed=settings["seed"], progress=bar)
    finally:
        bar.close()
    info = recovered.report["recovery"]
    line = f"recovery: {', '.join(info['methods']) or 'nothing applied'} in {info['seconds']:.1f} s"
    if info["metric"] is not None:
        line += (f"; {info['metric']} on {info['holdout_samples']} held-back calibration samples "
                 f"{info['metric_before']:.4f} -> {info['metric_after']:.4f}")
    print(line)
    for method, verdict in info.get("per_method", {}).items():
        print(f"recovery: {method}: {verdict['why']}")
    for method, reason in info["skipped"].items():
        print(f"recovery: skipped {method}: {reason}")
    if "chunking" in info:
        print(f"recovery: {info['chunking']['note']}")
    if "filled_inputs" in info:
        print(f"recovery: calibration gives token ids only; {', '.join(info['filled_inputs'])}"
              " set to all ones")
    return recovered
