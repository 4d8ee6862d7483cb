"""The package's shape: every module small enough to read in one sitting, and no import circle, counting
the imports written inside functions too (a circle hidden behind a function-level import is still one:
it decides which module may be imported first)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[2] / "plugin" / "teonspeed"
ROOT = "teonspeed"
MAX_LINES = 400


def modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _in_type_checking(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package modules `name` imports anywhere in its file, and the sub-packages (their __init__) it
    enters from outside them. The root package is left out: every module runs inside it already."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: Set[str] = set()
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != ROOT:
                continue
            targets.add(module)
            targets |= {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known}
    out = set()
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # the sub-packages entered on the way, then the module itself
            prefix = ".".join(parts[:i])
            if prefix in known and prefix != name and not (name + ".").startswith(prefix + "."):
                out.add(prefix)
    return out


def import_graph() -> Dict[str, Set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

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
    return out


def test_no_module_is_over_400_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_the_package_has_no_import_circle():
    assert circles(import_graph()) == []


def test_the_circle_check_sees_function_level_imports_and_packages_entered():
    graph = import_graph()
    assert "teonspeed.optim.base" in graph["teonspeed.optim"]  # optim/__init__ imports it
    assert "teonspeed.optim" in graph["teonspeed.integrations.deepspeed"]  # `from ..optim import ...`
    assert "teonspeed.integrations.deepspeed" in graph["teonspeed.patches.deepspeed_0_19"]  # inside apply()
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
