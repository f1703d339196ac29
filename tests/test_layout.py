"""The source layout: modules import without cycles and no function is too long to read in one sitting.

Both checks read the sources (``ast``), so they see imports made inside functions (lazy
imports hide a cycle from Python's import machinery, not from a reader) and need nothing
imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sparseslice"
MAX_FUNCTION_LINES = 80


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module under ``src/sparseslice`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (top level and inside functions).

    ``from a.b import c`` is module ``a.b.c`` when that is a module, else ``a.b``; relative
    imports are resolved against the importing module's package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c of a plain name: the nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports.

    A package's ``__init__`` importing its own submodules (re-exports) is an edge like any
    other; the implicit "importing ``pkg.sub`` first runs ``pkg/__init__``" is not one, so a
    package and its submodules are no cycle by themselves. A submodule importing its own
    package that re-exports it is a cycle (the package is half initialised), and is reported.
    """
    modules = module_names()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each sorted)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_cycle_finder_finds_known_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}, "f": {"g"}, "g": {"f"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["f", "g"]]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_resolved_to_modules(tmp_path: Path) -> None:
    modules = {"sparseslice", "sparseslice.study", "sparseslice.study.spec", "sparseslice.study.pipeline",
               "sparseslice.errors"}
    source = tmp_path / "pipeline.py"
    source.write_text("from sparseslice.errors import UserError\n"
                      "from . import spec\n"
                      "def f():\n    from sparseslice.study.spec import RunSpec\n    import sparseslice.study\n")
    assert imported_modules("sparseslice.study.pipeline", source, modules) == {
        "sparseslice.errors", "sparseslice.study.spec", "sparseslice.study"}


def test_no_import_cycle_among_modules() -> None:
    graph = import_graph()
    assert "sparseslice.study.spec" in graph["sparseslice.study.pipeline"]  # the graph sees real imports
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def long_functions() -> list[str]:
    """``path:line name (n lines)`` of every function longer than ``MAX_FUNCTION_LINES``."""
    out = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_80_lines() -> None:
    long = long_functions()
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: split them into named steps:\n" + "\n".join(long)
