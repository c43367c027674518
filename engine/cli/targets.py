"""`prune --target-params F` / `--target-flops F`: per-group ratios chosen automatically."""

from __future__ import annotations

import argparse
import warnings
from typing import Any

# resource -> the help of its --target-RESOURCE flag (one each; `ratios_for_target` takes
# them as target_RESOURCE)
TARGETS: dict[str, str] = {
    "params": "fraction of parameters to remove (0 < F < 1); per-group ratios chosen from "
              "sensitivity curves",
    "flops": "fraction of FLOPs to remove (0 < F < 1), likewise",
    "latency": "fraction of the latency to remove (0 < F < 1), from each group's latency "
               "cost measured here on --device (cached)",
}


def add_target_args(ratio_group: argparse._MutuallyExclusiveGroup,
                    p: argparse.ArgumentParser) -> None:
    for resource, help_text in TARGETS.items():
        ratio_group.add_argument(f"--target-{resource}", metavar="F", help=help_text)
    p.add_argument("--sensitivity", metavar="CURVES.json",
                   help="with a target: curves from `prunescope sensitivity` (default: measured "
                        "now on --calibration, else on --eval-data)")


def _targets(args: argparse.Namespace) -> dict[str, Any]:
    """target_RESOURCE -> its value on the command line (None where not given)."""
    return {f"target_{resource}": getattr(args, f"target_{resource}") for resource in TARGETS}


def wants_target(args: argparse.Namespace) -> bool:
    return any(v is not None for v in _targets(args).values())


def target_section(args: argparse.Namespace, analysis: Any, options, eval_data, metric,
                   calibration, load_kwargs: dict) -> dict[str, Any]:
    """The `auto_ratios` section of report.json; its "ratios" are what prune then uses."""
    from engine.cli.common import read_json
    from engine.quality.targets import ratios_for_target
    from engine.scoring.auto_ratios import check_target

    targets = _targets(args)
    for name, value in targets.items():
        if value is not None:
            check_target(value, "--" + name.replace("_", "-"))  # before any work
    curves = read_json(args.sensitivity, "--sensitivity") if args.sensitivity else None
    if curves is not None and not (isinstance(curves, dict) and "groups" in curves):
        from engine.errors import OptionError

        raise OptionError(f"--sensitivity file {args.sensitivity} holds no sensitivity curves; "
                          "write one with `prunescope sensitivity MODEL ... --json FILE`")
    data = None
    if args.calibration:
        data = calibration  # already read by calibration_from, as the data loader's DataSet
    elif eval_data is not None and curves is None:
        data = eval_data
        warnings.warn("the group sensitivities are measured on --eval-data (no "
                      "--calibration): the metric reported on it is then not held out",
                      stacklevel=1)
    return ratios_for_target(
        args.model, options, **targets,
        sensitivity_data=data, eval_data=eval_data, metric=metric, sensitivity_report=curves,
        calibration=calibration, analysis=analysis, **load_kwargs)


def print_section(section: dict[str, Any]) -> None:
    target = section["target"]
    print(f"auto ratios for {target['remove']:.0%} of the {target['resource']} removed "
          f"({section['removed']:.1%} reached): "
          + ", ".join(f"{k} {v:g}" for k, v in section["ratios"].items()))
    print(f"uniform global ratio removing as much: {section['uniform']['ratio']:g} "
          f"({section['uniform']['removed']:.1%})")
    costs = section.get("latency_costs")
    if costs:
        m = costs["measured"]
        print(f"latency measured: {m['original_ms']:.3g} ms -> {m['pruned_ms']:.3g} ms "
              f"({m['removed']:.1%} removed; group costs "
              f"{'from the cache' if costs['cached'] else 'measured now'})")
    comparison = section.get("comparison")
    if comparison:
        print(f"{comparison['metric']}: auto {comparison['auto']:.4g}, uniform "
              f"{comparison['uniform']:.4g}, original {comparison['original']:.4g}")
