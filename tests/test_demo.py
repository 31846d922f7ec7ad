"""The packaged demo, in its fast form (the full one is measured, not tested)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from selmix.cli import main
from selmix.demo import DEMO_OBJECTIVES, demo_settings, run_demo
from selmix.report import format_verdict


def test_the_report_dependency_is_a_core_dependency() -> None:
    # `pip install -e . && selmix demo` (the README's command) must write the report
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    core = {
        requirement.split(">")[0].split("=")[0].strip() for requirement in project["dependencies"]
    }
    assert "matplotlib" in core


@pytest.mark.slow
def test_fast_demo_writes_table_metrics_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "demo"
    summary = run_demo(out_dir=out, fast=True, progress=False)

    printed = capsys.readouterr().out
    assert summary["table"] in printed
    header = summary["table"].splitlines()[0].split()
    assert header[2:] == ["before", *DEMO_OBJECTIVES]
    assert "min coverage" in summary["table"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["after"]) == set(DEMO_OBJECTIVES)
    assert metrics["before"] == summary["before"]
    for values in (metrics["before"], *metrics["after"].values()):
        assert 0 <= values["min_recall"] <= values["mean_recall"] <= 1
    assert metrics["settings"] == demo_settings(fast=True)

    index = out / "index.html"
    assert summary["report"] == index and index.is_file()
    for name in DEMO_OBJECTIVES:
        for kind in ("recall", "gains", "history"):
            assert (out / f"{kind}_{name}.png").is_file()
    assert (out / "pretrained.pt").is_file()
    # each run says whether it worked, on the console and in the report
    page = index.read_text()
    for name in DEMO_OBJECTIVES:
        verdict = format_verdict(name, metrics["before"], metrics["after"][name])
        assert f"{name}: {verdict}" in printed.splitlines()
        assert html.escape(verdict) in page
        assert any(line.startswith(f"{name}: selected step ") for line in printed.splitlines())


def test_demo_command_passes_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run_demo(**kwargs: object) -> dict:
        seen.update(kwargs)
        return {}

    monkeypatch.setattr("selmix.demo.run_demo", fake_run_demo)
    assert main(["demo", "--fast", "--out", "somewhere", "--seed", "3", "--imbalance", "200"]) == 0
    assert seen == {
        "out_dir": "somewhere", "device": "cpu", "seed": 3, "fast": True,
        "data_options": {"imbalance": 200.0}, "threads": None, "progress": True,
    }  # fmt: skip
    assert main(["demo", "--fast", "--out", "somewhere", "--no-progress"]) == 0
    assert seen["progress"] is False
