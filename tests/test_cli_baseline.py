"""End-to-end tests of ``selmix baseline`` on the packaged demo data (tiny settings)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from selmix.baselines import class_log_prior
from selmix.cli import main
from selmix.data import load_data
from selmix.models.checkpoint import load_model

# a 242-image long-tailed training set (100 down to 1 per class) and 10 per class to validate
DATA_OPTIONS = {"imbalance": 100, "max_per_class": 100, "val_per_class": 10}
DATA = ["--data", "demo", "--imbalance", "100", "--max-per-class", "100",
        "--val-per-class", "10", "--device", "cpu"]  # fmt: skip
TAUS = [0.5, 1.5, 3.0]  # no 0: whichever tau wins, the bias moves
TINY = {
    "posthoc_la": ["--objective", "g_mean", "--set", f"taus={TAUS}"],
    # --steps is la_finetune's: crt ignores it, with a warning
    "crt": ["--epochs", "1", "--lr", "0.05", "--batch-size", "16", "--steps", "5", "--no-progress"],
    "la_finetune": ["--steps", "2", "--batch-size", "8", "--la-tau", "0.5", "--no-progress"],
    "mislas_stage2": ["--epochs", "1", "--smooth-head", "0.2", "--no-progress"],
}
FINETUNE_META = {"classes", "mean", "std", "command", "settings", "preprocessing"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the fastest on a small, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    argv = ["pretrain", *DATA, "--model", "small_cnn", "--out", str(out), "--epochs", "1",
            "--batch-size", "32", "--set", "augment=false", "--set", "progress=false"]  # fmt: skip
    assert main(argv) == 0
    return out / "model.pt"


@pytest.fixture(scope="module")
def run(
    pretrained: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, str, str]]:
    """Runs each method once (tiny settings); returns its OUT, stdout and stderr."""
    done: dict[str, tuple[Path, str, str]] = {}

    def run_method(method: str) -> tuple[Path, str, str]:
        if method not in done:
            out = tmp_path_factory.mktemp("baseline") / method
            argv = ["baseline", *DATA, "--checkpoint", str(pretrained), "--out", str(out),
                    "--method", method, *TINY[method]]  # fmt: skip
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                status = main(argv)
            assert status == 0, stderr.getvalue()
            done[method] = (out, stdout.getvalue(), stderr.getvalue())
        return done[method]

    return run_method


@pytest.mark.parametrize("method", ["posthoc_la", "crt", "la_finetune", "mislas_stage2"])
def test_baseline_writes_model_metrics_config_and_details(
    method: str, run: Callable[[str], tuple[Path, str, str]], pretrained: Path, tmp_path: Path
) -> None:
    out, printed, errors = run(method)
    assert f"method: {method}" in printed
    assert "before" in printed and "after" in printed and "min recall" in printed
    if method == "crt":
        assert "warning: method crt ignores the setting(s) steps" in errors
    else:
        assert errors == ""

    details = {"posthoc_la": True, "crt": True, "la_finetune": False, "mislas_stage2": True}
    details = details[method]
    for name in ("model.pt", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "details.json").is_file() == details
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == method and config["data"] == "demo"
    assert config["head_classes"] == list(range(9))  # resolved: the 9 most frequent classes
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"before", "after"}
    start = json.loads((pretrained.parent / "metrics.json").read_text())["test"]
    assert metrics["before"]["per_class_recall"] == pytest.approx(start["per_class_recall"])

    # the model file is what finetune writes: registry spec and the same metadata
    _, meta = load_model(out / "model.pt", num_classes=10)
    assert set(meta) == FINETUNE_META and meta["command"] == "baseline"
    assert meta["classes"][0] == "T-shirt/top"
    # ... and `selmix evaluate` reads it back with the test metrics written above
    argv = ["evaluate", *DATA, "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path)]
    assert main(argv) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert again["per_class_recall"] == pytest.approx(metrics["after"]["per_class_recall"])
    if method in ("crt", "mislas_stage2"):
        history = json.loads((out / "details.json").read_text())["history"]
        assert [entry["epoch"] for entry in history] == [1]
    if method == "mislas_stage2":
        assert "label-aware smoothing 0.2 (head) to 0 (tail)" in printed
        assert config["smooth_head"] == 0.2 and config["smooth_tail"] == 0.0


def test_posthoc_tau_is_in_the_grid_and_gives_the_written_model(
    run: Callable[[str], tuple[Path, str, str]], pretrained: Path
) -> None:
    out, stdout, _ = run("posthoc_la")
    printed = re.search(r"tau = (\S+)", stdout)
    assert printed is not None

    details = json.loads((out / "details.json").read_text())
    assert details["taus"] == TAUS
    assert details["tau"] in TAUS
    assert float(printed.group(1)) == details["tau"]
    assert len(details["scores"]) == len(details["val_metrics"]) == len(TAUS)
    best = max(score["metric"] for score in details["scores"])  # g_mean: no constraint
    assert details["scores"][TAUS.index(details["tau"])]["metric"] == best
    assert details["val_metrics"][0]["g_mean"] == pytest.approx(details["scores"][0]["metric"])

    start, _ = load_model(pretrained)
    adjusted, _ = load_model(out / "model.pt")
    splits = load_data("demo", seed=0, **DATA_OPTIONS)
    log_prior = class_log_prior(splits.train, 10).float()
    shift = adjusted.head.bias.detach() - start.head.bias.detach()
    torch.testing.assert_close(shift, -details["tau"] * log_prior, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adjusted.head.weight, start.head.weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--method", "mixup"], "method"),
        (["--method", "start"], "method"),
        (["--set", "method=mixup"], "method"),
        ([], "--method"),
        # one line: no warning about the ignored --steps before the error
        (["--method", "posthoc_la", "--steps", "5", "--set", "taus=[1, -1]"], "taus"),
        (["--method", "posthoc_la", "--objective", "max_fun"], "max_fun"),
        (["--method", "crt", "--epochs", "0"], "epochs"),
        (["--method", "mislas_stage2", "--smooth-head", "1.0"], "smooth_head"),
        (["--method", "la_finetune", "--set", "frozen_backbone=maybe"], "frozen_backbone"),
    ],
)
def test_baseline_usage_errors_are_one_line_and_exit_2(
    extra: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # the checkpoint need not exist: every one of these fails before it is read
    argv = ["baseline", *DATA, "--checkpoint", str(tmp_path / "m.pt"), "--out",
            str(tmp_path / "o"), *extra]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "error" in lines[0] and expected in lines[0]
    assert not (tmp_path / "o").exists()


def test_baseline_help_lists_methods_objectives_and_defaults(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["baseline", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "{crt,la_finetune,mislas_stage2,posthoc_la}" in text
    assert "ignored" in text and "mean_recall_min_coverage" in text
    assert "training epochs of the head (crt and mislas_stage2) (default: 10)" in text
    assert "(mislas_stage2 only) (default: 0.3)" in text
    assert "taus = null" in text and "la_tau = 1.0" in text
