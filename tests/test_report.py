"""The HTML report and the plain-text tables."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import torch
from PIL import Image

from selmix.core.metrics import all_metrics
from selmix.report import format_metrics_table, format_per_class_table, write_report

pytest.importorskip("matplotlib")

K = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _References(HTMLParser):
    """Collects every src= and href= of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.references.append(value)


def _metrics(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    confusion = torch.rand(K, K, generator=generator) + 4 * torch.eye(K)
    return all_metrics(confusion)


def _run(seed: int, multipliers: bool) -> dict:
    generator = torch.Generator().manual_seed(seed)
    history = [
        {
            "step": step,
            "objective": 0.5 + step / 100,
            "metrics": _metrics(seed + step),
            "multipliers": torch.softmax(torch.randn(K, generator=generator), 0).tolist()
            if multipliers
            else None,
        }
        for step in range(0, 31, 10)
    ]
    gains = [(step, torch.randn(K, K, generator=generator)) for step in range(0, 31, 10)]
    return {"before": _metrics(0), "after": _metrics(seed), "history": history, "gains": gains}


def _check_page(index: Path) -> list[str]:
    parser = _References()
    parser.feed(index.read_text(encoding="utf-8"))
    assert parser.references, "the page references no plot"
    for reference in parser.references:
        parsed = urlparse(reference)
        assert not parsed.scheme and not parsed.netloc, f"{reference} needs a server"
        target = index.parent / reference
        assert target.is_file(), f"{reference} does not exist"
        if target.suffix == ".png":
            assert target.read_bytes()[:8] == PNG_SIGNATURE
            with Image.open(target) as image:
                image.verify()
            with Image.open(target) as image:
                assert image.width > 100 and image.height > 100
    return parser.references


def test_report_references_only_existing_valid_pngs(tmp_path: Path) -> None:
    runs = {"min_recall": _run(1, True), "g_mean": _run(2, False)}
    index = write_report(tmp_path / "report", runs, classes=["a", "b", "c", "d"],
                         description="test run", details={"seed": 0})  # fmt: skip
    assert index == tmp_path / "report" / "index.html"
    references = _check_page(index)
    # per objective: recall bars, gain heat-maps, trajectory
    for name in ("min_recall", "g_mean"):
        for kind in ("recall", "gains", "history"):
            assert f"{kind}_{name}.png" in references
    text = index.read_text()
    assert "<table" in text and "min recall" in text and "after: g_mean" in text


def test_report_takes_a_finetune_result_and_escapes_names(tmp_path: Path) -> None:
    run = _run(3, True)
    result = SimpleNamespace(history=run["history"], gains=run["gains"])
    runs = {"<b>odd name</b>": {"before": run["before"], "after": run["after"], "result": result}}
    index = write_report(tmp_path, runs)
    _check_page(index)
    text = index.read_text()
    assert "<b>odd name</b>" not in text and "&lt;b&gt;odd name&lt;/b&gt;" in text
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_report_without_history_has_only_recall_plots(tmp_path: Path) -> None:
    runs = {"start": {"before": _metrics(0), "after": _metrics(5)}}
    references = _check_page(write_report(tmp_path, runs))
    assert references == ["recall_start.png"]


def test_report_rejects_runs_without_metrics(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runs"):
        write_report(tmp_path, {})
    with pytest.raises(ValueError, match="before"):
        write_report(tmp_path, {"x": {"after": _metrics(0)}})


def test_metrics_table_rows_columns_and_change() -> None:
    before, after = _metrics(0), _metrics(1)
    table = format_metrics_table({"before": before, "after": after})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "(%)", "before", "after", "change"]
    assert len(lines) == 2 + 8  # header, rule, one row per scalar metric
    row = next(line for line in lines if line.startswith("min recall"))
    values = row.split()[2:]
    assert float(values[0]) == pytest.approx(100 * before["min_recall"], abs=0.05)
    assert float(values[1]) == pytest.approx(100 * after["min_recall"], abs=0.05)
    delta = 100 * (after["min_recall"] - before["min_recall"])
    assert float(values[2]) == pytest.approx(delta, abs=0.11)
    three = format_metrics_table({"before": before, "a": after, "b": after}, metrics=["g_mean"])
    assert len(three.splitlines()) == 3 and "change" not in three
    with pytest.raises(ValueError, match="columns"):
        format_metrics_table({})


def test_per_class_table() -> None:
    table = format_per_class_table({"test": _metrics(0)}, classes=["a", "b", "c", "d"])
    assert len(table.splitlines()) == 2 + K
    assert "3 d" in table
    with pytest.raises(ValueError, match="classes"):
        format_per_class_table({"test": _metrics(0)}, classes=["a"])


def test_importing_the_report_and_cli_does_not_import_matplotlib() -> None:
    code = (
        "import sys, selmix.report, selmix.cli, selmix.demo; "
        "sys.exit(1 if 'matplotlib' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
