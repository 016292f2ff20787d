"""The package layout: no import cycle among core/, methods/, metrics/ and data/.

The graph is built from the source with ``ast``: module-level imports only (a function
body's import runs later, when the modules are loaded), ignoring ``if TYPE_CHECKING:``
blocks. Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``, so those are edges
too, except the importer's own enclosing packages (already being imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CHECKED = ("artemis.core", "artemis.methods", "artemis.metrics", "artemis.data")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]):
    """Import statements run when the module is imported (class bodies and module-level
    ``if``/``try``/``with`` blocks included; function bodies and TYPE_CHECKING blocks not)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level_imports(node.body)


def import_graph(root: Path, package: str = "artemis") -> dict[str, set[str]]:
    """``{module: modules it imports at module level}`` for every module of ``package``
    under ``root`` (edges to modules outside the package are left out)."""
    files = {_module_name(p, root): p for p in (root / package.replace(".", "/")).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        own_package = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..y import z
                anchor = own_package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files)
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges: set[str] = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in files and (mod == target or mod not in ancestors) and mod != name:
                    edges.add(mod)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each one holds at
    least one import cycle), as sorted lists (Tarjan's algorithm)."""
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in_checked(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in CHECKED)


def test_no_import_cycle_among_core_methods_metrics_data():
    graph = import_graph(SRC)
    assert "artemis.core.config" in graph and graph["artemis.methods.unstructured"]
    cycles = [c for c in find_cycles(graph) if any(_in_checked(m) for m in c)]
    assert not cycles, "import cycles (module-level imports): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_config_does_not_import_the_methods():
    graph = import_graph(SRC)
    seen, todo = set(), ["artemis.core.config"]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    assert not [m for m in seen if m.startswith(("artemis.methods", "artemis.metrics"))], sorted(seen)


def test_the_cycle_finder_sees_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.c\nfrom pkg.sub import y\nx = 1\n"
    )
    (pkg / "c.py").write_text("import pkg.a\n\ndef f():\n    import pkg.b\n")
    (pkg / "sub" / "__init__.py").write_text("from .d import y\n")
    (pkg / "sub" / "d.py").write_text("from .. import a\ny = 2\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.sub"}  # the TYPE_CHECKING import is no edge
    assert graph["pkg.c"] == {"pkg.a"}  # nor is the import inside a function
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.d"]]
