"""`prunescope prune`: prune and write model.pt2, model.onnx and report.json."""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import (
    EXIT_ONNX_FAILED,
    Progress,
    add_data_args,
    add_eval_args,
    add_model_args,
    add_option_args,
    calibration_from,
    data_options,
    indices_from,
    load_kwargs,
    model_for_data,
    options_from_args,
    read_json,
    report_frozen,
)
from engine.cli.recovery import add_recovery_args, check_recovery_args, run_recovery
from engine.cli.structures import add_structure_args, print_structures, structure_kwargs
from engine.cli.targets import add_target_args, print_section, target_section, wants_target
from engine.errors import OnnxExportError, OptionError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune and write model.pt2, model.onnx, report.json")
    add_model_args(p)
    add_option_args(p)
    ratio = p.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", help="global pruning ratio, 0 <= R < 1")
    ratio.add_argument("--ratios", metavar="FILE.json", help="{group name: ratio}")
    add_target_args(ratio, p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="time the original and the pruned model (torch on --device, ONNX "
                        "Runtime on the CPU; batch 1 and 8) into report.json's latency "
                        "(default on; --no-latency skips it)")
    p.add_argument("--uniform", action="store_true",
                   help="every repeated layer of the same kind loses the same number of "
                        "channels (a standard transformers config for OUT/hf/)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="prune a safetensors model folder without holding the model: weights "
                        "read one at a time, OUT/hf/ written shard by shard, blocks verified "
                        "one by one; no model.pt2/model.onnx (default: on when the weights "
                        "take over half the available memory and --uniform with l1/l2/gm "
                        "is asked for; --no-stream never)")
    add_structure_args(p)
    add_eval_args(p)
    add_recovery_args(p)
    add_data_args(p)
    p.set_defaults(run=run)


def _ratios(path: str) -> dict[str, float]:
    data = read_json(path, "--ratios")
    if not isinstance(data, dict):
        raise OptionError(f"--ratios file {path} must hold a JSON object {{group name: ratio}}")
    return data


def run(args: argparse.Namespace) -> int:
    import engine
    from engine.options import check_ratio
    from engine.quality.evaluate import (
        check_data,
        check_metric,
        load_eval_data,
        quality_line,
        quality_report,
        same_data_file,
    )

    options = options_from_args(args)
    if _wants_stream(args, options):
        return _run_streamed(args, options)
    if args.indices and options.criterion != "index":
        raise OptionError("--indices names filters to remove; it needs --criterion index")
    data_options(args)  # a bad data option fails before the model is loaded
    model = model_for_data(args, args.model, args.calibration, args.eval_data)
    calibration = calibration_from(args.calibration, model, args)
    indices = indices_from(args.indices)
    ratio = args.ratio
    ratios = _ratios(args.ratios) if args.ratios else None
    structures = structure_kwargs(args)
    if ratio is None and ratios is None and not wants_target(args) \
            and options.criterion != "index" and not any(
                v is not None for v in structures.values()):
        raise OptionError("prune needs --ratio R, --ratios FILE.json, --target-params F, "
                          "--target-flops F or --target-latency F (or --expert-ratio R, "
                          "--block-ratio R, --remove-blocks N)")
    if ratio is not None:
        ratio = check_ratio(ratio, "--ratio")
    metric = check_metric(args.metric)
    if metric is not None and args.eval_data is None:
        raise OptionError("--metric needs --eval-data FILE.npz (held-out data to measure on)")
    if args.eval_data and args.calibration and same_data_file(args.calibration, args.eval_data):
        raise OptionError(f"--eval-data {args.eval_data} is the --calibration file; measure on "
                          "held-out data the model was not calibrated on")
    recovery = check_recovery_args(args)
    eval_data = load_eval_data(args.eval_data, model=model, options=data_options(args)) \
        if args.eval_data else None
    if recovery is not None or args.latency:  # loaded here, the original keeps its weights
        model = engine.load_model(model, **load_kwargs(args))
    if eval_data is not None:  # a bad --eval-data fails before the pruning, not after
        model = engine.load_model(model, **load_kwargs(args))
        check_data(model, eval_data)
    auto = None
    if wants_target(args):
        model = engine.analyze(model, **load_kwargs(args))
        auto = target_section(args, model, options, eval_data, metric, calibration,
                              load_kwargs(args))
        ratios = auto["ratios"]
    progress = Progress(8 + bool(eval_data) + bool(args.latency))
    try:
        result = engine.prune(model, None, options, ratio=ratio, ratios=ratios,
                              calibration=calibration, indices=indices, progress=progress,
                              uniform=args.uniform, **load_kwargs(args), **structures,
                              # nothing after this needs the original: free it as we go
                              release_original=recovery is None and eval_data is None
                              and not args.latency)
        if auto is not None:
            result.report["auto_ratios"] = auto
        pruned = result
        if recovery is not None:
            result = run_recovery(result, calibration, recovery)
        if eval_data is not None:
            progress("evaluating on --eval-data")
            result.report["quality"] = quality_report(
                model, pruned, eval_data, metric,
                recovered=result if recovery is not None else None)
        if args.latency:
            from engine.quality.latency import latency_report

            progress("timing the original and the pruned model")
            result.report["latency"] = latency_report(model, result, onnx=not args.no_onnx)
        onnx_error = None
        try:
            paths = engine.save(result, args.out, onnx=not args.no_onnx, progress=progress)
        except OnnxExportError as exc:
            onnx_error, paths = exc, exc.paths
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
    print_structures(report)
    if "latency" in report:
        from engine.quality.latency import latency_lines

        print("\n".join(latency_lines(report["latency"])))
    if "quality" in report:
        print(quality_line(report["quality"]))
    if auto is not None:
        print_section(auto)
    report_frozen(report["frozen"])
    hf = report.get("hf")
    if hf and hf["written"]:
        print(f"hf/: loads with transformers.{hf['auto_class']}, outputs equal model.pt2 "
              f"(max relative difference {hf['max_rel_diff_vs_pt2']:.2g})")
    for path in paths.values():
        print(f"wrote {path}")
    if onnx_error is not None:
        print(f"prunescope: error: {onnx_error}", file=sys.stderr)
        return EXIT_ONNX_FAILED
    return 0


def _stream_conflicts(args: argparse.Namespace, options) -> list[str]:
    """What a streamed prune cannot do that the command asks for."""
    from engine.scoring.criteria import WEIGHT_CRITERIA

    structures = structure_kwargs(args)
    asked = {
        "--uniform is needed (hf/ needs one size per layer kind)": not args.uniform,
        f"--criterion {options.criterion} (streamed: l1, l2, gm)":
            options.criterion not in WEIGHT_CRITERIA,
        "--ratio or --ratios is needed": args.ratio is None and args.ratios is None,
        "--calibration": bool(args.calibration), "--eval-data": bool(args.eval_data),
        "--indices": bool(args.indices), "recovery": check_recovery_args(args) is not None,
        "--target-*": wants_target(args),
        "whole experts/blocks": any(v is not None for v in structures.values()),
    }
    return [what for what, bad in asked.items() if bad]


def _wants_stream(args: argparse.Namespace, options) -> bool:
    from pathlib import Path

    folder = Path(args.model)
    if args.stream is False or not folder.is_dir():
        if args.stream:
            raise OptionError(f"--stream needs a Hugging Face model folder with safetensors; "
                              f"{args.model} is not a folder")
        return False
    conflicts = _stream_conflicts(args, options)
    if args.stream:
        if conflicts:
            raise OptionError(f"--stream cannot be used with: {'; '.join(conflicts)}")
        return True
    if conflicts or not any(folder.glob("*.safetensors")):
        return False
    from engine.stream import should_stream

    return should_stream(folder)


def _run_streamed(args: argparse.Namespace, options) -> int:
    from engine.options import check_ratio
    from engine.stream import prune_streamed

    progress = Progress(3)
    try:
        report = prune_streamed(
            args.model, args.out, options,
            ratio=check_ratio(args.ratio, "--ratio") if args.ratio is not None else None,
            ratios=_ratios(args.ratios) if args.ratios else None, uniform=True,
            seq_len=load_kwargs(args).get("seq_len"), progress=progress)
    finally:
        progress.close()
    before, after = report["before"], report["after"]
    print("streamed: weights read one at a time, hf/ written shard by shard")
    print(f"params {before['params']:,} -> {after['params']:,} "
          f"({100 * (1 - after['params'] / max(before['params'], 1)):.1f}% removed)")
    print(f"FLOPs  {before['flops']:,} -> {after['flops']:,}")
    v = report["verification"]
    if "skipped" in v:
        print(f"verification: {v['skipped']}")
    else:
        print(f"verification: {v['blocks']} blocks against mask mode, max relative "
              f"|pruned - masked| = {v['relative_diff_vs_masked']:.3g} (block "
              f"{v['worst_block']}), exact={v['exact']}")
    report_frozen(report["frozen"])
    print(f"model.pt2, model.onnx: {report['pt2']}")
    print(f"wrote {args.out}/hf ({report['hf']['shards']} shard(s)) and {args.out}/report.json")
    return 0
