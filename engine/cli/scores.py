"""`prunescope scores`: the per-group scores as JSON."""

from __future__ import annotations

import argparse
import json

from engine.cli.common import (
    add_model_args,
    add_option_args,
    calibration_from,
    indices_from,
    load_kwargs,
    options_from_args,
    report_frozen,
)
from engine.errors import OptionError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scores", help="print the per-group scores as JSON")
    add_model_args(p)
    add_option_args(p)
    p.add_argument("--json", metavar="PATH", help="write the JSON here instead of stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import engine

    options = options_from_args(args)
    if args.indices and options.criterion != "index":
        raise OptionError("--indices names filters to remove; it needs --criterion index")
    calibration = calibration_from(args.calibration)
    result = engine.score(args.model, None, options, calibration,
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
