"""`prunescope evaluate`: one metric of a model on held-out data."""

from __future__ import annotations

import argparse
import json

from engine.cli.common import (
    DATA_FORMS_HELP,
    add_data_args,
    add_flag,
    add_model_args,
    data_options,
    load_kwargs,
    model_for_data,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a model on held-out data (accuracy, ...)")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="FILE",
                   help=f"held-out data: {DATA_FORMS_HELP}")
    add_flag(p, "--metric")
    p.add_argument("--reference", metavar="MODEL",
                   help="the model to compare with (agreement, relative_error)")
    add_flag(p, "--seed", help="seed of the --max-samples subset")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    add_data_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from engine.quality.evaluate import check_metric, evaluate, format_value, load_eval_data

    metric = check_metric(args.metric)
    options = data_options(args)
    model = model_for_data(args, args.model, args.data)
    data = load_eval_data(args.data, flag="--data", model=model, options=options)
    kwargs = load_kwargs(args)
    result = evaluate(model, data, metric, reference=args.reference, **kwargs)
    extra = f", {result['tokens']} tokens" if "tokens" in result else ""
    print(f"{result['metric']} {format_value(result['metric'], result['value'])} "
          f"({result['samples']} samples{extra})")
    for name, value in result.get("embedding", {}).items():
        if name != result["metric"]:
            print(f"{name} {value:.4f}")
    print(f"metric: {result['reason']}")
    if args.json:
        from engine.io.export import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
    return 0
