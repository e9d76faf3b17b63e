"""The layering of ``medquant`` is enforced, not hoped for.

Every module under ``medquant/`` (and every file under ``tests/`` and ``benchmarks/``) is parsed with ``ast``; an
import counts wherever it stands: at module level, inside a function, under ``if TYPE_CHECKING``, in a ``try``.
Relative imports are resolved against the importing module, and ``from package import name`` counts as an import
of the submodule ``package.name`` when that submodule exists, otherwise as an import of ``package`` itself.

The rules (docs/architecture.md explains them):

- **Layers.** Each top-level component of ``medquant`` has a rank (``LAYERS`` below, bottom first); an import may
  point to the same rank or lower, never higher. The root package ``medquant`` (``medquant/__init__.py``, the public
  facade: eager imports plus the lazy ``_LAZY`` map, counted as imports here) sits above the library and below the
  command line, so no library module imports names from the root package; ``medquant.testing`` (the tiny-model
  zoo for tests) sits above everything and nothing in the library imports it.
- **No cycles** between modules, and none between top-level components. A package ``__init__`` importing its own
  children is no cycle by itself; a child importing names back from its package's ``__init__`` closes one.
- **No private names across packages**: ``_name`` (a name, or a module on the dotted path) is imported only from
  inside the package that defines it.
- **No edits of ``sys``'s module search path** under ``tests/`` or ``benchmarks/`` (they import ``medquant`` as installed and
  ``benchmarks`` as a package run with ``python -m``).
- **Self-contained text**: no reference to documents outside the repository under ``medquant/``.
- **No experiment code inside the library**: every module under ``medquant/`` that something imports is imported by
  the library or the public API, not only by ``benchmarks/`` or the command line.

The same layers are stated for import-linter in ``pyproject.toml`` (``lint-imports`` runs in CI); this test also
covers what import-linter does not (function-level imports it cannot tell apart, the root facade, the text rules).
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "medquant"

# Bottom first. Components on one line share a rank: they may import each other (but not in a cycle).
LAYERS: list[tuple[str, ...]] = [
    ("digest",),
    ("kernels", "data", "version"),
    ("models", "complexity"),
    ("quant",),
    ("io", "distributed", "training"),
    ("calibrate", "deploy", "prune", "fairquant", "distill", "qlora", "eval", "adaptive"),
    ("pipeline",),
    ("hf",),
    ("",),  # the root package medquant/__init__.py: the public facade
    ("cli", "__main__"),  # medquant/__main__.py: ``python -m medquant``, the command line
    ("testing",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# text that points at documents a reader of this repository does not have
OUTSIDE_REFERENCES = re.compile(r"SPEC|seed 00")


# ----------------------------------------------------------------------------------------------------------------
# the import graph


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources(top: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``REPO/top``."""
    base = REPO / top
    if not base.is_dir():
        return {}
    return {_module_name(p): p for p in sorted(base.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    path = modules.get(name)
    return path is not None and path.name == "__init__.py"


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    parts = importer.split(".")
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    base = ".".join(parts)
    if module:
        return f"{base}.{module}" if base else module
    return base


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """Every import in one file as ``(target module, imported name or None, line)``.

    ``target`` is resolved to the most specific module that exists in ``modules`` when the import names one of them
    (``from pkg import sub`` -> ``pkg.sub``); imports of other distributions come back unresolved.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(name, is_pkg, node.level, node.module) if node.level
                    else node.module or "")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                if candidate in modules:
                    found.append((candidate, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return found


def _lazy_targets(path: Path) -> list[tuple[str, str, int]]:
    """The root package's ``_LAZY = {name: module}`` map, read as imports ``(module, name, line)``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    out.append((value.value, key.value, node.lineno))
    return out


@cache
def _graph() -> dict[str, list[tuple[str, str | None, int]]]:
    """medquant module -> the medquant modules it imports, with the imported name and the line."""
    modules = _sources("medquant")
    graph: dict[str, list[tuple[str, str | None, int]]] = {}
    for name, path in modules.items():
        edges = [e for e in _imports(name, path, modules) if e[0] == "medquant" or e[0].startswith("medquant.")]
        if name == "medquant":
            edges += [(m, n, line) for m, n, line in _lazy_targets(path)]
        graph[name] = edges
    return graph


def _component(module: str) -> str:
    """``medquant.quant.core`` -> ``quant``; the root package -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _where(module: str) -> str:
    path = _sources("medquant").get(module)
    return str(path.relative_to(REPO)) if path else module


def _strongly_connected(nodes, edges) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one node, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    scc.append(member)
                    if member == node:
                        break
                if len(scc) > 1:
                    out.append(sorted(scc))
    return out


def _cycle_path(scc: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the first node of a strongly connected component (breadth-first)."""
    members = set(scc)
    start = scc[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, node, start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    return scc


# ----------------------------------------------------------------------------------------------------------------
# the rules


def test_graph_is_read():
    graph = _graph()
    assert "medquant" in graph and "medquant.quant" in graph
    assert any(target.startswith("medquant.quant") for target, _, _ in graph["medquant"])
    assert {_component(m) for m in graph} <= set(RANK), (
        f"components without a layer in LAYERS: {sorted({_component(m) for m in graph} - set(RANK))}")


def test_no_import_cycles_between_modules():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imports in _graph().items():
        for target, _, _ in imports:
            if target != module:
                edges[module].add(target)
    cycles = [" -> ".join(_cycle_path(scc, edges)) for scc in _strongly_connected(_graph(), edges)]
    assert not cycles, "import cycles between modules:\n  " + "\n  ".join(cycles)


def test_no_import_cycles_between_components():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imports in _graph().items():
        for target, _, _ in imports:
            a, b = _component(module), _component(target)
            if a != b:
                edges[a].add(b)
    names = {_component(m) for m in _graph()}
    cycles = [" -> ".join(c or "medquant" for c in _cycle_path(scc, edges))
              for scc in _strongly_connected(names, edges)]
    assert not cycles, "import cycles between components of medquant:\n  " + "\n  ".join(cycles)


def test_no_import_points_to_a_higher_layer():
    bad = []
    for module, imports in sorted(_graph().items()):
        for target, name, line in imports:
            a, b = _component(module), _component(target)
            if a in RANK and b in RANK and RANK[b] > RANK[a]:
                what = f"{target}.{name}" if name else target
                bad.append(f"{_where(module)}:{line}: {a or 'medquant'} (layer {RANK[a]}) imports {what} "
                           f"(layer {RANK[b]})")
    assert not bad, "imports pointing up the layers:\n  " + "\n  ".join(bad)


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _private_imports(top: str) -> list[str]:
    modules = _sources("medquant")
    bad = []
    for importer, path in _sources(top).items():
        for target, name, line in _imports(importer, path, {**modules, **_sources(top)}):
            if target != "medquant" and not target.startswith("medquant."):
                continue
            dotted = target.split(".") + ([name] if name else [])
            for i, part in enumerate(dotted):
                if not _is_private(part):
                    continue
                # the package that owns the private name: the package holding a private module, the package
                # whose __init__ defines the name, or the package of the module that defines it
                prefix = ".".join(dotted[:i])
                if ".".join(dotted[:i + 1]) in modules or _is_package(prefix, modules):
                    owner = prefix
                else:
                    owner = ".".join(dotted[:i - 1])
                if importer != owner and not importer.startswith(owner + "."):
                    where = path.relative_to(REPO)
                    bad.append(f"{where}:{line}: imports {'.'.join(dotted)} (private to {owner})")
                break
    return bad


def test_no_private_names_across_packages():
    bad = _private_imports("medquant")
    assert not bad, "private names imported from another package:\n  " + "\n  ".join(bad)


def test_benchmarks_use_no_private_names():
    bad = _private_imports("benchmarks")
    assert not bad, "benchmarks import private names of medquant:\n  " + "\n  ".join(bad)


def _touches_sys_path(tree: ast.AST) -> list[int]:
    """Lines that read or edit ``sys``'s module search path (``path``) (or call ``site.addsitedir``)."""
    lines = []
    for node in ast.walk(tree):
        attribute = (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                     and (node.value.id, node.attr) in {("sys", "path"), ("site", "addsitedir")})
        from_sys = (isinstance(node, ast.ImportFrom) and node.module == "sys"
                    and any(a.name == "path" for a in node.names))
        if attribute or from_sys:
            lines.append(node.lineno)
    return lines


def test_no_sys_path_edits_in_tests_or_benchmarks():
    bad = []
    for top in ("tests", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            bad += [f"{path.relative_to(REPO)}:{line}" for line in _touches_sys_path(tree)]
    assert not bad, "the module search path (sys, path) touched (import the installed package / run with python -m):\n  " + "\n  ".join(bad)


def test_the_checker_itself():
    """Positive controls: relative imports resolve, a cycle is found, a private name's owner is its package."""
    assert _resolve_relative("medquant.quant.api", False, 2, "kernels.layout") == "medquant.kernels.layout"
    assert _resolve_relative("medquant.quant", True, 1, "api") == "medquant.quant.api"
    assert _resolve_relative("medquant.quant.api", False, 1, None) == "medquant.quant"
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _strongly_connected(set(edges), edges) == [["a", "b", "c"]]
    assert _cycle_path(["a", "b", "c"], edges) == ["a", "b", "c", "a"]
    assert _component("medquant.quant.core") == "quant" and _component("medquant") == ""


def test_sys_path_rule_sees_an_edit():
    tree = ast.parse("import sys\n\ndef f():\n    sys." + "path.insert(0, 'x')\n")
    assert _touches_sys_path(tree) == [4]


def test_no_references_to_documents_outside_the_repository():
    bad = []
    for path in sorted(PKG.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in {".pyc", ".so"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCES.search(line):
                bad.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not bad, ("references to documents outside the repository (write the formula or cite the paper):\n  "
                     + "\n  ".join(bad))


def test_no_library_module_is_used_only_by_benchmarks_or_the_cli():
    """Every module that benchmarks or the command line import is part of the library's public surface.

    The public surface: the entry points (the root package and every top-level component ``medquant.X``) and every
    module they reach through imports inside the library (``medquant.cli`` and ``medquant.testing`` aside). A module
    outside it that ``benchmarks/`` or ``medquant.cli`` imports is experiment code kept in the library. Tests
    neither make nor unmake a use: they test whatever is there. (A generic module that users call directly becomes
    public by being re-exported from its package.)
    """
    modules = _sources("medquant")
    library = {m: [t for t, _, _ in imports if t in modules] for m, imports in _graph().items()
               if _component(m) not in ("cli", "testing")}
    reached = {m for m in library if m.count(".") <= 1}
    frontier = list(reached)
    while frontier:
        for target in library.get(frontier.pop(), ()):
            if target not in reached:
                reached.add(target)
                frontier.append(target)

    experiment_users: dict[str, set[str]] = defaultdict(set)
    for importer, imports in _graph().items():
        if _component(importer) == "cli":
            for target, _, _ in imports:
                experiment_users[target].add(importer)
    for importer, path in _sources("benchmarks").items():
        for target, _, _ in _imports(importer, path, {**modules, **_sources("benchmarks")}):
            if target in modules:
                experiment_users[target].add(importer)

    bad = []
    for module in sorted(modules):
        if module in reached or _component(module) in ("cli", "testing") or not experiment_users.get(module):
            continue
        who = sorted(experiment_users[module])
        bad.append(f"{_where(module)}: imported only by {', '.join(who[:4])}{' ...' if len(who) > 4 else ''}")
    assert not bad, "library modules used only by benchmarks or the command line:\n  " + "\n  ".join(bad)
