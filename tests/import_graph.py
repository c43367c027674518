"""The import graph of engine/ and dashboard/, read from the AST (nothing is imported).

Used by tests/test_layers.py (the layer contract) and runnable on its own to count what the
contract is about: `python -m tests.import_graph [ROOT]` prints import circles, private names
imported across modules, in-function imports of project modules and the longest functions.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("engine", "dashboard")


@dataclass(frozen=True)
class Import:
    """One `import` / `from ... import` of a project module, as written in `source`."""

    source: str  # the importing module, dotted
    target: str  # the imported project module, dotted
    names: tuple[str, ...]  # the names taken from it (`from x import a, b`); empty for `import x`
    line: int
    in_function: bool
    type_checking: bool  # under `if TYPE_CHECKING:` (no run-time import)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path) -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            files[module_name(root, path)] = path
    return files


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool, type_checking: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function, type_checking
        function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda))
        guarded = type_checking or (isinstance(child, ast.If) and _is_type_checking(child.test))
        yield from _walk(child, function, guarded)


def imports_of(root: Path, files: dict[str, Path]) -> list[Import]:
    """Every import of a project module (engine.*, dashboard.*) in the project's files."""
    found = []
    for source, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node, in_function, type_checking in _walk(tree, False, False):
            if isinstance(node, ast.Import):
                targets = [(alias.name, ()) for alias in node.names]
            else:
                base = _resolve(source, is_package, node)
                names = tuple(alias.name for alias in node.names)
                # `from engine.graph import ops` imports the module engine.graph.ops
                submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in files]
                plain = tuple(n for n in names if f"{base}.{n}" not in files)
                targets = [(m, ()) for m in submodules] + ([(base, plain)] if plain else [])
            for target, names in targets:
                if target.split(".")[0] in PACKAGES:
                    found.append(Import(source, target, names, node.lineno, in_function,
                                        type_checking))
    return found


def _owner(target: str, files: dict[str, Path]) -> str:
    """The project module a dotted import name refers to (`engine.graph.ops.x` -> ops)."""
    while target and target not in files:
        target = target.rpartition(".")[0]
    return target


def import_circles(imports: list[Import], files: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components (size > 1, or a self loop) of the run-time import graph.

    Only module-level imports count (`if TYPE_CHECKING:` ones load nothing at run time); an
    in-function import is a dependency all the same, so it counts too.
    """
    edges: dict[str, set[str]] = {m: set() for m in files}
    for imp in imports:
        if imp.type_checking:
            continue
        target = _owner(imp.target, files)
        if target and target != imp.source:
            edges[imp.source].add(target)
            # importing a.b.c runs a/__init__ and a/b/__init__ first: not an edge worth
            # reporting (package __init__ files re-export), so parents are left out.
    return _strongly_connected(edges)


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(components)


def private_imports(imports: list[Import], files: dict[str, Path]) -> list[Import]:
    """`from a import _name` where _name is not a module, across a module boundary."""
    bad = []
    for imp in imports:
        if imp.source == _owner(imp.target, files):
            continue
        if any(n.startswith("_") and not n.startswith("__") for n in imp.names) or any(
                part.startswith("_") and not part.startswith("__")
                for part in imp.target.split(".")):
            bad.append(imp)
    return bad


def function_imports(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if imp.in_function]


def function_lengths(files: dict[str, Path]) -> list[tuple[int, str]]:
    """(lines, module:function) for every function and method, longest first."""
    lengths = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{module}:{node.name}"))
    return sorted(lengths, reverse=True)


def upward_imports(imports: list[Import]) -> list[Import]:
    """Imports of a module in a higher stage of engine/layers.py (run-time imports only)."""
    from engine.layers import rank, stage_of  # the stack as this checkout declares it

    def stage(module: str) -> str | None:
        try:
            return stage_of(module)
        except ValueError:
            return None

    return [imp for imp in imports if not imp.type_checking
            and stage(imp.source) and stage(imp.target)
            and rank(stage(imp.target)) > rank(stage(imp.source))]


STATE_REACH = re.compile(r"\.state\.(uf|labels|slots)\b")


def state_reaches(files: dict[str, Path]) -> int:
    """Uses of a Structure's internals (`.state.uf/labels/slots`) outside engine/graph/."""
    return sum(len(STATE_REACH.findall(path.read_text())) for module, path in files.items()
               if not module.startswith("engine.graph"))


def summary(root: Path) -> dict:
    files = project_files(root)
    imports = imports_of(root, files)
    circles = import_circles(imports, files)
    lengths = function_lengths(files)
    in_function = function_imports(imports)
    front = ("engine.cli", "dashboard")
    return {
        "upward": upward_imports(imports),
        "in_function_outside_front": [i for i in in_function if i.source != "engine"
                                      and not i.source.startswith(front)],
        "state_reaches": state_reaches(files),
        "modules": len(files),
        "circles": circles,
        "modules_in_circles": sum(len(c) for c in circles),
        "private_imports": private_imports(imports, files),
        "function_imports": function_imports(imports),
        "longest": lengths[:5],
        "functions_over_50_lines": sum(1 for n, _ in lengths if n > 50),
    }


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    s = summary(root)
    print(f"modules: {s['modules']}")
    print(f"import circles: {len(s['circles'])} ({s['modules_in_circles']} modules)")
    for circle in s["circles"]:
        print("   ", " <-> ".join(circle))
    print(f"private names imported across modules: {len(s['private_imports'])}")
    for imp in s["private_imports"]:
        print(f"    {imp.source}:{imp.line} from {imp.target} import {', '.join(imp.names)}")
    names = sum(len([n for n in i.names if n.startswith("_")]) for i in s["private_imports"])
    print(f"  (private names: {names})")
    print(f"upward imports (engine/layers.py stages): {len(s['upward'])}")
    for imp in s["upward"]:
        print(f"    {imp.source}:{imp.line} imports {imp.target}")
    print(f"in-function imports of project modules: {len(s['function_imports'])} "
          f"({len(s['in_function_outside_front'])} outside the CLI and dashboard)")
    print(f"reaches into .state.uf/labels/slots outside engine/graph: {s['state_reaches']}")
    print(f"functions over 50 lines: {s['functions_over_50_lines']}")
    for n, name in s["longest"]:
        print(f"    {n:4d} {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
