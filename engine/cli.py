"""The `prunescope` command line: scores, prune, dashboard."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from engine.errors import OptionError, PruneScopeError
from engine.options import (
    CRITERIA,
    GROUP_POLICIES,
    LAYER_NORMS,
    POLICIES,
    RESHAPE_CHANNEL_AXES,
    STEP_OPS,
    PruningOptions,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunescope",
        description="Dependency-aware structured pruning of PyTorch models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="'demo', a .pt2 file, or a .pt pickle (with --trust-pickle)")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a .pt pickle (unpickling runs code from the file)")
        p.add_argument("--input-shape", action="append", default=[], metavar="1,3,224,224",
                       help="shape of an example input (repeat for several inputs)")
        p.add_argument("--calibration", metavar="FILE",
                       help=".npz with array x (or .npy): inputs for nuclear_norm")
        p.add_argument("--indices", metavar="FILE.json",
                       help="criterion index: {layer: [filter indices to remove]}")
        p.add_argument("--criterion", default="l2", help=f"one of {', '.join(CRITERIA)}")
        p.add_argument("--policy", default="average", help=f"one of {', '.join(POLICIES)}")
        p.add_argument("--layer-norm", default="standard_score",
                       help=f"one of {', '.join(LAYER_NORMS)}")
        p.add_argument("--group-policy", default="average",
                       help=f"one of {', '.join(GROUP_POLICIES)}")
        p.add_argument("--reshape-channel-axis", default="-1",
                       help=f"one of {', '.join(str(a) for a in RESHAPE_CHANNEL_AXES)}")
        p.add_argument("--step-size", default="2", help="kept channels align to this (>= 1)")
        p.add_argument("--step-op", default="round", help=f"one of {', '.join(STEP_OPS)}")
        p.add_argument("--seed", default="0", help="seed of the random criterion")

    scores = sub.add_parser("scores", help="print the per-group scores as JSON")
    model_args(scores)
    scores.add_argument("--json", metavar="PATH", help="write the JSON here instead of stdout")

    prune = sub.add_parser("prune", help="prune and write model.pt2, model.onnx, report.json")
    model_args(prune)
    ratio = prune.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", help="global pruning ratio, 0 <= R < 1")
    ratio.add_argument("--ratios", metavar="FILE.json", help="{group name: ratio}")
    prune.add_argument("--out", required=True, metavar="DIR", help="output folder")
    prune.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")

    dash = sub.add_parser("dashboard", help="open the Streamlit dashboard")
    dash.add_argument("model", nargs="?", default="demo")
    dash.add_argument("--port", type=int, default=8501)
    return parser


def _options(args: argparse.Namespace) -> PruningOptions:
    axis = args.reshape_channel_axis
    try:
        axis = int(axis)
    except ValueError:
        pass
    step_size = _int_option("step-size", args.step_size)
    seed = _int_option("seed", args.seed)
    return PruningOptions(
        criterion=args.criterion, policy=args.policy, layer_norm=args.layer_norm,
        group_policy=args.group_policy, reshape_channel_axis=axis, step_size=step_size,
        step_op=args.step_op, seed=seed,
    )


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        least = 1 if name == "step-size" else 0
        raise OptionError(
            f"option --{name}={value!r} is not an integer; allowed: an integer >= {least}"
        ) from None


def _shapes(values: list[str]) -> list[tuple[int, ...]]:
    shapes = []
    for value in values:
        try:
            shape = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise OptionError(
                f"--input-shape {value!r} must be comma-separated integers, e.g. 1,3,224,224"
            ) from None
        if not shape or any(s < 1 for s in shape):
            raise OptionError(f"--input-shape {value!r} must have positive sizes")
        shapes.append(shape)
    return shapes


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise OptionError(f"{what} file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise OptionError(f"{what} file {path} is not valid JSON: {exc}") from None


def _ratios(path: str) -> dict[str, float]:
    data = _read_json(path, "--ratios")
    if not isinstance(data, dict):
        raise OptionError(f"--ratios file {path} must hold a JSON object {{group name: ratio}}")
    return data


def _indices(path: str | None) -> dict[str, list[int]] | None:
    if path is None:
        return None
    data = _read_json(path, "--indices")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise OptionError(f"--indices file {path} must hold a JSON object {{layer: [indices]}}")
    return data


class _Progress:
    """A progress line on a terminal; silent otherwise."""

    def __init__(self, steps: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, file=sys.stderr, leave=False, bar_format="{l_bar}{bar}")

    def __call__(self, message: str) -> None:
        if self.bar is not None:
            self.bar.set_description(message)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(args: argparse.Namespace) -> int:
    import engine
    from engine.capture import load_calibration

    if args.command == "dashboard":
        root = Path(__file__).resolve().parent.parent
        model = args.model if args.model == "demo" else str(Path(args.model).resolve())
        env = dict(os.environ, PRUNESCOPE_MODEL=model)
        return subprocess.call(
            [sys.executable, "-m", "streamlit", "run", str(root / "dashboard" / "app.py"),
             "--server.headless", "true", "--server.address", "127.0.0.1",
             "--server.port", str(args.port), "--server.maxUploadSize", "2048"],
            env=env, cwd=root,
        )
    options = _options(args)
    if args.indices and options.criterion != "index":
        raise OptionError("--indices names filters to remove; it needs --criterion index")
    calibration = load_calibration(args.calibration)[0] if args.calibration else None
    indices = _indices(args.indices)
    load = {"trust_pickle": args.trust_pickle, "input_shapes": _shapes(args.input_shape) or None}
    if args.command == "scores":
        result = engine.score(args.model, None, options, calibration, indices=indices, **load)
        text = json.dumps(result.to_dict(), indent=1)
        if args.json:
            from engine.export import atomic_write_bytes

            atomic_write_bytes(args.json, text.encode())
        else:
            print(text)
        _report_frozen(result.to_dict()["frozen"])
        return 0
    ratio = None if args.ratio is None else args.ratio
    ratios = _ratios(args.ratios) if args.ratios else None
    if ratio is None and ratios is None and options.criterion != "index":
        raise OptionError("prune needs --ratio R or --ratios FILE.json")
    if ratio is not None:
        from engine.options import check_ratio

        ratio = check_ratio(ratio, "--ratio")
    progress = _Progress(8)
    try:
        result = engine.prune(args.model, None, options, ratio=ratio, ratios=ratios,
                              calibration=calibration, indices=indices, progress=progress,
                              **load)
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
    _report_frozen(report["frozen"])
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _report_frozen(frozen: list[dict]) -> None:
    for item in frozen:
        print(f"frozen: {', '.join(item['layers'])}: {item['reason']}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"prunescope: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return _run(args)
    except PruneScopeError as exc:
        print(f"prunescope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunescope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
