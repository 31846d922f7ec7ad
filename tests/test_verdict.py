"""Whether a run worked, said in one line (#37): the verdict (objective before -> after, the
best baseline, a coverage constraint met or missed), the selected step and start head, the
objective's metric marked in the tables, and a multiplier plot that can be read."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selmix.cli import main
from selmix.report import (
    format_metrics_table,
    format_start,
    format_verdict,
    objective_metric,
    write_report,
)
from selmix.report.html import HIGHLIGHTED_MULTIPLIERS, _plot_multipliers

torch.set_num_threads(1)
K = 10


def metrics(mean_recall: float, min_recall: float, min_coverage: float) -> dict:
    return {
        "mean_recall": mean_recall, "min_recall": min_recall, "min_coverage": min_coverage,
        "per_class_recall": [mean_recall] * K, "per_class_coverage": [1 / K] * K,
    }  # fmt: skip


BEFORE = metrics(0.700, 0.300, 0.080)
AFTER = metrics(0.712, 0.350, 0.091)


def test_objective_names_map_to_their_metrics() -> None:
    assert objective_metric("min_recall") == ("min_recall", None)
    assert objective_metric("mean_recall_min_coverage") == ("mean_recall", "min_coverage")
    assert objective_metric("h_mean_min_head_tail_coverage") == (
        "h_mean", "min_head_tail_coverage",
    )  # fmt: skip
    assert objective_metric("my_objective") == (None, None)


def test_verdict_of_a_coverage_run_that_misses_its_target() -> None:
    # K = 10, alpha 0.95: target 9.5%, reached 9.1%
    line = format_verdict("mean_recall_min_coverage", BEFORE, AFTER, alpha=0.95)
    assert line == (
        "verdict: mean recall 70.0% -> 71.2% (+1.2): improved; min coverage 9.1% < target "
        "9.5%: constraint missed"
    )
    met = format_verdict("mean_recall_min_coverage", BEFORE, AFTER, alpha=0.9)
    assert met.endswith("min coverage 9.1% >= target 9.0%: constraint met")


def test_verdict_names_the_best_baseline_and_a_worse_result() -> None:
    baselines = {"crt": metrics(0.7, 0.40, 0.09), "la": metrics(0.7, 0.20, 0.09)}
    line = format_verdict("min_recall", BEFORE, AFTER, baselines=baselines)
    assert line == (
        "verdict: min recall 30.0% -> 35.0% (+5.0): improved; best baseline crt 40.0%: not beaten"
    )
    worse = format_verdict("min_recall", AFTER, BEFORE)
    assert worse == "verdict: min recall 35.0% -> 30.0% (-5.0): worse"
    assert "not a test metric" in format_verdict("my_objective", BEFORE, AFTER)


def test_tables_mark_the_objective_and_its_constraint() -> None:
    table = format_metrics_table({"before": BEFORE, "after": AFTER},
                                 objective="mean_recall_min_coverage")  # fmt: skip
    rows = {line.split("  ")[0]: line for line in table.splitlines()[2:]}
    assert set(rows) == {"mean recall (objective)", "min recall", "min coverage (constraint)"}


def test_start_line_names_the_step_and_the_head() -> None:
    assert format_start(0, {"head_init": "crt"}, "auto") == (
        "selected step 0, the starting weights; start head: cRT (crt, chosen by head_init=auto)"
    )
    assert format_start(8, None, "none", "best") == (
        "selected step 8 (best); start head: the model's own (model)"
    )


def test_report_shows_each_runs_verdict_and_marks_the_objective(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = {
        "mean_recall_min_coverage": {"before": BEFORE, "after": AFTER, "alpha": 0.95,
                                     "selected_step": 0, "head_init": {"head_init": "crt"},
                                     "head_init_method": "auto"},
        "min_recall": {"before": BEFORE, "after": AFTER,
                       "baselines": {"crt": metrics(0.7, 0.40, 0.09)}},
    }  # fmt: skip
    text = write_report(tmp_path, runs).read_text()
    for name in runs:
        expected = format_verdict(name, BEFORE, AFTER, alpha=runs[name].get("alpha"),
                                  baselines=runs[name].get("baselines"))  # fmt: skip
        # at the top and in the run's section
        assert text.count(html.escape(expected)) == 2
    assert "min coverage 9.1% &lt; target 9.5%: constraint missed" in text
    assert "best baseline crt 40.0%: not beaten" in text
    assert "start head: cRT (crt, chosen by head_init=auto)" in text
    # red for a missed constraint, green for an improved objective
    assert '<p class="verdict bad"><b>mean_recall_min_coverage</b>' in text
    assert '<p class="verdict good"><b>min_recall</b>' in text
    # one column per run (shared before): each marks its own objective's cell
    marked = re.findall(r'<td class="[^"]*objective[^"]*"', text)
    assert len(marked) == 2
    assert len(re.findall(r'<td class="[^"]*constraint[^"]*"', text)) == 1


def test_multiplier_plot_highlights_the_largest_and_greys_the_rest() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    steps = [0, 1, 2]
    peaks = [0.1, 5.0, 0.2, 3.0, 0.0, 0.3, 4.0, 0.05, 0.2, 0.1]
    history = [[peak * step / 2 for peak in peaks] for step in steps]
    axis = Figure().add_subplot()
    _plot_multipliers(axis, steps, history, [f"c{k}" for k in range(K)])
    grey = [line for line in axis.get_lines() if to_hex(line.get_color()) == "#b8bec6"]
    coloured = [line for line in axis.get_lines() if line not in grey]
    assert len(grey) == K - HIGHLIGHTED_MULTIPLIERS
    assert [line.get_label() for line in coloured] == ["1 c1", "6 c6", "3 c3"]
    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    assert labels == [f"other {K - HIGHLIGHTED_MULTIPLIERS} classes", "1 c1", "6 c6", "3 c3"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verdict") / "images"
    rng = np.random.default_rng(0)
    colours = ((220, 40, 40), (40, 200, 60), (50, 70, 230))
    for split, counts in (("train", (14, 10, 8)), ("test", (4, 4, 4))):
        for label, (colour, count) in enumerate(zip(colours, counts, strict=True)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                noise = rng.normal(0, 40, (12, 12, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    from selmix.models import create_model
    from selmix.models.checkpoint import save_model

    torch.manual_seed(0)
    save_model(root.parent / "start.pt", create_model("small_cnn", 3, in_channels=3), {})
    return root


def test_finetune_prints_the_verdict_start_head_and_marked_table(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["finetune", "--data", f"imagefolder:{tree}", "--val-per-class", "2", "--device",
            "cpu", "--checkpoint", str(tree.parent / "start.pt"), "--out", str(out),
            "--steps", "2", "--batch-size", "8", "--set", "feedback_every=1",
            "--objective", "mean_recall_min_coverage", "--head-init", "auto",
            "--set", "progress=false"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    saved = json.loads((out / "metrics.json").read_text())
    expected = format_verdict("mean_recall_min_coverage", saved["before"], saved["after"],
                              alpha=0.95)  # fmt: skip
    assert saved["verdict"] == expected and expected in printed
    assert re.search(r"min coverage [\d.]+% (<|>=) target 31\.7%: constraint (met|missed)$",
                     expected)  # fmt: skip
    start = [line for line in printed if line.startswith("selected step")]
    assert len(start) == 1 and "chosen by head_init=auto" in start[0]
    assert f"({saved['start_head']}, chosen by head_init=auto)" in start[0]
    assert any(line.startswith("mean recall (objective)") for line in printed)
    assert any(line.startswith("min coverage (constraint)") for line in printed)
