"""The shape of the package: its layers, no import circles, no import hidden in a function,
no private name across packages, the curated public names, no oversized module, and a
Trainer whose methods live in its class.

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
import sys
import types
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


# -- the layers --------------------------------------------------------------------------------

#: The layers of selmix, lowest first. A module imports modules of its own layer and of the
#: layers below it, never of a layer above (longest prefix wins: ``selmix.core.gain`` is in
#: ``core``, ``selmix`` itself, the public API, is the top).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("selmix._validation", "selmix._config", "selmix._io", "selmix._progress",
              "selmix._version", "selmix.devices")),
    ("core", ("selmix.core",)),  # the maths: torch only, no I/O, devices or processes
    ("data", ("selmix.data",)),
    ("models", ("selmix.models",)),
    ("engine", ("selmix.engine",)),  # evaluation, views, feedback, processes, hardware
    ("baselines", ("selmix.baselines",)),
    ("finetune", ("selmix.finetune",)),  # the SelMix run
    ("report", ("selmix.report",)),
    ("demo", ("selmix.demo",)),
    ("cli", ("selmix.cli", "selmix.__main__")),
    ("api", ("selmix",)),
)  # fmt: skip


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of ``module``'s layer, or None when no prefix names it."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (index, len(prefix))
    return None if best is None else best[0]


def test_every_module_has_a_layer():
    assert [name for name in _modules() if layer_of(name) is None] == []


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, upward


def test_the_layer_rule_sees_an_upward_import():
    assert layer_of("selmix.core.gain") < layer_of("selmix.engine.views") < layer_of("selmix")
    assert layer_of("selmix.models.checkpoint") == layer_of("selmix.models")
    assert layer_of("selmixer") is None


def _third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"selmix"}


def test_the_core_uses_torch_and_numpy_only():
    for path in sorted((PACKAGE / "core").glob("*.py")):
        assert _third_party_imports(path) <= {"torch", "numpy"}, path.name


# -- imports inside functions ------------------------------------------------------------------

#: What may be imported inside a function: optional extras (timm, transformers, tensorboard) and
#: heavy libraries that only some paths need (image decoding, torchvision's models and
#: transforms, matplotlib's drawing, safetensors files), so that ``import selmix`` stays light.
LAZY_IMPORTS = frozenset(
    {"PIL", "torchvision", "timm", "transformers", "torch.utils.tensorboard", "matplotlib",
     "safetensors"}
)  # fmt: skip


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    found.append((sub.lineno, sub.module or "." * sub.level))
                elif isinstance(sub, ast.Import):
                    found.extend((sub.lineno, alias.name) for alias in sub.names)
    return sorted(set(found))


def _is_lazy(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in LAZY_IMPORTS)


def test_no_import_inside_a_function_outside_the_command_line():
    """Outside :mod:`selmix.cli` only :data:`LAZY_IMPORTS` are deferred; the command line
    imports each command's library code when that command runs, so ``selmix --help`` and a
    usage error answer before torch is imported."""
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "cli"
        for line, module in _function_level_imports(path)
        if not _is_lazy(module)
    ]
    assert not offenders, offenders


# -- privacy and the public names --------------------------------------------------------------


def _package_of(module: str) -> str:
    """``selmix.<sub>`` for a module of a subpackage, ``selmix`` for a top-level module."""
    parts = module.split(".")
    if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir():
        return ".".join(parts[:2])
    return "selmix"


def test_no_private_name_is_imported_across_packages():
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selmix")):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and _package_of(node.module) != _package_of(name):
                    offenders.append(f"{name} imports {node.module}.{alias.name}")
    assert not offenders, offenders


#: The public API: the names at ``selmix.*``; everything else through its subpackage.
PUBLIC = [
    "Evaluation", "FinetuneConfig", "FinetuneResult", "Objective", "PretrainConfig", "Trainer",
    "__version__", "all_metrics", "baseline", "create_model", "evaluate", "finetune",
    "get_objective", "list_baselines", "list_models", "list_objectives", "load_data",
    "load_model", "pretrain", "register_mixup", "register_model", "register_objective",
    "save_model", "split_model",
]  # fmt: skip


def test_the_public_names_are_the_curated_list():
    import selmix

    assert sorted(selmix.__all__) == sorted(PUBLIC)
    exposed = {
        name for name, value in vars(selmix).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }  # fmt: skip
    assert exposed == set(PUBLIC) - {"__version__"}, exposed ^ (set(PUBLIC) - {"__version__"})


def test_no_alias_keeps_an_old_name():
    """selmix is unreleased: a name that moved is imported from its new home, not aliased
    (a package's ``__init__`` hands names on with ``name as name``, the explicit re-export)."""
    offenders = []
    for name, path in _modules().items():
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selmix"):
                offenders += [f"{name}: {a.name} as {a.asname}" for a in node.names
                              if a.asname is not None and a.asname == a.name]  # fmt: skip
    assert not offenders, offenders
