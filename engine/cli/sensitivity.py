"""`prunescope sensitivity`: prune one group at a time at several ratios, measure the drop."""

from __future__ import annotations

import argparse

from engine.cli.common import (
    add_data_args,
    add_flag,
    add_model_args,
    add_option_args,
    calibration_from,
    data_options,
    device_kwargs,
    int_option,
    load_kwargs,
    options_from_args,
)
from engine.cli.sweep import SweepBar


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity",
                       help="metric drop of each group pruned alone at several ratios")
    add_model_args(p)
    add_option_args(p)
    p.add_argument("--ratio", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                   metavar="R1,R2,...", help="ratios to prune each group at, each 0 <= R < 1")
    add_flag(p, "--eval-data", required=True)
    add_flag(p, "--metric")
    add_flag(p, "--workers")
    add_flag(p, "--ray")
    p.add_argument("--json", required=True, metavar="OUT.json", help="the curves")
    add_data_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from engine.quality.sensitivity import sensitivity
    from engine.quality.sweep import parse_ratios

    options = options_from_args(args)
    ratios = parse_ratios(args.ratio)
    workers = int_option("workers", args.workers) if args.workers is not None else None
    bar = SweepBar()
    try:
        report = sensitivity(args.model, options, ratios, eval_data=args.eval_data,
                             metric=args.metric, calibration=_calibration(args),
                             workers=workers, ray=args.ray, progress=bar, out_json=args.json,
                             data_options=data_options(args), **load_kwargs(args),
                             **device_kwargs(args))
    finally:
        bar.close()
    print(f"{report['metric']} drop per group (original {report['original']:.4g})")
    print(" | ".join(["group"] + [f"{r:g}" for r in report["ratios"]]))
    for group in report["groups"]:
        drops = {c["ratio"]: c["drop"] for c in group["curve"]}
        print(" | ".join([group["name"]] + [f"{drops[r]:.4g}" if r in drops else ""
                                            for r in report["ratios"]]))
    print(f"wrote {args.json}")
    return 0


def _calibration(args: argparse.Namespace):
    """Arrays read now (a bad file fails before the analysis); text and images are read by
    the engine for the model it analyses."""
    from engine.io.data import needs_model

    if args.calibration is not None and needs_model(args.calibration):
        return args.calibration
    return calibration_from(args.calibration, args=args)
