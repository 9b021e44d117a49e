"""The import graph of rayps, read from the source with ``ast`` (nothing is imported or run).

* Dependencies run one way: updaters <- server <- worker <- deploy (docs/design.md). A module may import its own
  package and the packages before it, never one after it; every import counts, the lazy ones inside functions
  too.
* No cycle between the four packages, and none between modules through their module-scope imports (what runs
  at import time).
* No module uses another module's ``_private`` names: neither ``from .x import _name`` nor ``x._name`` through an
  imported rayps module. (An object's private attribute, ``obj._field``, is not visible without types and is
  not checked here.) ``KNOWN_PRIVATE_USES`` lists the uses that remain, each for the issue-15 part that removes
  it; an entry that no longer occurs fails too, so the list only shrinks.

The checker also runs on a small synthetic tree, so that a violation of each kind is shown to be caught.
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORDER = ("updaters", "server", "worker", "deploy")  # each package may import only itself and those before it

# (module, used name) -> why it is still there. Remove an entry with the use it names.
KNOWN_PRIVATE_USES: dict = {}


@dataclass(frozen=True)
class Use:
    """``module`` imports ``target`` (a rayps module) at ``line``; ``name``: the name taken from it, if any."""

    module: str
    target: str
    line: int
    module_scope: bool
    name: str | None = None


def find_modules(root: pathlib.Path, packages=ORDER) -> dict[str, tuple[pathlib.Path, bool]]:
    """``rayps.<package>.<module>`` -> (path, is a package ``__init__``), for every .py file of the packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            found[".".join(["rayps"] + (parts[:-1] if is_init else parts))] = (path, is_init)
    return found


def _nodes(tree: ast.Module):
    """Every node, each with whether it runs at import time (not inside a function or class body)."""
    def walk(node, module_scope):
        for child in ast.iter_child_nodes(node):
            inner = module_scope and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield child, inner
            yield from walk(child, inner)
    yield from walk(tree, True)


def find_uses(modules: dict) -> list[Use]:
    """Every import of a rayps module by a rayps module (``from pkg import submodule`` names the submodule)."""
    uses = []
    for module, (path, is_init) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, module_scope in _nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        uses.append(Use(module, alias.name, node.lineno, module_scope))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_init else module.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        uses.append(Use(module, f"{source}.{alias.name}", node.lineno, module_scope))
                    elif source in modules:
                        uses.append(Use(module, source, node.lineno, module_scope, alias.name))
    return uses


def package_of(module: str) -> str:
    return module.split(".")[1]


def upward_imports(uses: list[Use], order=ORDER) -> list[str]:
    rank = {package: i for i, package in enumerate(order)}
    return [f"{u.module} (line {u.line}) imports {u.target}: {package_of(u.module)} may not import "
            f"{package_of(u.target)} (order {' <- '.join(order)})"
            for u in uses if rank[package_of(u.target)] > rank[package_of(u.module)]]


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package_edges(uses: list[Use]) -> dict[str, set]:
    edges: dict[str, set] = {}
    for u in uses:
        if package_of(u.module) != package_of(u.target):
            edges.setdefault(package_of(u.module), set()).add(package_of(u.target))
    return edges


def module_scope_edges(uses: list[Use]) -> dict[str, set]:
    edges: dict[str, set] = {}
    for u in uses:
        if u.module_scope and u.module != u.target:
            edges.setdefault(u.module, set()).add(u.target)
    return edges


def private_uses(modules: dict, uses: list[Use]) -> dict[tuple[str, str], int]:
    """(module, ``target._name``) -> line: private names taken from another module, by import or attribute."""
    found = {}
    for u in uses:
        if u.name and _private(u.name) and u.target != u.module:
            found.setdefault((u.module, f"{u.target}.{u.name}"), u.line)
    for module, (path, _) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        bound = {}  # local name -> the rayps module it is bound to
        for node, _scope in _nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        bound[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    target = next((u.target for u in uses if u.module == module and u.line == node.lineno
                                   and u.name is None and u.target.rsplit(".", 1)[-1] == alias.name), None)
                    if target is not None:
                        bound[alias.asname or alias.name] = target
        for node, _scope in _nodes(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                dotted = _dotted(node.value)
                if dotted in bound and bound[dotted] != module:
                    found.setdefault((module, f"{bound[dotted]}.{node.attr}"), node.lineno)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
    modules = find_modules(ROOT)
    return modules, find_uses(modules)


def test_the_scan_sees_the_packages_and_their_imports(graph):
    modules, uses = graph
    assert {package_of(m) for m in modules} == set(ORDER)
    pairs = {(u.module, u.target) for u in uses}
    assert ("rayps.server.shard_state", "rayps.updaters.base") in pairs  # a module-scope relative import
    assert ("rayps.updaters.base", "rayps.updaters.fused_cpu") in pairs  # a lazy one, inside a function


def test_no_module_imports_a_package_after_its_own(graph):
    _, uses = graph
    assert upward_imports(uses) == []


def test_the_packages_import_each_other_without_a_cycle(graph):
    _, uses = graph
    assert cycles(package_edges(uses)) == []


def test_module_scope_imports_have_no_cycle(graph):
    _, uses = graph
    assert cycles(module_scope_edges(uses)) == []


def test_no_module_uses_another_modules_private_names(graph):
    modules, uses = graph
    found = private_uses(modules, uses)
    new = {f"{module} (line {line}) uses {name}" for (module, name), line in found.items()
           if (module, name) not in KNOWN_PRIVATE_USES}
    assert not new, "private names used across modules (make them public, or move the code): " + "; ".join(
        sorted(new))
    gone = sorted(set(KNOWN_PRIVATE_USES) - set(found))
    assert not gone, f"no longer used, remove from KNOWN_PRIVATE_USES in {__file__}: {gone}"


def test_the_checker_reports_each_kind_of_violation(tmp_path):
    files = {
        "updaters/__init__.py": "",
        "updaters/rule.py": "from ..server import actor\n_SECRET = 1\n",  # upward, module scope
        "server/__init__.py": "",
        "server/actor.py": "def later():\n    from ..worker import loop\n    return loop\n",  # upward, lazy
        "server/a.py": "from . import b\n",
        "server/b.py": "from .a import thing\nimport rayps.updaters.rule as rule\nX = rule._SECRET\n",
        "worker/__init__.py": "",
        "worker/loop.py": "from rayps.updaters.rule import _SECRET\n",
        "deploy/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = find_modules(tmp_path)
    uses = find_uses(modules)
    assert upward_imports(uses) == [
        "rayps.updaters.rule (line 1) imports rayps.server.actor: updaters may not import server "
        "(order updaters <- server <- worker <- deploy)",
        "rayps.server.actor (line 2) imports rayps.worker.loop: server may not import worker "
        "(order updaters <- server <- worker <- deploy)",
    ]
    assert cycles(package_edges(uses)) == [["server", "updaters", "worker"]]
    assert cycles(module_scope_edges(uses)) == [["rayps.server.a", "rayps.server.b"]]
    assert set(private_uses(modules, uses)) == {("rayps.server.b", "rayps.updaters.rule._SECRET"),
                                                ("rayps.worker.loop", "rayps.updaters.rule._SECRET")}
