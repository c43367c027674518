"""The `prunescope` command line: one module per command, registered in COMMANDS.

Exit status: 0 success; 1 an internal error (a bug: one line, never a traceback); 2 bad
input (one line saying what is allowed); 3 the pruned model, report.json and model.pt2 were
written but the ONNX export failed (named in the report and on stderr); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from engine.cli import dashboard, evaluate, prune, scores, sensitivity, sweep
from engine.cli.common import (  # noqa: F401 - EXIT_ONNX_FAILED: importable from engine.cli
    EXIT_BAD_INPUT,
    EXIT_INTERNAL_ERROR,
    EXIT_ONNX_FAILED,
)
from engine.errors import PruneScopeError, one_line
from engine.offline import stay_offline

COMMANDS = (scores, prune, evaluate, sweep, sensitivity, dashboard)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunescope",
        description="Dependency-aware structured pruning of PyTorch models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"prunescope: warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    """The command, on the --device it names (every forward it makes runs there)."""
    device, amp = getattr(args, "device", None), getattr(args, "amp", None)
    if device is None and amp is None:
        return args.run(args)
    from engine.device import using  # imports torch: not for --help

    with using(device, amp):
        return args.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stay_offline()
    warnings.showwarning = _show_warning
    try:
        return _run(args)
    except PruneScopeError as exc:
        print(f"prunescope: error: {one_line(exc, limit=2000)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("prunescope: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI edge: a bug is one line, not a traceback
        print(f"prunescope: internal error (a bug in PruneScope, please report it): "
              f"{one_line(exc, limit=2000)}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
