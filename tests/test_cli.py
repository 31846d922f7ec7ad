"""End-to-end tests of the ``selmix`` command on a tiny image folder made here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from selmix.cli import main, resolve_settings

SCALARS = (
    "mean_recall", "min_recall", "g_mean", "h_mean", "min_head_tail_recall", "min_coverage",
    "min_head_tail_coverage", "accuracy",
)  # fmt: skip
PER_CLASS = ("per_class_recall", "per_class_coverage")
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230))  # one colour per class
TRAIN_COUNTS = (30, 20, 14)  # long-tailed on purpose
TEST_PER_CLASS = 10
QUIET = ["--set", "progress=false"]


def _write_tree(root: Path, colours: tuple[tuple[int, int, int], ...]) -> Path:
    """root/{train,test}/<class>/*.png, 16x16 images of a class colour plus noise."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", TRAIN_COUNTS), ("test", (TEST_PER_CLASS,) * len(colours))):
        for label, (colour, count) in enumerate(zip(colours, counts, strict=False)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                noise = rng.normal(0, 40, size=(16, 16, 3))
                pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    return root


def _check_metrics(metrics: dict, num_classes: int = 3) -> None:
    assert set(metrics) == set(SCALARS) | set(PER_CLASS)
    for key in SCALARS:
        assert isinstance(metrics[key], float)
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in PER_CLASS:
        assert len(metrics[key]) == num_classes
        assert all(0.0 <= value <= 1.0 for value in metrics[key])


def _log_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("images"), COLOURS)


@pytest.fixture(scope="module")
def data_args(tree: Path) -> list[str]:
    return ["--data", f"imagefolder:{tree}", "--val-per-class", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, data_args: list[str]) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    argv = ["pretrain", *data_args, "--model", "small_cnn", "--out", str(out), "--epochs", "2",
            "--batch-size", "16", "--lr", "0.05", *QUIET]  # fmt: skip
    assert main(argv) == 0
    return out


# -- pretrain, finetune, evaluate ----------------------------------------------------------------
def test_pretrain_writes_model_metrics_and_resolved_config(pretrained: Path, tree: Path) -> None:
    assert (pretrained / "model.pt").is_file()
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert set(metrics) == {"test", "val"}
    _check_metrics(metrics["test"])
    _check_metrics(metrics["val"])
    config = yaml.safe_load((pretrained / "config.yaml").read_text())
    assert config["model"] == "small_cnn"
    assert config["epochs"] == 2
    assert config["batch_size"] == 16
    assert config["lr"] == 0.05
    assert config["loss"] == "ce"  # a default is resolved too
    assert config["data"] == f"imagefolder:{tree}"
    assert config["val_per_class"] == 4
    assert config["progress"] is False


def test_finetune_set_overrides_flag_and_reaches_the_run(
    pretrained: Path, data_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", *data_args, "--checkpoint", str(pretrained / "model.pt"),
            "--objective", "min_recall", "--out", str(out), "--steps", "20",
            "--batch-size", "16", "--feedback-every", "3", "--set", "steps=7", *QUIET]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "min recall" in printed

    for name in ("model.pt", "log.jsonl", "config.yaml", "metrics.json"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["steps"] == 7  # --set beats the explicit --steps 20
    assert config["feedback_every"] == 3
    assert config["objective"] == "min_recall"
    assert _log_steps(out / "log.jsonl") == [0, 3, 6, 7]

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {
        "before", "after", "best", "last", "select", "selected_step", "best_step", "last_step",
        "start_head", "stop_reason", "verdict",
    }  # fmt: skip
    # what the unset / auto hardware settings resolved to, and where the time went
    text = (out / "config.yaml").read_text()
    assert "# resolved on this machine: channels_last: " in text
    assert "# resolved on this machine: eval_batch_size: " in text
    timings = json.loads((out / "timings.json").read_text())
    assert timings["frozen"]["steps"] == 7 and timings["frozen"]["feedbacks"] == 4
    assert timings["hardware"]["precision"] == "fp32"
    _check_metrics(metrics["before"])
    _check_metrics(metrics["after"])
    assert metrics["select"] == "best" and metrics["last_step"] == 7
    assert metrics["best"] == metrics["after"]  # select=best returns the best step
    before = json.loads((pretrained / "metrics.json").read_text())["test"]
    assert metrics["before"]["mean_recall"] == pytest.approx(before["mean_recall"])


def test_config_file_reaches_the_run_below_explicit_flags(
    pretrained: Path, data_args: list[str], tmp_path: Path
) -> None:
    config_file = tmp_path / "settings.yaml"
    config_file.write_text(
        "steps: 9\npolicy: uniform\nlr_head: 1e-3\nfeedback_every: 2\n"
        "objective: g_mean\nbatch_size: 8\n"
    )
    out = tmp_path / "ft"
    argv = ["finetune", *data_args, "--checkpoint", str(pretrained / "model.pt"),
            "--out", str(out), "--config", str(config_file), "--steps", "4", *QUIET]  # fmt: skip
    assert main(argv) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["steps"] == 4  # the explicit flag beats --config
    assert config["policy"] == "uniform"
    assert config["lr_head"] == pytest.approx(1e-3)  # YAML's "1e-3" string read as a number
    assert config["objective"] == "g_mean"
    assert _log_steps(out / "log.jsonl") == [0, 2, 4]

    # a run's own config.yaml can be fed back in
    again = tmp_path / "again"
    argv = ["finetune", "--config", str(out / "config.yaml"), "--out", str(again)]
    assert main(argv) == 0
    assert yaml.safe_load((again / "config.yaml").read_text())["steps"] == 4


@pytest.mark.parametrize("head_classes", [[0], None])
def test_cli_and_api_resolve_the_same_head_tail_run(
    pretrained: Path, tree: Path, data_args: list[str], tmp_path: Path, head_classes: Any
) -> None:
    import torch

    from selmix.data import load_data
    from selmix.finetune import finetune
    from selmix.models.checkpoint import load_checkpoint, load_model

    settings = {"steps": 4, "feedback_every": 2, "batch_size": 8, "seed": 3}
    out = tmp_path / "cli"
    argv = ["finetune", *data_args, "--checkpoint", str(pretrained / "model.pt"),
            "--out", str(out), "--objective", "mean_recall_min_head_tail_coverage",
            "--set", "objective_params={alpha: 0.9}", "--frozen-backbone", "--select", "last",
            *QUIET]  # fmt: skip
    argv += [f"--set={key}={value}" for key, value in settings.items()]
    if head_classes is not None:
        argv += ["--set", f"head_classes={head_classes}"]
    assert main(argv) == 0
    cli_config = load_checkpoint(out / "finetune_state.pt")["config"]

    data = load_data(f"imagefolder:{tree}", val_per_class=4, seed=3)
    model, _ = load_model(pretrained / "model.pt")
    result = finetune(
        model, data.train, data.val, "mean_recall_min_head_tail_coverage", **settings,
        objective_params={"alpha": 0.9}, head_classes=head_classes, frozen_backbone=True,
        select="last", progress=False,
    )  # fmt: skip
    api_config = result.config.to_dict()
    for key in ("log_path", "checkpoint_path", "device"):
        cli_config.pop(key), api_config.pop(key)
    assert cli_config == api_config
    expected = [0] if head_classes is not None else [0, 1]  # inferred: the 2 largest classes
    assert api_config["head_classes"] == expected
    assert api_config["objective_params"]["head_classes"] == expected
    saved, _ = load_model(out / "model.pt")
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, saved.state_dict()[key]), key


def test_evaluate_prints_table_and_writes_test_metrics(
    pretrained: Path, data_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["evaluate", *data_args, "--checkpoint", str(pretrained / "model.pt"),
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean recall" in printed and "class_2" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"test"}
    _check_metrics(metrics["test"])
    expected = json.loads((pretrained / "metrics.json").read_text())["test"]
    assert metrics["test"]["per_class_recall"] == pytest.approx(expected["per_class_recall"])


# -- settings -------------------------------------------------------------------------------------
def test_precedence_defaults_config_flags_set(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("steps: 11\ngain_scale: 3\nlr_head: 0.01\n")
    base = ["finetune", "--data", "demo", "--checkpoint", "m.pt", "--out", "o"]
    settings = resolve_settings("finetune", base)
    assert settings["steps"] == 4000 and settings["policy"] == "selmix"
    settings = resolve_settings("finetune", [*base, "--config", str(config_file)])
    assert settings["steps"] == 11 and settings["gain_scale"] == 3.0
    settings = resolve_settings(
        "finetune", [*base, "--config", str(config_file), "--steps", "12", "--lr-head", "0.02"]
    )
    assert settings["steps"] == 12 and settings["lr_head"] == 0.02 and settings["gain_scale"] == 3
    settings = resolve_settings(
        "finetune",
        [*base, "--config", str(config_file), "--steps", "12", "--set", "steps=13",
         "--set", "objective_params={rate: 20}", "--frozen-backbone"],
    )  # fmt: skip
    assert settings["steps"] == 13
    assert settings["objective_params"] == {"rate": 20}
    assert settings["frozen_backbone"] is True


def test_finetune_settings_are_generated_from_the_config_fields() -> None:
    import dataclasses

    from selmix._config import settings_of
    from selmix.finetune import FinetuneConfig

    base = ["finetune", "--data", "demo", "--checkpoint", "m.pt", "--out", "o"]
    defaults = resolve_settings("finetune", base)
    for item in settings_of(FinetuneConfig):
        if not item.cli:
            assert item.key not in defaults
            continue
        assert defaults[item.key] == item.shown_default, item.name
        if item.flag and (item.type is bool or item.choices == ("auto", True, False)):
            flag = ["--no-" + item.key.replace("_", "-")] if item.default else []
            flag = flag or ["--" + item.key.replace("_", "-")]
        elif item.flag:
            others = [c for c in item.choices or () if c != item.shown_default]
            flag = ["--" + item.key.replace("_", "-"), str(others[0] if others else 7)]
        else:
            continue
        assert resolve_settings("finetune", [*base, *flag])[item.key] != item.shown_default
    # the resume check covers exactly the fields declared run-defining
    run = FinetuneConfig.run_fields()
    assert {"steps", "objective_params", "select", "patience"} <= set(run)
    assert not {"device", "eval_batch_size", "log_path", "progress"} & set(run)
    changed = dataclasses.replace(FinetuneConfig(), patience=3)
    with pytest.raises(ValueError, match="patience: None -> 3"):
        changed.check_resumable(FinetuneConfig().to_dict())


def test_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    for command in ("pretrain", "finetune", "baseline", "evaluate", "demo"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--config" in text and "--set" in text and "--seed" in text
        assert "(default:" in text
    assert main(["finetune", "--help"]) == 0
    text = capsys.readouterr().out
    assert "SGD steps, the head-first phase included (default: 4000)" in " ".join(text.split())
    assert "mean_recall_min_coverage" in text  # the objectives are listed


def test_python_dash_m_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "selmix", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in ("pretrain", "finetune", "baseline", "evaluate", "demo"):
        assert command in result.stdout


# -- errors: one line on stderr, exit status 2 ----------------------------------------------
@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small_cnn checkpoint for 5 classes (the tree has 3)."""
    from selmix.models import create_model
    from selmix.models.checkpoint import save_model

    path = tmp_path_factory.mktemp("other") / "five.pt"
    save_model(path, create_model("small_cnn", 5, in_channels=3), {})
    return path


def _error_cases(tree: Path, model: Path, other: Path, tmp: Path) -> dict[str, tuple]:
    data = ["--data", f"imagefolder:{tree}", "--val-per-class", "4", "--device", "cpu"]
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(model.read_bytes()[:5000])
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("steps: [1, 2\n")
    unknown_key = tmp / "unknown.yaml"
    unknown_key.write_text("stepz: 3\n")
    finetune = ["finetune", *data, "--checkpoint", str(model), "--out", str(tmp / "o")]
    return {
        "missing data folder": (
            ["evaluate", "--data", f"imagefolder:{tmp / 'nowhere'}", "--checkpoint", str(model)],
            "nowhere",
        ),
        "unknown data source": (["evaluate", "--data", "mnist:x", "--checkpoint", str(model)],
                                "mnist"),
        "unknown model": (
            ["pretrain", *data, "--model", "resnet9000", "--out", str(tmp / "o")], "resnet9000"
        ),
        "unknown objective": ([*finetune, "--objective", "max_fun"], "max_fun"),
        "unknown policy": ([*finetune, "--policy", "random"], "random"),
        "unknown policy via --set": ([*finetune, "--set", "policy=random"], "random"),
        "bad --set key": ([*finetune, "--set", "stepz=3"], "stepz"),
        "bad --set syntax": ([*finetune, "--set", "steps"], "KEY=VALUE"),
        "bad value type": ([*finetune, "--set", "steps=many"], "steps"),
        "unknown key in --config": ([*finetune, "--config", str(unknown_key)], "stepz"),
        "invalid YAML in --config": ([*finetune, "--config", str(bad_yaml)], "YAML"),
        "missing --config file": ([*finetune, "--config", str(tmp / "none.yaml")], "none.yaml"),
        "other class count": (
            ["finetune", *data, "--checkpoint", str(other), "--out", str(tmp / "o")],
            "5 classes",
        ),
        "corrupt checkpoint": (["evaluate", *data, "--checkpoint", str(corrupt)], "corrupt"),
        "truncated checkpoint": (["evaluate", *data, "--checkpoint", str(truncated)], "corrupt"),
        "missing checkpoint": (
            ["evaluate", *data, "--checkpoint", str(tmp / "missing.pt")], "missing.pt"
        ),
        "missing required option": (["finetune", *data, "--out", str(tmp / "o")], "--checkpoint"),
        "unknown flag": ([*finetune, "--stepz", "3"], "--stepz"),
    }  # fmt: skip


ERROR_CASES = [
    "missing data folder", "unknown data source", "unknown model", "unknown objective",
    "unknown policy", "unknown policy via --set", "bad --set key", "bad --set syntax",
    "bad value type", "unknown key in --config", "invalid YAML in --config",
    "missing --config file", "other class count", "corrupt checkpoint", "truncated checkpoint",
    "missing checkpoint",
    "missing required option", "unknown flag",
]  # fmt: skip


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_are_one_line_and_exit_2(
    case: str,
    tree: Path,
    pretrained: Path,
    other_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    argv, expected = _error_cases(tree, pretrained / "model.pt", other_model, tmp_path)[case]
    quiet = QUIET if argv[0] in ("pretrain", "finetune") else []
    assert main([*argv, *quiet]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "error" in lines[0] and expected in lines[0]
    assert "Traceback" not in captured.err


def test_bad_set_key_lists_valid_keys(
    tree: Path, pretrained: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["finetune", "--data", f"imagefolder:{tree}", "--checkpoint",
            str(pretrained / "model.pt"), "--out", "x", "--set", "lr=0.1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'lr'" in err and "lr_head" in err and "steps" in err


def test_finetune_under_torchrun_two_processes(
    pretrained: Path, data_args: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "selmix", "finetune", *data_args, "--checkpoint", str(pretrained / "model.pt"),
        "--objective", "min_recall", "--steps", "6", "--feedback-every", "3",
        "--batch-size", "8", "--out", str(out), "--set", "progress=false",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.count("done in") == 1  # rank 0 alone reports
    metrics = json.loads((out / "metrics.json").read_text())
    _check_metrics(metrics["before"])
    _check_metrics(metrics["after"])
    assert _log_steps(out / "log.jsonl") == [0, 3, 6]


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet10t"])
def test_pretrain_takes_the_model_names_finetune_takes(
    name: str, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip(name.split(":")[0])
    argv = ["pretrain", "--data", f"imagefolder:{tree}", "--val-per-class", "4", "--model",
            name, "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "16", *QUIET]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model.pt").is_file()


def test_pretrain_refuses_an_unknown_model_naming_every_kind(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["pretrain", "--data", f"imagefolder:{tree}", "--model", "resnet9000", "--out",
            str(tmp_path / "run"), *QUIET]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet9000" in err[0]
    assert "'timm:NAME'" in err[0] and "'torchvision:NAME'" in err[0]
    assert not (tmp_path / "run").exists()
