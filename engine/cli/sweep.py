"""`prunescope sweep`: prune over a grid of options and ratios and measure every point."""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import (
    add_data_args,
    add_flag,
    add_model_args,
    data_options,
    device_kwargs,
    int_option,
    load_kwargs,
)
from engine.options import ALLOWED


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """Option flags that take a comma list or `all` (each one given becomes a grid axis)."""
    for name, help_name in (("criterion", "criteria"), ("policy", "policies"),
                            ("layer-norm", "layer norms"), ("group-policy", "group policies"),
                            ("reshape-channel-axis", "axes"), ("step-op", "step ops")):
        allowed = ", ".join(str(v) for v in ALLOWED[name.replace("-", "_")])
        p.add_argument(f"--{name}", metavar="A,B|all",
                       help=f"{help_name} to compare: a comma list of {allowed}, or all")
    add_flag(p, "--step-size")
    add_flag(p, "--seed")


def grid_from_args(args: argparse.Namespace) -> dict:
    grid = {name: getattr(args, name) for name in
            ("criterion", "policy", "layer_norm", "group_policy", "reshape_channel_axis",
             "step_op") if getattr(args, name) is not None}
    grid["step_size"] = int_option("step-size", args.step_size)
    grid["seed"] = int_option("seed", args.seed)
    return grid


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="prune over a grid of options x ratios, measure each point")
    add_model_args(p)
    add_grid_args(p)
    p.add_argument("--ratio", required=True, metavar="R1,R2,...",
                   help="pruning ratios to try, each 0 <= R < 1")
    add_flag(p, "--eval-data", required=True)
    add_flag(p, "--metric")
    add_flag(p, "--calibration")
    p.add_argument("--recover", metavar="METHODS", help="also measure each point recovered")
    p.add_argument("--recover-steps", metavar="N",
                   help="fixed recovery work per point (reproducible across executors)")
    add_flag(p, "--workers")
    add_flag(p, "--ray")
    p.add_argument("--json", required=True, metavar="OUT.json",
                   help="results; rewritten after every point")
    p.add_argument("--csv", metavar="OUT.csv", help="also write the points as CSV")
    add_data_args(p, max_samples=False)
    p.set_defaults(run=run)


class SweepBar:
    """A progress bar on a terminal; silent otherwise."""

    def __init__(self) -> None:
        self.bar = None
        self.interactive = sys.stderr.isatty()

    def __call__(self, done: int, total: int, record: dict) -> None:
        if not self.interactive:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, leave=False, unit="point")
        self.bar.update(1)
        if "metric" in record:
            self.bar.set_postfix_str(f"ratio {record['ratio']:g}: {record['metric']:.4g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from engine.quality.sweep import parse_ratios, sweep, write_csv

    grid = grid_from_args(args)
    ratios = parse_ratios(args.ratio)
    workers = int_option("workers", args.workers) if args.workers is not None else None
    steps = int_option("recover-steps", args.recover_steps) if args.recover_steps else None
    bar = SweepBar()
    try:
        report = sweep(args.model, grid, ratios, eval_data=args.eval_data, metric=args.metric,
                       recover=args.recover, calibration=args.calibration,
                       recover_steps=steps, workers=workers, ray=args.ray, progress=bar,
                       out_json=args.json, data_options=data_options(args),
                       **load_kwargs(args), **device_kwargs(args))
    except KeyboardInterrupt:
        bar.close()
        print(f"prunescope: sweep interrupted; the finished points are in {args.json}",
              file=sys.stderr)
        raise
    finally:
        bar.close()
    if args.csv:
        write_csv(args.csv, report)
    print_table(report)
    for point in report["points"]:
        if "error" in point:
            print(f"point {point['options']} ratio {point['ratio']}: {point['error']}",
                  file=sys.stderr)
    print(f"wrote {args.json}" + (f" and {args.csv}" if args.csv else ""))
    return 0


def print_table(report: dict) -> None:
    """The metric per point: one row per combination of the swept axes, one column per ratio."""
    axes = list(report["axes"])
    ratios = report["ratios"]
    rows: dict[tuple, dict[float, str]] = {}
    for p in report["points"]:
        key = tuple(p["options"][a] for a in axes)
        value = p.get("metric")
        rows.setdefault(key, {})[p["ratio"]] = "error" if value is None else f"{value:.4g}"
    label = " / ".join(axes) or "options"
    print(f"{report['metric']} (original {report['original']:.4g})")
    print(" | ".join([label] + [f"{r:g}" for r in ratios]))
    for key, cells in rows.items():
        name = " / ".join(str(k) for k in key) or "defaults"
        print(" | ".join([name] + [cells.get(r, "") for r in ratios]))
