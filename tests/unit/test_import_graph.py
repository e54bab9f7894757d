"""No import circles inside ``expertmesh``: a static check of every module's imports (no Ray).

Imports inside functions count like module-level ones: a deferred import only hides a circle
until the function first runs. Imports under ``if TYPE_CHECKING:`` never run, so they are left
out. Importing a submodule also runs its parent packages' ``__init__``; those implicit edges are
left out too, as a package that re-exports its submodules would otherwise always form a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import expertmesh

ROOT = Path(expertmesh.__file__).resolve().parent
PACKAGE = "expertmesh"


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth, but none under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``expertmesh`` modules that module ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                for a in node.names
            ]
        for target in targets:
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            while target not in modules and "." in target:  # `import a.b.attr` style
                target = target.rsplit(".", 1)[0]
            if target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None when ``graph`` is acyclic."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if colour[start] != white:
            continue
        path = [start]
        colour[start] = grey
        iters = [iter(sorted(graph[start]))]
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
            elif colour.get(nxt, black) == grey:
                return [*path[path.index(nxt) :], nxt]
            elif colour.get(nxt) == white:
                colour[nxt] = grey
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_finder_sees_circles_through_deferred_imports_but_not_type_checking(
    tmp_path: Path,
) -> None:
    """The checker itself: a function-level import closes a circle, TYPE_CHECKING does not."""
    (tmp_path / "a.py").write_text(
        "from expertmesh import b\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from expertmesh.c import C\n"
    )
    (tmp_path / "b.py").write_text("def f():\n    from expertmesh.a import X\n")
    (tmp_path / "c.py").write_text("import expertmesh.a\n")
    modules = {f"expertmesh.{m}": tmp_path / f"{m}.py" for m in "abc"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {
        "expertmesh.a": {"expertmesh.b"},
        "expertmesh.b": {"expertmesh.a"},
        "expertmesh.c": {"expertmesh.a"},
    }
    assert find_cycle(graph) in (
        ["expertmesh.a", "expertmesh.b", "expertmesh.a"],
        ["expertmesh.b", "expertmesh.a", "expertmesh.b"],
    )
    del graph["expertmesh.b"]
    assert find_cycle(graph) is None


def test_the_graph_covers_the_package() -> None:
    graph = import_graph()
    assert "expertmesh.sdk" in graph and "expertmesh.actors.controller" in graph
    assert "expertmesh.actors.state" in graph["expertmesh.actors.controller"]


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles found one by one, each broken at its last edge before looking for the next."""
    graph = {name: set(targets) for name, targets in graph.items()}
    cycles = []
    while (cycle := find_cycle(graph)) is not None:
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def test_no_import_cycles() -> None:
    cycles = all_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
