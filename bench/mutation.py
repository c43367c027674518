"""`make mutation`: mutmut 3.8.1 over the modules whose claims matter, each run against the
tests that cover it (`python -m bench.mutation [target ...]`; `--list` names the targets).

Every target runs in its own scratch copy of the repository (test-artifacts/mutation/NAME/:
engine/, tests/, assets/, pyproject.toml and a setup.cfg holding that target's mutmut
settings), so the targets' test selections never mix and the checkout is never touched.
mutmut mutates the target's files, runs the selected tests once to learn which tests reach
which function, then runs each mutant (of the target's functions only) against the tests that
reach it, in forked workers. The survivors and the kill rate of each target are printed as a
Markdown table (bench/RESULTS.md, "Mutation testing", holds the first one, explained).

Not part of `make test`; on a shared 2-core machine the three key targets take minutes each.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "test-artifacts" / "mutation"
COPIED = ("engine", "tests", "assets", "pyproject.toml")


@dataclass(frozen=True)
class Target:
    files: tuple[str, ...]  # what mutmut mutates (paths in the repository)
    functions: tuple[str, ...]  # mutant-name globs: the functions whose mutants are run
    tests: tuple[str, ...]  # the pytest selection (files, node ids, -k expressions)


TARGETS: dict[str, Target] = {
    # mask-mode verification: the channel verifier and the shared structural check
    "verification": Target(
        ("engine/transform/exactness.py",),
        ("engine.transform.exactness.*",),
        ("tests/test_exactness.py", "tests/test_verifier_faults.py", "-k",
         "not hf_folder and not cli"),
    ),
    # the spec: step rule, combination of scores, selection, global plans
    "planning": Target(
        ("engine/scoring/planning.py",),
        ("engine.scoring.planning.*",),
        ("tests/test_planning.py", "tests/test_spec_example.py"),
    ),
    # recovery methods (data-light corrections and distillation)
    "recovery": Target(
        ("engine/quality/recovery/bias.py", "engine/quality/recovery/bn.py",
         "engine/quality/recovery/lsq.py", "engine/quality/recovery/norm.py",
         "engine/quality/recovery/distill.py"),
        ("engine.quality.recovery.bias.*", "engine.quality.recovery.bn.*",
         "engine.quality.recovery.lsq.*", "engine.quality.recovery.norm.*",
         "engine.quality.recovery.distill.*"),
        # the tiny-model tests only: the demo-based ones in test_recover.py take minutes per
        # mutant on a shared machine (and measure accuracy, not each formula)
        ("tests/test_recovery_units.py", "tests/test_recovery_paths.py",
         "tests/test_recover.py::test_lsq_is_exact_when_removed_inputs_are_combinations_of_kept_ones",
         "tests/test_recover.py::test_bias_restores_the_mean_of_a_layer_that_lost_inputs",
         "tests/test_headline_claims.py::test_distillation_returns_its_best_held_back_state_not_its_last"),
    ),
    "auto-ratios": Target(
        ("engine/scoring/auto_ratios.py",),
        ("engine.scoring.auto_ratios.*",),
        # the search on the demo (marked slow) takes minutes per mutant; the synthetic
        # problems check the same search against brute force
        ("tests/test_auto_ratios.py", "tests/test_auto_ratios_units.py", "-m", "not slow"),
    ),
    "metrics": Target(
        ("engine/quality/evaluate.py", "engine/quality/metrics.py"),
        ("engine.quality.evaluate.*", "engine.quality.metrics.*"),
        # the command-line tests start a fresh interpreter, which would not see the mutant
        ("tests/test_evaluate.py", "tests/test_metrics.py", "-k",
         "not command_line and not bad_data and not unlabelled and not bad_options and not "
         "prune_eval_data"),
    ),
    "data": Target(
        ("engine/io/data.py",),
        ("engine.io.data.*",),
        # the image folders in-process; test_data_forms.py is left out: its tokenizer and
        # model folders take 20 s to build, paid again by every mutant
        ("tests/test_data_loader.py", "tests/test_data_images.py", "-k",
         "not calibration_option_errors"),
    ),
}
KEY = ("verification", "planning", "recovery")


def setup_cfg(target: Target) -> str:
    def listed(values) -> str:
        return "".join(f"\n    {v}" for v in values)

    return (
        "[mutmut]\n"
        "source_paths = engine\n"
        f"only_mutate ={listed(target.files)}\n"
        f"pytest_add_cli_args_test_selection ={listed(target.tests)}\n"
        # one process per test run: no xdist; the timeout plugin off (mutmut has its own)
        "pytest_add_cli_args =\n    -p\n    no:xdist\n    -p\n    no:cacheprovider\n"
        "    -p\n    no:timeout\n"
        "also_copy =\n    assets\n"
        "use_git_change_detection = false\n"
    )


def prepare(name: str, target: Target) -> Path:
    """A fresh scratch copy for one target (mutmut's own mutants/ lives inside it)."""
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for entry in COPIED:
        source = ROOT / entry
        if source.is_dir():
            shutil.copytree(source, work / entry,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, work / entry)
    text = (work / "pyproject.toml").read_text()
    if "[tool.mutmut]" in text:
        raise SystemExit("pyproject.toml has [tool.mutmut]; the targets' setup.cfg would be "
                         "ignored")
    (work / "setup.cfg").write_text(setup_cfg(target))
    return work


def run_target(name: str, target: Target, children: int, rerun: bool | str = True) -> dict:
    """Mutate and test (`rerun=False`: only read the results of the last run;
    `rerun="survivors"`: run the last run's survivors again with the current tests)."""
    work = WORK / name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutants/ must win
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    mutmut = [sys.executable, "-m", "mutmut"]
    if rerun == "survivors":
        # the last run's survivors only, against the checkout's current tests (mutmut finds
        # the new tests and collects their stats before running the named mutants)
        last = json.loads((work / "summary.json").read_text())
        survivors = list(last["survivors"])
        # mutmut forgets the results of functions whose tests changed ("not checked"): the
        # last run's results stand for the mutants not run again, read from here
        (work / "summary.previous.json").write_text(json.dumps(last, indent=1))
        shutil.rmtree(work / "tests")
        shutil.copytree(ROOT / "tests", work / "tests",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # the target's current test selection (a test file added to it since the run counts)
        for folder in (work, work / "mutants"):
            (folder / "setup.cfg").write_text(setup_cfg(target))
        with open(work / "run.log", "a") as out:
            subprocess.run([*mutmut, "run", "--max-children", str(children), *survivors],
                           cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                           check=False)
    elif rerun:
        work = prepare(name, target)
        with open(work / "run.log", "w") as out:
            subprocess.run([*mutmut, "run", "--max-children", str(children),
                            *target.functions], cwd=work, env=env, stdout=out,
                           stderr=subprocess.STDOUT, check=False)
    results = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env,
                             capture_output=True, text=True, check=False).stdout
    statuses: dict[str, str] = {}
    for line in results.splitlines():
        mutant, _, status = line.strip().rpartition(": ")
        if mutant and any(_matches(mutant, glob) for glob in target.functions):
            statuses[mutant] = status
    previous = work / "summary.previous.json"  # only after a --survivors run
    if previous.exists():
        earlier = json.loads(previous.read_text())["statuses"]
        statuses = {m: _merged(earlier.get(m), s) for m, s in statuses.items()}
    survivors = {m: _diff(work, m) for m, s in statuses.items()
                 if s not in ("killed", "timeout", "caught by type check", "not checked")}
    killed = sum(s in ("killed", "timeout") for s in statuses.values())
    # "not checked": a run stopped before it reached them (counted apart, not as survivors)
    not_run = sum(s == "not checked" for s in statuses.values())
    no_tests = sum(s == "no tests" for s in statuses.values())
    summary = {"target": name, "mutants": len(statuses), "killed": killed,
               "not_run": not_run, "no_tests": no_tests,
               "statuses": statuses, "survivors": survivors}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _merged(earlier: str | None, now: str) -> str:
    """A mutant's status across a run and a later --survivors run of its survivors: one not
    run again keeps its earlier status (killed stays killed; tests were only added)."""
    return earlier if now == "not checked" and earlier is not None else now


def _matches(mutant: str, glob: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(mutant, glob)


def _diff(work: Path, mutant: str) -> str:
    """The changed line(s) of a mutant, read from mutants/ (`mutmut show` starts a Python
    and imports everything per mutant: minutes for a hundred survivors)."""
    module, _, function = mutant.rpartition(".")
    bodies = _bodies(work / "mutants" / (module.replace(".", "/") + ".py"))
    original = bodies.get(function.rpartition("__mutmut_")[0] + "__mutmut_orig", [])
    changed = bodies.get(function, [])
    lines = [ln.strip() for ln in difflib.unified_diff(original, changed, lineterm="", n=0)
             if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    return " / ".join(lines)[:300]


@functools.cache
def _bodies(path: Path) -> dict[str, list[str]]:
    source = path.read_text()
    lines = source.splitlines()
    return {node.name: lines[node.body[0].lineno - 1:node.end_lineno]
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def table(summaries: list[dict]) -> str:
    lines = ["| target | mutants | run | killed | survived (of which no tests) | killed % of run |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        run = s["mutants"] - s.get("not_run", 0)
        share = 100.0 * s["killed"] / run if run else 0.0
        lines.append(f"| {s['target']} | {s['mutants']} | {run} | {s['killed']} | "
                     f"{run - s['killed']} ({s.get('no_tests', 0)}) | {share:.1f}% |")
    lines += ["", "| survivor | status | change |", "|---|---|---|"]
    for s in summaries:
        for mutant, change in s["survivors"].items():
            change = change.replace("|", "\\|")
            lines.append(f"| `{mutant}` | {s['statuses'][mutant]} | `{change}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mutation", description=__doc__)
    parser.add_argument("targets", nargs="*", help=f"default: {' '.join(KEY)}")
    parser.add_argument("--list", action="store_true", help="name the targets and stop")
    parser.add_argument("--children", type=int, default=2, help="mutants run in parallel")
    parser.add_argument("--report", action="store_true",
                        help="only tabulate the last run of each target")
    parser.add_argument("--survivors", action="store_true",
                        help="run only the last run's survivors again, with the current tests")
    args = parser.parse_args(argv)
    if args.list:
        for name, target in TARGETS.items():
            print(f"{name}: {', '.join(target.files)} against {' '.join(target.tests)}")
        return 0
    names = args.targets or list(KEY)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; allowed: {', '.join(TARGETS)}")
    rerun = False if args.report else "survivors" if args.survivors else True
    summaries = [run_target(name, TARGETS[name], args.children, rerun=rerun)
                 for name in names]
    print(table(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
