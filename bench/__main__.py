"""``python -m bench [NAME ...] [--quick]``: run benchmarks and update bench/RESULTS.md.

Every benchmark writes its own section (machine, command, date, tables); running a subset
replaces only those sections, so the file always holds the latest run of each. The summary
at the top is rebuilt from the goals recorded in every section.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from bench import BENCHMARKS
from bench.common import (
    Goal,
    Section,
    load_average,
    machine_line,
    md_table,
    quiet,
    set_threads,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Written by `python -m bench` (`make bench`); do not edit by hand. Each section records the "
    "machine, the command and the date of its own run. The issue's goals are in the summary; "
    "wall-clock numbers are never asserted in tests.\n\n"
    "Timings use one torch (and ONNX Runtime) thread unless `--threads N` is given: on this "
    "shared 2-core machine, with other processes running, two OpenMP threads spin-wait on "
    "each other and single runs vary tenfold (a ResNet-50 forward pass measured 150 ms to "
    "2.3 s with two threads, 95 to 130 ms with one). Both tools get the same thread budget.\n"
)
GOALS_RE = re.compile(r"<!-- goals: (.*?) -->", re.S)


def _section_re(name: str) -> re.Pattern:
    return re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)


def _render(section: Section, command: str, started: datetime, load_before: str) -> str:
    goals = json.dumps([g.__dict__ for g in section.goals])
    return (
        f"<!-- bench:{section.name} -->\n"
        f"## {section.title}\n\n"
        f"- Machine: {machine_line()}\n"
        f"- Command: `{command}`\n"
        f"- Date: {started:%Y-%m-%d %H:%M %Z}".rstrip() + f" (took {section.seconds:.0f} s; "
        f"load average before / after: {load_before} → {load_average()})\n\n"
        f"{section.body}\n\n"
        f"<!-- goals: {goals} -->\n"
        f"<!-- /bench:{section.name} -->"
    )


def _summary(text: str) -> str:
    rows = []
    for name in BENCHMARKS:
        match = _section_re(name).search(text)
        if not match:
            continue
        goals = GOALS_RE.search(match.group(0))
        for g in json.loads(goals.group(1)) if goals else []:
            goal = Goal(**g)
            rows.append((goal.benchmark, goal.goal, goal.measured, goal.mark))
    table = md_table(["benchmark", "goal", "measured", "status"], rows) if rows else "(none yet)"
    return f"<!-- bench:summary -->\n## Summary of goals\n\n{table}\n<!-- /bench:summary -->"


def write_results(sections: list[str], names: list[str], path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else HEADER
    for name, rendered in zip(names, sections):
        pattern = _section_re(name)
        if pattern.search(text):
            text = pattern.sub(lambda _m, r=rendered: r, text)
        else:
            text = text.rstrip() + "\n\n" + rendered + "\n"
    # keep sections in the benchmarks' order whatever order they were first written in
    # sections written by other tools (bench/mutation.py) follow, in the order they stand
    names = list(BENCHMARKS) + [n for n in re.findall(r"<!-- bench:(\w+) -->", text)
                                if n not in BENCHMARKS and n != "summary"]
    blocks = {n: m.group(0) for n in names if (m := _section_re(n).search(text))}
    body = "\n\n".join(blocks[n] for n in names if n in blocks)
    text = HEADER + "\n" + _summary(body) + "\n\n" + body + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer models and repetitions (a smoke run; numbers are rougher)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / ONNX Runtime threads (default 1: on a shared machine, "
                        "OpenMP threads spin-waiting on descheduled peers make multi-threaded "
                        "timings vary tenfold)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the Markdown file to update (default: bench/RESULTS.md)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    set_threads(args.threads)
    quiet()
    command = "python -m bench" + "".join(f" {a}" for a in (argv if argv is not None
                                                             else sys.argv[1:]))
    total = time.perf_counter()
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"== {module.TITLE}", flush=True)
        started = datetime.now().astimezone()
        load_before = load_average()
        start = time.perf_counter()
        section = module.run(quick=args.quick)
        section.seconds = time.perf_counter() - start
        # written after every benchmark: a later crash keeps the finished ones
        write_results([_render(section, command, started, load_before)], [name], args.results)
        print(section.body, flush=True)
        for g in section.goals:
            print(f"  [{g.mark}] {g.goal}: {g.measured}", flush=True)
        print(f"   ({section.seconds:.0f} s)\n", flush=True)
    print(f"done in {time.perf_counter() - total:.0f} s; results in {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
