"""Coverage v2: about seventy real architectures (tests/architectures.py) as a new user
would prune them: built from tiny transformers configs with random weights, wrapped to
return one tensor, ``engine.prune(model, inputs, ratio=0.5)`` with default options, then
``engine.save`` (``model.pt2`` and ONNX checked with ONNX Runtime).

Models run in batches of child processes (``bench/architecture_runs.py``: a crash or a hang
costs one row, and memory is returned).
``python -m bench.coverage_v2 --one NAME`` runs one model and prints its JSON row.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.architecture_runs import line, main_one, run_batches
from bench.common import REPO, Goal, Section, md_table

NAME = "coverage_v2"
TITLE = "10. Coverage v2: real architectures at ratio 0.5, default options (prune, verify, export)"
RATIO = 0.5
TIMEOUT_S = 600
QUICK = ("ResNet-50 style", "Swin", "BERT", "Llama (GQA)", "Mamba")


def _short(reason: str) -> str:
    """One reason per kind: without channel counts, node numbers and module paths."""
    reason = reason.split(": ", 1)[1] if reason[:1].isdigit() and ": " in reason else reason
    reason = re.sub(r"\bmodel(\.\w+)+", lambda m: m.group(0).rsplit(".", 2)[-2] + "."
                    + m.group(0).rsplit(".", 1)[-1], reason)
    reason = re.sub(r"\b([a-z][a-z_]*?)_\d+\b", r"\1", reason)
    return reason if len(reason) <= 70 else reason[:67] + "..."


def measure(row: dict, model, inputs) -> None:
    """Prune with default options, verify, export (ONNX too); fill the row."""
    import engine  # noqa: PLC0415
    from tests.architectures import unexplained_layers  # noqa: PLC0415

    try:
        result = engine.prune(model, inputs, ratio=RATIO)
    except Exception as exc:  # noqa: BLE001 - a failure is the result
        row["error"] = f"prune: {line(exc, 160)}"
        return
    report = result.report
    row["before"] = report["before"]["params"]
    row["after"] = report["after"]["params"]
    row["exact"] = report["verification"]["exact"]
    row["exact_expected"] = report["verification"]["exact_expected"]
    row["inexact_groups"] = len(report["verification"]["inexact_groups"])
    row["unsupported_ops"] = report["unsupported_ops"]
    reasons = Counter(_short(f["reason"]) for f in report["frozen"])
    row["frozen"] = reasons.most_common()
    row["unexplained"] = unexplained_layers(result)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            engine.save(result, tmp)
            row["onnx"] = "ok"
            row["onnx_diff"] = result.report.get("onnx", {}).get("max_abs_diff_vs_torch")
        except Exception as exc:  # noqa: BLE001
            row["onnx"] = line(exc, 160)


def _removed(row: dict) -> float | None:
    if "before" not in row or not row["before"]:
        return None
    return 1 - row["after"] / row["before"]


def succeeded(row: dict) -> bool:
    """The issue's bar: pruned, verified, exported (ONNX too), >= 20% of params removed."""
    removed = _removed(row)
    return ("error" not in row and row.get("onnx") == "ok" and removed is not None
            and removed >= 0.2)


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        removed = _removed(r)
        if "error" in r:
            out.append((r["name"], r.get("family", ""), "-", "-", "-", f"error: {r['error']}"))
            continue
        exact = "yes" if r["exact"] else ("by design no: normalised over pruned channels"
                                          if r["inexact_groups"] else "**no**")
        onnx = "yes" if r["onnx"] == "ok" else f"**no**: {r['onnx']}"
        reasons: Counter = Counter()
        for reason, n in r["frozen"]:
            reasons[_short(reason)] += n
        kinds = reasons.most_common()
        frozen = "; ".join(f"{reason} ({n})" for reason, n in kinds[:3]) or "nothing"
        if len(kinds) > 3:
            frozen += f"; {len(kinds) - 3} more reasons"
        if r.get("unexplained"):
            frozen += f"; **unexplained**: {', '.join(r['unexplained'][:3])}"
        out.append((r["name"], r["family"], f"{100 * removed:.0f}%", exact, onnx, frozen))
    return md_table(["architecture", "family", "params removed", "exact vs mask mode",
                     "ONNX ok", "frozen (count of groups): why"], out)


def run(quick: bool = False) -> Section:
    sys.path.insert(0, str(REPO))
    from tests.architectures import ARCHITECTURES  # noqa: PLC0415

    names = list(QUICK) if quick else list(ARCHITECTURES)
    return section(run_batches(f"bench.{NAME}", names, TIMEOUT_S))


def section(rows: list[dict]) -> Section:
    ok = sum(succeeded(r) for r in rows)
    n = len(rows)
    unexplained = sum(bool(r.get("unexplained")) for r in rows)
    goals = [
        Goal(NAME, ">= 90% of architectures prune, verify, export (ONNX too) and lose >= 20% "
             "of their parameters", f"{ok}/{n} ({100 * ok / max(n, 1):.0f}%)", ok >= 0.9 * n),
        Goal(NAME, "every layer with parameters pruned or frozen with a reason",
             f"{n - unexplained}/{n} models", unexplained == 0),
    ]
    body = "\n\n".join([
        "Each architecture: a tiny config of its `transformers` class (or a small module of "
        "our own for the recurrent rows), random weights, wrapped to return one tensor; "
        "`engine.prune(model, inputs, ratio=0.5)` with default options, then `engine.save` "
        "(`model.pt2`, `model.onnx` checked against torch with ONNX Runtime). *Exact*: the "
        "pruned model equals the original with the removed channels zeroed (1e-4 relative); "
        "groups normalised by LayerNorm/RMSNorm (or weights standardised) over their own "
        "channels differ by design. *Frozen*: the reasons the report gives for the channels "
        "left alone (most frequent first; the count is of frozen entries). *Unexplained*: "
        "layers with parameters neither changed, nor frozen with a reason, nor in a scored "
        "group (`tests/architectures.py:unexplained_layers`).",
        table(rows),
        f"Succeeded (pruned, verified, exported, >= 20% of parameters removed): {ok}/{n}.",
    ])
    return Section(NAME, TITLE, body, goals)


def _write_section(paths: list[Path]) -> None:
    from datetime import datetime  # noqa: PLC0415

    from bench.__main__ import _render, write_results  # noqa: PLC0415
    from bench.common import load_average  # noqa: PLC0415

    sys.path.insert(0, str(REPO))
    from tests.architectures import ARCHITECTURES  # noqa: PLC0415

    by_name: dict[str, dict] = {}
    for path in paths:
        for text in path.read_text().splitlines():
            if text.startswith("{"):
                row = json.loads(text)
                by_name[row["name"]] = row
    rows = [by_name[n] for n in ARCHITECTURES if n in by_name]
    result = section(rows)
    result.body += ("\n\nThese rows were measured in batches while the branch was developed "
                    "(a shared 2-core machine under load ~15); every model touched by a later "
                    "fix was measured again after it, and the newest row of each model is "
                    "shown. `python -m bench coverage_v2` measures them all in one run.")
    command = "python -m bench.coverage_v2 --one NAME ... (batches of 6, rows merged with " \
              "--from-rows)"
    write_results([_render(result, command, datetime.now().astimezone(), load_average())],
                  [NAME])
    print(result.body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coverage_v2")
    parser.add_argument("--one", nargs="+", metavar="NAME",
                        help="run these architectures here, print one JSON row each")
    parser.add_argument("--only", nargs="*", help="architectures to run (default: all)")
    parser.add_argument("--from-rows", nargs="+", type=Path, metavar="JSONL",
                        help="write the RESULTS.md section from rows already measured "
                        "(JSON lines as --one prints them; a later row of a name wins)")
    args = parser.parse_args(argv)
    from bench.common import quiet  # noqa: PLC0415

    quiet()
    if args.one:
        return main_one(args.one, measure)
    if args.from_rows:
        _write_section(args.from_rows)
        return 0
    if args.only:
        print(table(run_batches(f"bench.{NAME}", args.only, TIMEOUT_S, progress=False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
