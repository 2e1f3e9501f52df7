"""The shape of the house, checked from the source: no import cycles, formats never reach a door, small modules.

Every module of ``dask_loom`` is parsed with :mod:`ast` and every import is
counted: module level, inside functions, under ``if TYPE_CHECKING:``.  A
function-level import still ties two modules together (one cannot be
understood, moved or tested without the other), so it counts as an edge like
any other.  ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg`` itself (its ``__init__``).  Importing ``a.b.c`` also
runs the ``__init__`` of ``a`` and ``a.b``; those implicit edges are not
counted, as import linters do not count them, because every package
``__init__`` re-exports its submodules and would make every package a cycle.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "dask_loom"

#: Format packages: they read and write data, and are used by the doors, never the reverse.
FORMATS = ("loom", "zarr", "anndata", "ome", "hdf5", "storage", "blocks", "ops")
#: The doors users come in by.
DOORS = ("dask_loom._xarray", "dask_loom.xarray_backend", "dask_loom.cli", "dask_loom.analysis")
MAX_LINES = 800

#: Cycles known and left on purpose, each with the reason (none today: add one only with its reason).
KNOWN_CYCLES: list[frozenset[str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _extensions() -> set[str]:
    # Compiled modules (built from a .c source beside them, or present only as a .so)
    # import nothing of ours: an import of one is a leaf, not an edge to the package.
    found = set()
    for pattern in ("*.c", "*.so", "*.pyd"):
        for p in ROOT.rglob(pattern):
            parts = list(p.relative_to(ROOT.parent).parts)
            parts[-1] = parts[-1].split(".")[0]
            found.add(".".join(parts))
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` over the modules of dask_loom."""
    mods = _modules()
    ext = _extensions()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub not in ext:
                        targets.append(sub if sub in mods else base)
            for t in targets:
                # `import dask_loom.loom._layers as x` names the deepest module that exists.
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    graph[mod].setdefault(t, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        # Iterative, so deep graphs never hit the recursion limit.
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _one_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest closed path through the first module of ``comp`` (breadth first), for the message."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def _describe(graph: dict[str, dict[str, int]], path: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(path)) + f" -> {path[-1]}"


def test_graph_sees_every_kind_of_import(tmp_path):
    # The parser itself: a function-level import, a TYPE_CHECKING import and a
    # relative `from . import module` are all edges (a test that cannot fail is a defect).
    g = import_graph()
    assert "dask_loom.cli._main" in g["dask_loom.cli"]
    assert any(m.startswith("dask_loom.cli.") for m in g["dask_loom.cli._main"])
    assert cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c"]]
    assert _one_cycle({"a": {"b": 1}, "b": {"a": 2, "c": 3}, "c": {"a": 4}}, ["a", "b", "c"]) == [
        "a",
        "b",
        "a",
    ]
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\ndef f():\n    from . import c\n"
    tree = ast.parse(src)
    found = [_resolve("p.a", False, n) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert found == ["p.b", "p"]


def test_no_import_cycles():
    g = import_graph()
    found = [c for c in cycles(g) if frozenset(c) not in KNOWN_CYCLES]
    assert not found, "import cycles:\n" + "\n".join(
        f"  {len(c)} modules: {', '.join(c)}\n    e.g. {_describe(g, _one_cycle(g, c))}" for c in found
    )


def test_formats_do_not_import_doors():
    g = import_graph()

    def is_door(m: str) -> bool:
        return any(m == d or m.startswith(d + ".") for d in DOORS)

    bad = [
        f"{m} imports {t} (line {line})"
        for m, targets in g.items()
        if m.split(".")[1:2] and m.split(".")[1] in FORMATS
        for t, line in targets.items()
        if is_door(t)
    ]
    assert not bad, "formats importing a door:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_small(name):
    n = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, (
        f"{name} has {n} lines (at most {MAX_LINES}): split it into cohesive private modules"
    )


def _converter_requests() -> list[tuple[str, str, str]]:
    """Every ``converter("source", "target")`` call in the package: (module, source, target)."""
    out = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "converter"
                and len(node.args) == 2
                and all(isinstance(a, ast.Constant) for a in node.args)
            ):
                out.append((mod, node.args[0].value, node.args[1].value))
    return out


def test_every_door_method_finds_its_converter():
    # Formats reach a door only through dask_loom._doors: each pair they ask for must be
    # registered by the door module _doors.DOORS names (else the method fails at first use).
    pytest.importorskip("xarray")
    from dask_loom import _doors

    asked = _converter_requests()
    assert {(s, t) for _, s, t in asked} >= {
        ("loom", "xarray"),
        ("loom", "anndata"),
        ("tensor", "xarray"),
        ("mapped", "anndata"),
    }
    for mod, source, target in asked:
        fn = _doors.converter(source, target)
        assert fn.__module__.startswith(_doors.DOORS[target]), (mod, source, target, fn.__module__)
    with pytest.raises(LookupError, match="no conversion of 'nothing'"):
        _doors.converter("nothing", "xarray")


def _module_aliases(mod: str, tree: ast.AST, mods: dict[str, Path]) -> set[str]:
    """Names that a module binds to other modules of the package (``from dask_loom import cli``)."""
    names = set()
    is_package = mods[mod].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods and a.asname:
                    names.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, is_package, node)
            for a in node.names:
                if f"{base}.{a.name}" in mods:
                    names.add(a.asname or a.name)
    return names


def _patches(tree: ast.AST, aliases: set[str]) -> list[int]:
    """Lines that write into another module: ``mod.x = ...``, ``mod.x[k] = ...``, ``setattr(mod, ...)``."""

    def into_module(t: ast.AST) -> bool:
        while isinstance(t, (ast.Subscript, ast.Attribute)):
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in aliases:
                return True
            t = t.value
        return False

    lines = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) in ("setattr", "delattr")
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in aliases
        ):
            lines.append(node.lineno)
        lines += [node.lineno for t in targets if into_module(t)]
    return lines


def test_no_module_patches_another():
    # Commands, converters and hooks are registered where they are defined or in one
    # table (cli/_main.py COMMANDS, _doors): never by assigning into another module.
    mods = _modules()
    src = "from dask_loom import cli\nimport dask_loom.loom as L\ndef f():\n    cli.COMMANDS['x'] = 1\n    L.y = 2\n"
    tree = ast.parse(src)
    assert _patches(tree, {"cli", "L"}) == [4, 5]
    bad = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bad += [f"{mod} line {n}" for n in _patches(tree, _module_aliases(mod, tree, mods))]
    assert not bad, "modules writing into other modules:\n  " + "\n  ".join(bad)


#: Operations that reach the connection only through its public API and its LayerHost.
HOST_ONLY = (
    "dask_loom.loom._write",
    "dask_loom.loom._modify",
    "dask_loom.loom._scan",
    "dask_loom.zarr._reshard",
    "dask_loom.loom._aggregate",
    "dask_loom.loom._inspect",
    "dask_loom.loom._convert",
    "dask_loom.loom._view",
    "dask_loom._xarray",
    "dask_loom.analysis._loom",
    "dask_loom.analysis._write",
    "dask_loom.loom._combine",
)
#: The names these modules give a connection.
CONNECTION_NAMES = {"ds", "other", "conn"}


def _connection_privates() -> set[str]:
    from dask_loom.loom._connection import LoomConnection

    return {n for n in vars(LoomConnection) if n.startswith("_") and not n.startswith("__")}


def _private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    # ds._x, and ds.ca._x: the private members of the connection's managers are its internals too;
    # a private method of the connection by any name (c._writing) or through getattr.
    methods = _connection_privates()
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in methods
        ):
            found.append((node.lineno, f"getattr(..., {node.args[1].value!r})"))
        if isinstance(node, ast.Attribute) and node.attr in methods:
            found.append((node.lineno, ast.unparse(node)))
            continue
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Attribute):
            owner = owner.value
        if isinstance(owner, ast.Name) and owner.id in CONNECTION_NAMES:
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_operations_use_the_layer_host_not_connection_internals():
    src = (
        "def f(ds, c):\n    ds._writing()\n    ds.__dask_loom_layer_host__()\n    ds.ca._cache['k'] = 1\n"
        "    ds.ca.keys()\n    c._writing()\n    getattr(c, '_compute_kwargs', dict)()\n    c._x\n"
    )
    assert _private_uses(ast.parse(src)) == [
        (2, "ds._writing"),
        (4, "ds.ca._cache"),
        (6, "c._writing"),
        (7, "getattr(..., '_compute_kwargs')"),
    ]
    mods = _modules()
    bad = []
    for mod in HOST_ONLY:
        bad += [
            f"{mod} line {n}: {what}"
            for n, what in _private_uses(ast.parse(mods[mod].read_text(encoding="utf-8")))
        ]
    assert not bad, "operations reaching into the connection's private members:\n  " + "\n  ".join(bad)
