"""`prunescope evaluate`: one metric of a model on held-out data."""

from __future__ import annotations

import argparse
import json

from engine.cli.common import DEFAULT_METRIC_HELP, add_model_args, load_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    from engine.options import METRICS

    p = sub.add_parser("evaluate", help="measure a model on held-out data (accuracy, ...)")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="FILE.npz",
                   help=".npz with x (or x0, x1, ...) and optional labels y, a .npy, or a "
                        "built-in name (demo, demo-lm: its evaluation set)")
    p.add_argument("--metric", help=f"one of {', '.join(METRICS)} ({DEFAULT_METRIC_HELP})")
    p.add_argument("--reference", metavar="MODEL",
                   help="the model to compare with (agreement, relative_error)")
    p.add_argument("--max-samples", type=int, metavar="N", help="evaluate the first N samples")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from engine.quality.evaluate import check_metric, evaluate, format_value, load_eval_data

    metric = check_metric(args.metric)
    data = load_eval_data(args.data, flag="--data")
    kwargs = load_kwargs(args)
    result = evaluate(args.model, data, metric, reference=args.reference,
                      max_samples=args.max_samples, **kwargs)
    extra = f", {result['tokens']} tokens" if "tokens" in result else ""
    print(f"{result['metric']} {format_value(result['metric'], result['value'])} "
          f"({result['samples']} samples{extra})")
    if args.json:
        from engine.io.export import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
    return 0
