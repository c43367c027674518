"""`prunescope scores`: the per-group scores as JSON."""

from __future__ import annotations

import argparse
import json

from engine.cli.common import (
    add_data_args,
    add_model_args,
    add_option_args,
    calibration_from,
    indices_from,
    load_kwargs,
    model_for_data,
    options_from_args,
    report_frozen,
)
from engine.errors import OptionError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scores", help="print the per-group scores as JSON")
    add_model_args(p)
    add_option_args(p)
    add_data_args(p)
    p.add_argument("--json", metavar="PATH", help="write the JSON here instead of stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import engine

    options = options_from_args(args)
    if args.indices and options.criterion != "index":
        raise OptionError("--indices names filters to remove; it needs --criterion index")
    model = model_for_data(args, args.model, args.calibration)
    calibration = calibration_from(args.calibration, model, args)
    result = engine.score(model, None, options, calibration,
                          indices=indices_from(args.indices), **load_kwargs(args))
    data = result.to_dict()
    text = json.dumps(data, indent=1)
    if args.json:
        from engine.io.export import atomic_write_bytes

        atomic_write_bytes(args.json, text.encode())
    else:
        print(text)
    report_frozen(data["frozen"])
    return 0
