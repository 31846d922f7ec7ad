"""The shape of the repository around the package: a short README, run records kept out of
docs/, benchmark scripts that import without circles, and a maths page whose references
point at code that exists."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "benchmarks"
MATHS = ROOT / "docs" / "maths.md"
MAX_README_LINES = 150
SETUP_COMMANDS = (
    "pip install -e . && selmix demo",
    'pip install -e ".[dev]" && python -m pytest',
)


def test_readme_is_a_front_page_of_at_most_150_lines_with_one_results_table():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"
    separators = [line for line in lines if re.match(r"^\|\s*-{3,}", line)]
    assert len(separators) == 1, f"README.md has {len(separators)} tables, expected 1"


def test_readme_keeps_both_setup_commands_verbatim():
    text = README.read_text(encoding="utf-8")
    for command in SETUP_COMMANDS:
        assert f"    {command}\n" in text, command


def test_no_run_records_under_docs():
    records = sorted(
        str(path.relative_to(ROOT))
        for pattern in ("*.json", "*.jsonl")
        for path in (ROOT / "docs").rglob(pattern)
    )
    assert not records, f"run records belong in benchmarks/records/, found {records[:5]}"


def _benchmark_modules() -> dict[str, ast.Module]:
    return {
        path.stem: ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for path in sorted(BENCHMARKS.glob("*.py"))
    }


def _imported_names(tree: ast.Module) -> set[str]:
    """The top-level module names a file imports, anywhere in it (functions included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_benchmark_scripts_parse_and_import_each_other_without_a_cycle():
    modules = _benchmark_modules()  # a file that does not parse fails here
    assert "_common" in modules and "versus_baselines" in modules
    graph = {name: _imported_names(tree) & set(modules) - {name} for name, tree in modules.items()}
    assert _cycle(graph) is None, f"import cycle among benchmarks/: {_cycle(graph)}"


def test_benchmark_helper_modules_import_in_one_process():
    """The shared helpers import for real (not only parse): no circle at run time."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common
        import _paper
        import pretrain_cifar_mislas
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert _common.mislas_split is pretrain_cifar_mislas.mislas_split
    assert "SelMix (backbone fine-tuned)" in _paper.PAPER_TABLE3


# -- docs/maths.md ------------------------------------------------------------------------

REFERENCE = re.compile(r"`([\w/]+\.py):([\w.]+)`")


def _defined_names(tree: ast.Module) -> dict[str, set[str]]:
    """Top-level names of a module -> the names defined in its body (for classes)."""
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members = set()
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
            names[node.name] = members
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names[target.id] = set()
    return names


def _resolve(path: str, name: str) -> str | None:
    """None when ``path:name`` names a definition that exists; else what is missing."""
    candidates = [ROOT / path, ROOT / "src" / "selmix" / path]
    source = next((c for c in candidates if c.is_file()), None)
    if source is None:
        return f"{path} (no such file)"
    defined = _defined_names(ast.parse(source.read_text(encoding="utf-8")))
    top, _, member = name.partition(".")
    if top not in defined:
        return f"{path}:{name} ({top} is not defined there)"
    if member and member not in defined[top]:
        return f"{path}:{name} ({member} is not defined in {top})"
    return None


def test_maths_page_points_at_functions_that_exist():
    references = REFERENCE.findall(MATHS.read_text(encoding="utf-8"))
    assert len(references) >= 30  # every section names its functions
    missing = [problem for path, name in references if (problem := _resolve(path, name))]
    assert not missing, f"docs/maths.md names code that is not there: {missing}"


def test_maths_reference_resolver_reports_what_is_missing():
    assert _resolve("core/gain.py", "gain_matrix") is None
    assert _resolve("engine/feedback.py", "SelMixFeedback.sample_pairs") is None
    assert "no such file" in _resolve("nowhere.py", "f")
    assert "not defined" in _resolve("core/gain.py", "no_such_function")


def test_maths_page_quotes_the_papers_rows_the_benchmarks_print():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _paper import PAPER_TABLE3
    finally:
        sys.path.remove(str(BENCHMARKS))
    text = MATHS.read_text(encoding="utf-8")
    section = text.split("## 8.")[1].split("\n## ")[0]
    rows = {
        cells[0]: cells[1:]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert set(rows) == set(PAPER_TABLE3)
    for method, values in PAPER_TABLE3.items():
        mean, worst, harmonic, geometric, (covered, coverage) = (
            values["mean_recall"], values["min_recall"], values["h_mean"], values["g_mean"],
            values["coverage"],
        )  # fmt: skip
        expected = [f"{mean}", f"{worst}", f"{harmonic}", f"{geometric}", f"{covered} / {coverage}"]
        assert rows[method] == expected, method
