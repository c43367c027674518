"""Flags and summary lines of the structural passes of `prunescope prune` (experts, blocks)."""

from __future__ import annotations

import argparse
from typing import Any


def add_structure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-ratio", metavar="R",
                   help="remove this fraction of the experts of every router, 0 <= R < 1")
    p.add_argument("--block-ratio", metavar="R",
                   help="remove this fraction of the residual blocks, 0 <= R < 1")
    p.add_argument("--remove-blocks", metavar="N",
                   help="remove the N least important residual blocks")
    p.add_argument("--block-unit", metavar="UNIT", default="block",
                   help="what --remove-blocks/--block-ratio count: block (a residual block: "
                        "one attention or MLP sublayer) or layer (a whole transformer layer); "
                        "default block")


def structure_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as engine.prune arguments (checked there: one-line errors)."""
    from engine.transform import structural

    kwargs = {"expert_ratio": args.expert_ratio, "block_ratio": args.block_ratio,
              "remove_blocks": args.remove_blocks}
    structural.wanted(**kwargs, block_unit=args.block_unit)
    if args.block_ratio is not None or args.remove_blocks is not None:
        kwargs["block_unit"] = args.block_unit  # only with a depth ask
    elif args.block_unit != "block":
        from engine.errors import OptionError

        raise OptionError(f"--block-unit {args.block_unit} says what --remove-blocks N or "
                          "--block-ratio R count; give one of them")
    return kwargs


def print_structures(report: dict[str, Any]) -> None:
    experts = report.get("experts")
    if experts:
        for router in experts["routers"]:
            print(f"experts: {router['layer']}: removed {len(router['removed'])} of "
                  f"{router['experts']} {router['removed']}")
    blocks = report.get("blocks")
    if blocks is not None:
        removed = [b["name"] for b in blocks if b["removed"]]
        print(f"blocks: removed {len(removed)} of {len(blocks)}"
              + (f": {', '.join(removed)}" if removed else ""))
    depth = report.get("depth") or {}
    if depth.get("unit") == "layer":
        layers = depth["layers"]
        print(f"layers: removed {len(depth['removed_layers'])} of {len(layers)}"
              + (f": {', '.join(depth['removed_layers'])}" if depth["removed_layers"] else ""))
