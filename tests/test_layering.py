"""The package layering: no import cycle between streamlearn's packages, read from the source with ast.

Nodes are the sub-packages (`streamlearn.learners`, `streamlearn.telemetry`, ...) and
each top-level module (`streamlearn.records`, `streamlearn.service`, ...). A module
that imports nothing from streamlearn (a leaf such as `telemetry.histogram`) is its
own node: it cannot close a cycle, wherever it is filed. Only imports that run when
the module loads count: `if TYPE_CHECKING:` blocks and imports inside functions are
left out (a function-level import is the way to read a package above, deliberately).

Run as a script to print the package graph: `python tests/test_layering.py`.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "streamlearn"


def module_name(path: Path) -> str:
    """`streamlearn/learners/base.py` -> `streamlearn.learners.base`; a package's `__init__` is the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(nodes: list[ast.stmt], here: str) -> list[str]:
    """Modules imported by statements that run at import time (module body, its ifs and trys; not TYPE_CHECKING)."""
    found: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolved against the importing module's package
                base = ".".join(here.split(".")[: -node.level] + ([base] if base else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            found += _top_level_imports(node.body + node.orelse, here)
        elif isinstance(node, ast.Try):
            found += _top_level_imports(node.body + node.orelse + node.finalbody
                                        + [s for h in node.handlers for s in h.body], here)
    return found


def module_imports() -> dict[str, set[str]]:
    """Each streamlearn module -> the streamlearn modules it imports at module level."""
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    out: dict[str, set[str]] = {}
    for name, path in paths.items():
        here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        here_for_relative = here + ".x"   # level 1 strips the last part
        imported = _top_level_imports(ast.parse(path.read_text(), str(path)).body, here_for_relative)
        # `from pkg import name` names a module only when pkg/name.py exists; otherwise the package itself.
        out[name] = {m for m in imported if m in paths and m != name}
    return out


def node_of(module: str, imports: dict[str, set[str]]) -> str:
    """The layering node a module belongs to: its sub-package, itself (top level), or itself (a leaf)."""
    parts = module.split(".")
    if not imports.get(module):
        return module   # a leaf: imports nothing from streamlearn
    is_package = (PACKAGE / "/".join(parts[1:]) / "__init__.py").exists() if len(parts) > 1 else True
    if len(parts) >= 3 or (len(parts) == 2 and is_package):
        return ".".join(parts[:2])
    return module


def package_edges(imports: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """(node, node it imports) -> the module-level imports that make the edge."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, targets in imports.items():
        for target in sorted(targets):
            a, b = node_of(module, imports), node_of(target, imports)
            if a != b and not b.startswith(a + "."):   # a leaf inside the importer's own package: no edge
                edges[(a, b)].append(f"{module} -> {target}")
    return edges


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected node groups of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def describe(edges: dict[tuple[str, str], list[str]], groups: list[list[str]]) -> str:
    lines = []
    for group in groups:
        lines.append("cycle between " + ", ".join(group) + ":")
        lines += [f"  {via}" for (a, b), vias in sorted(edges.items()) if a in group and b in group for via in vias]
    return "\n".join(lines)


def test_no_import_cycle_between_packages():
    edges = package_edges(module_imports())
    groups = cycles(edges)
    assert not groups, describe(edges, groups)


def test_the_checker_sees_a_cycle():
    """The check fails on a package-level cycle: learners -> telemetry -> learners, as it once was."""
    imports = {"streamlearn.learners.base": {"streamlearn.telemetry.history"},
               "streamlearn.telemetry.history": {"streamlearn.learners.plasticity"},
               "streamlearn.learners.plasticity": {"streamlearn.config"},
               "streamlearn.config": set()}
    groups = cycles(package_edges(imports))
    assert groups == [["streamlearn.learners", "streamlearn.telemetry"]]


def test_type_checking_and_function_imports_do_not_count():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import streamlearn.service\n"
              "def f():\n    import streamlearn.cli\ntry:\n    import streamlearn.records\nexcept ImportError:\n    pass\n")
    assert _top_level_imports(ast.parse(source).body, "streamlearn.x") == ["typing", "typing.TYPE_CHECKING",
                                                                            "streamlearn.records"]


def test_the_scan_reads_the_real_imports():
    """A known module-level import is found, so an empty graph cannot pass by accident."""
    imports = module_imports()
    assert "streamlearn.learners.drift" in imports["streamlearn.telemetry.history"]
    assert "streamlearn.telemetry.history" not in imports["streamlearn.learners.base"]


if __name__ == "__main__":
    found = module_imports()
    all_edges = package_edges(found)
    for (a, b), vias in sorted(all_edges.items()):
        print(f"{a} -> {b}   ({len(vias)}: {', '.join(vias[:2])}{' ...' if len(vias) > 2 else ''})")
    problems = cycles(all_edges)
    print(describe(all_edges, problems) if problems else "no cycle between packages")
    sys.exit(1 if problems else 0)
