"""The shape of the package: no import circles, no oversized module, and a Trainer whose
methods live in its class.

The rule for circles: module A imports module B when A's code names B in an ``import`` or
``from ... import`` statement, at module level or inside a function (a deferred import is
still a dependency, only a later one); imports under ``if TYPE_CHECKING:`` do not count
(they never run). ``from package import name`` imports the module ``package.name`` when
there is one, else ``package`` itself. Importing ``a.b.c`` also runs ``a/__init__.py`` and
``a/b/__init__.py``, but that edge is Python's, not the code's, and is not counted: a
package's ``__init__`` only hands on the names of the modules below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "selmix"
#: The most lines a module of src/selmix may have (about 700: a reader can hold it).
MAX_LINES = 720


def _module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the code of ``tree`` imports (see the module
    docstring); ``module`` is its own name, ``is_package`` whether it is an ``__init__``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return (found & modules) - {module}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the modules of selmix (under ``src``) it imports."""
    paths = {_module_name(path, src): path for path in sorted((src / "selmix").rglob("*.py"))}
    return {
        name: _imported_names(
            ast.parse(path.read_text(), filename=str(path)), name,
            path.name == "__init__.py", set(paths),
        )
        for name, path in paths.items()
    }  # fmt: skip


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return circles


def _edges_within(graph: dict[str, set[str]], circle: list[str]) -> list[str]:
    members = set(circle)
    return [f"{a} -> {b}" for a in circle for b in sorted(graph[a]) if b in members]


def test_no_import_circle_in_selmix():
    graph = import_graph()
    circles = find_circles(graph)
    assert not circles, "import circles: " + "; ".join(
        ", ".join(_edges_within(graph, circle)) for circle in circles
    )


def test_the_circle_finder_sees_a_deferred_import_and_a_relative_one():
    """The rule above, on small made-up modules: a circle through a function-level import
    is found, one through ``TYPE_CHECKING`` is not."""
    lower = ast.parse("def f():\n    from pkg.upper import g\n")
    upper = ast.parse("from .lower import f\n")
    typing_only = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.upper\n"
    )
    modules = {"pkg", "pkg.lower", "pkg.upper", "pkg.t"}
    assert _imported_names(lower, "pkg.lower", False, modules) == {"pkg.upper"}
    assert _imported_names(upper, "pkg.upper", False, modules) == {"pkg.lower"}
    assert _imported_names(typing_only, "pkg.t", False, modules) == set()
    graph = {"pkg.lower": {"pkg.upper"}, "pkg.upper": {"pkg.lower"}, "pkg.t": set()}
    assert find_circles(graph) == [["pkg.lower", "pkg.upper"]]
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_is_too_long(name: str):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it"


def test_no_top_level_function_of_finetune_takes_the_trainer():
    """The Trainer's behaviour is in its methods; the parts it calls never see it."""
    offenders = []
    for path in sorted((PACKAGE / "finetune").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            for arg in args:
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                if arg.arg == "trainer" or "Trainer" in annotation:
                    offenders.append(f"{path.name}:{node.name}({arg.arg})")
    assert not offenders, offenders
