"""12. hf/ with --uniform for every transformers architecture of the coverage set.

Each architecture of ``tests/architectures.py`` that is a transformers model (67 of its 69:
the two recurrent rows are modules of our own, with no config) is saved with
``save_pretrained`` (tiny config, random weights), pruned from the folder as a user would
(``engine.prune(FOLDER, ratio=0.5, uniform=True)``, default options otherwise) and saved
(``engine.save``, no ONNX). The row says whether OUT/hf/ was written (reloaded with the Auto
class, equal to model.pt2 within 1e-5 relative), the parameters removed, the config fields
that changed, and the one-line reason when hf/ was not written or less than 20% of the
parameters could go.

The models are built and run in batches of child processes by ``bench/architecture_runs.py``,
as for ``coverage_v2`` (``python -m bench.hf --one NAME ...`` runs some here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.architecture_runs import main_one, run_batches
from bench.common import REPO, Goal, Section, md_table

NAME = "hf"
TITLE = "12. hf/ with --uniform: every transformers architecture of the coverage set"
RATIO = 0.5
TIMEOUT_S = 300
QUICK = ("RoBERTa", "DeiT", "OPT", "Llama (GQA)", "GPT-2")


def measure(row: dict, wrapped, inputs) -> None:
    """Save the transformers model as a folder, prune it from the folder with --uniform,
    save (no ONNX); fill the row."""
    import engine  # noqa: PLC0415

    model = getattr(wrapped, "model", wrapped)
    if not hasattr(model, "save_pretrained"):
        row["skip"] = "not a transformers model (no config)"
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        model.save_pretrained(folder)
        result = engine.prune(str(folder), ratio=RATIO, uniform=True)
        engine.save(result, Path(tmp) / "out", onnx=False)
    report = result.report
    row["before"] = report["before"]["params"]
    row["after"] = report["after"]["params"]
    hf = report["hf"]
    row["written"] = bool(hf.get("written"))
    row["config"] = hf.get("config")
    row["reason"] = hf.get("reason")
    kept = (report.get("uniform") or {}).get("kept_for_config") or []
    row["kept"] = sorted({k["reason"] for k in kept})


def removed(row: dict) -> float | None:
    return 1 - row["after"] / row["before"] if row.get("before") else None


def _why(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    if not row["written"]:
        return row["reason"] or "-"
    if removed(row) < 0.2:
        kept = "; ".join(row["kept"][:2])
        return f"the config fixes the rest: {kept}"[:220] if kept else "-"
    return ""


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if "skip" in r:
            continue
        rem = removed(r)
        written = "yes" if r.get("written") else "**no**"
        changed = ", ".join(f"{k} {v}" for k, v in (r.get("config") or {}).items()) or "-"
        out.append((r["name"], written, "-" if rem is None else f"{100 * rem:.0f}%",
                    changed[:80], _why(r)))
    return md_table(["architecture", "hf/ written", "params removed", "config changed",
                     "reason (not written, or < 20% removed)"], out)


def section(rows: list[dict]) -> Section:
    rows = [r for r in rows if "skip" not in r]
    n = len(rows)
    written = sum(bool(r.get("written")) for r in rows)
    big = sum(bool(r.get("written")) and removed(r) >= 0.2 for r in rows)
    goals = [
        Goal(NAME, ">= 95% of the coverage set's transformers architectures write a loadable "
             "hf/ with --uniform (outputs equal to model.pt2)",
             f"{written}/{n} ({100 * written / max(n, 1):.0f}%)", written >= 0.95 * n),
    ]
    body = "\n\n".join([
        __doc__.split("\n\n", 1)[1].strip(),
        table(rows),
        f"hf/ written: {written}/{n}; of those, >= 20% of the parameters removed: {big} "
        "(tiny configs: embeddings and position tables are a large share of the parameters).",
    ])
    return Section(NAME, TITLE, body, goals)


def run(quick: bool = False) -> Section:
    sys.path.insert(0, str(REPO))
    from tests.architectures import ARCHITECTURES  # noqa: PLC0415

    names = list(QUICK) if quick else list(ARCHITECTURES)
    rows = run_batches(f"bench.{NAME}", names, TIMEOUT_S)
    for row in rows:
        if "skip" not in row:
            print(f"{row['name']}: hf/ {'written' if row.get('written') else 'NOT written'}, "
                  f"{'-' if removed(row) is None else f'{removed(row):.0%}'} removed"
                  + (f"; {_why(row)}" if _why(row) else ""), flush=True)
    return section(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hf")
    parser.add_argument("--one", nargs="+", metavar="NAME",
                        help="run these architectures here, print one JSON row each")
    parser.add_argument("--only", nargs="+", help="run these architectures, print the table")
    args = parser.parse_args(argv)
    from bench.common import quiet  # noqa: PLC0415

    quiet()
    if args.one:
        return main_one(args.one, measure)
    if args.only:
        print(table(run_batches(f"bench.{NAME}", args.only, TIMEOUT_S, progress=False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
