"""The shape of a selmix checkout in numbers: modules, import edges and circles, layers,
public names, imports inside functions, private names across modules and packages, and the
sizes of README, src/ and benchmarks/.

    python scripts/structure_counts.py            # this checkout
    python scripts/structure_counts.py --root DIR # another one (e.g. a worktree of an older commit)

The import graph and the circle finder are those of ``tests/test_structure.py``; the layers
are counted as the longest chain of imports between modules (a module's layer is one above
the highest layer it imports), so the figure means the same for any layout.
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))

from test_structure import find_circles, import_graph  # noqa: E402


def _python_lines(folder: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.rglob("*.py"))


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(module: str, package_root: Path) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (package_root / parts[-1]).is_dir():
        return ".".join(parts[:2])
    return "selmix"


def _public_names(init: Path) -> int:
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return len(ast.literal_eval(node.value))
    return 0


def counts(root: Path) -> dict[str, int]:
    src = root / "src"
    package = src / "selmix"
    graph = import_graph(src)
    # edges into a package's own __init__ re-exports count like any other

    @functools.cache
    def depth(module: str) -> int:
        return 1 + max((depth(t) for t in graph[module] if t != module), default=0)

    circles = find_circles(graph)
    layers = 0 if circles else max(depth(m) for m in graph)
    function_level = function_level_selmix = function_level_outside_cli = 0
    private_modules = private_packages = 0
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, src)
        tree = ast.parse(path.read_text())
        in_cli = path.relative_to(package).parts[0] == "cli"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        function_level += 1
                        module = (
                            sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                        ) or ""
                        function_level_selmix += module.startswith("selmix")
                        function_level_outside_cli += not in_cli
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selmix"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private_modules += node.module != name
                        private_packages += _package_of(node.module, package) != _package_of(
                            name, package
                        )
    return {
        "modules": len(graph),
        "import edges": sum(len(t) for t in graph.values()),
        "import circles": len(circles),
        "longest import chain (layers)": layers,
        "public names at selmix.*": _public_names(package / "__init__.py"),
        "imports inside functions": function_level,
        "  of selmix modules": function_level_selmix,
        "  outside selmix.cli": function_level_outside_cli,
        "private names imported from another module": private_modules,
        "private names imported across packages": private_packages,
        "README lines": len((root / "README.md").read_text().splitlines()),
        "src/ Python lines": _python_lines(src),
        "benchmarks/ Python lines": _python_lines(root / "benchmarks"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=HERE, help="the checkout to measure")
    parser.add_argument("--versus", type=Path, default=None, help="a second checkout, side by side")
    args = parser.parse_args()
    first = counts(args.root)
    second = counts(args.versus) if args.versus else None
    header = f"| | {args.root.name} |" + (f" {args.versus.name} |" if second else "")
    print(header)
    print("|---|---:|" + ("---:|" if second else ""))
    for key, value in first.items():
        print(f"| {key} | {value} |" + (f" {second[key]} |" if second else ""))


if __name__ == "__main__":
    main()
