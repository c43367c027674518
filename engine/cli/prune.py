"""`prunescope prune`: prune and write model.pt2, model.onnx and report.json."""

from __future__ import annotations

import argparse

from engine.cli.common import (
    Progress,
    add_model_args,
    add_option_args,
    indices_from,
    load_kwargs,
    options_from_args,
    read_json,
    report_frozen,
)
from engine.errors import OptionError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune and write model.pt2, model.onnx, report.json")
    add_model_args(p)
    add_option_args(p)
    ratio = p.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", help="global pruning ratio, 0 <= R < 1")
    ratio.add_argument("--ratios", metavar="FILE.json", help="{group name: ratio}")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--uniform", action="store_true",
                   help="every repeated layer of the same kind loses the same number of "
                        "channels (a standard transformers config for OUT/hf/)")
    p.set_defaults(run=run)


def _ratios(path: str) -> dict[str, float]:
    data = read_json(path, "--ratios")
    if not isinstance(data, dict):
        raise OptionError(f"--ratios file {path} must hold a JSON object {{group name: ratio}}")
    return data


def run(args: argparse.Namespace) -> int:
    import engine
    from engine.graph.capture import load_calibration
    from engine.options import check_ratio

    options = options_from_args(args)
    if args.indices and options.criterion != "index":
        raise OptionError("--indices names filters to remove; it needs --criterion index")
    calibration = load_calibration(args.calibration)[0] if args.calibration else None
    indices = indices_from(args.indices)
    ratio = args.ratio
    ratios = _ratios(args.ratios) if args.ratios else None
    if ratio is None and ratios is None and options.criterion != "index":
        raise OptionError("prune needs --ratio R or --ratios FILE.json")
    if ratio is not None:
        ratio = check_ratio(ratio, "--ratio")
    progress = Progress(8)
    try:
        result = engine.prune(args.model, None, options, ratio=ratio, ratios=ratios,
                              calibration=calibration, indices=indices, progress=progress,
                              uniform=args.uniform, **load_kwargs(args))
        paths = engine.save(result, args.out, onnx=not args.no_onnx, progress=progress)
    finally:
        progress.close()
    report = result.report
    before, after = report["before"], report["after"]
    print(f"params {before['params']:,} -> {after['params']:,} "
          f"({100 * (1 - after['params'] / max(before['params'], 1)):.1f}% removed)")
    print(f"FLOPs  {before['flops']:,} -> {after['flops']:,}")
    v = report["verification"]
    print(f"verification: output shapes match={v['output_shapes_match']}, "
          f"max |pruned - masked| = {v['max_abs_diff_vs_masked']:.3g}, exact={v['exact']}")
    report_frozen(report["frozen"])
    hf = report.get("hf")
    if hf and hf["written"]:
        print(f"hf/: loads with transformers.{hf['auto_class']}, outputs equal model.pt2 "
              f"(max relative difference {hf['max_rel_diff_vs_pt2']:.2g})")
    for path in paths.values():
        print(f"wrote {path}")
    return 0
