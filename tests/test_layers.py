"""The import contract of engine/ and dashboard/ (engine/layers.py declares the stages).

Read from the source's AST, nothing imported: no import circle, no import up the stack, no
private name taken from another module, no in-function import of a project module outside
the front stage (where it keeps `prunescope --help` light). Each check also runs on a small
hand-written tree with the fault in it, so a checker that finds nothing cannot pass.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.layers import LAYERS, LAZY_STAGES, rank, stage_of
from tests.import_graph import (
    function_imports,
    import_circles,
    imports_of,
    private_imports,
    project_files,
)

ROOT = Path(__file__).resolve().parents[1]


def _violations(root: Path) -> dict[str, list[str]]:
    files = project_files(root)
    imports = imports_of(root, files)
    upward = []
    unknown = []
    for imp in imports:
        if imp.type_checking:
            continue
        try:
            source, target = stage_of(imp.source), stage_of(imp.target)
        except ValueError as exc:
            unknown.append(str(exc))
            continue
        if rank(target) > rank(source):
            upward.append(f"{imp.source}:{imp.line} ({source}) imports {imp.target} ({target})")
    lazy = [f"{imp.source}:{imp.line} imports {imp.target} inside a function"
            for imp in function_imports(imports)
            if stage_of(imp.source) not in LAZY_STAGES]
    return {
        "circles": [" <-> ".join(c) for c in import_circles(imports, files)],
        "upward": upward,
        "unknown": sorted(set(unknown)),
        "private": [f"{imp.source}:{imp.line} takes {', '.join(imp.names)} from {imp.target}"
                    for imp in private_imports(imports, files)],
        "in_function": lazy,
    }


def test_every_module_has_a_stage():
    for module in project_files(ROOT):
        stage_of(module)  # ValueError names the module


@pytest.fixture(scope="module")
def project_violations() -> dict[str, list[str]]:
    """The project's imports parsed once for every kind of fault below."""
    return _violations(ROOT)


@pytest.mark.parametrize("kind", ["circles", "upward", "unknown", "private", "in_function"])
def test_import_contract(project_violations, kind):
    found = project_violations[kind]
    assert found == [], f"{kind}:\n" + "\n".join(found)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for package in ("engine", "dashboard"):
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


def test_checker_finds_each_fault(tmp_path):
    root = _tree(tmp_path, {
        "engine/graph/__init__.py": "",
        "engine/graph/a.py": "from engine.graph.b import thing\n_hidden = 1\n",
        "engine/graph/b.py": "from engine.graph import a\nthing = 1\n",
        "engine/options.py": "from engine.pipeline import prune\n",
        "engine/pipeline.py": "from engine.graph.a import _hidden\n"
                              "def prune():\n    from engine.graph.b import thing\n",
        "engine/cli/__init__.py": "def main():\n    from engine.pipeline import prune\n",
        "engine/scoring/__init__.py": "",
        "engine/scoring/typed.py": "from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from engine.pipeline import prune\n",
    })
    found = _violations(root)
    assert found["circles"] == ["engine.graph.a <-> engine.graph.b"]
    assert found["upward"] == ["engine.options:1 (base) imports engine.pipeline (pipeline)"]
    assert found["private"] == ["engine.pipeline:1 takes _hidden from engine.graph.a"]
    # the front may import lazily (engine.cli); a TYPE_CHECKING import loads nothing
    assert found["in_function"] == ["engine.pipeline:3 imports engine.graph.b inside a function"]


def test_stages_are_declared_once_and_in_order():
    names = [name for name, _prefixes, _what in LAYERS]
    assert len(names) == len(set(names))
    assert stage_of("engine.graph.tracer") == "graph"
    assert stage_of("engine.graph.safety") == "io"  # a listed leaf wins over its package
    assert stage_of("engine") == "front"
    assert rank("graph") < rank("scoring") < rank("transform") < rank("pipeline") \
        < rank("quality") < rank("front")
