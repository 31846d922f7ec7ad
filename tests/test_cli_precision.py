"""CLI: the generated pre-training flags (precision, threads, channels-last), pretrain
--resume, and --device values."""

from __future__ import annotations

import sys

import pytest
import torch

from selmix.cli import main, resolve_settings
from selmix.models.checkpoint import load_model
from test_cli import COLOURS, QUIET, _write_tree


@pytest.fixture(scope="module")
def data_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tree = _write_tree(tmp_path_factory.mktemp("images"), COLOURS)
    return ["--data", f"imagefolder:{tree}", "--val-per-class", "4", "--device", "cpu"]


def test_pretrain_flags_are_generated_from_the_config():
    argv = ["pretrain", "--data", "demo", "--model", "small_cnn", "--out", "x", "--precision",
            "bf16", "--threads", "1", "--channels-last", "--mixup", "0.2"]  # fmt: skip
    settings = resolve_settings("pretrain", argv)
    assert settings["precision"] == "bf16" and settings["threads"] == 1
    assert settings["channels_last"] is True and settings["mixup"] == 0.2
    assert settings["device"] == "auto" and "checkpoint_path" not in settings


def test_pretrain_resume_with_other_settings_is_refused(data_args, tmp_path, capsys):
    common = ["--model", "small_cnn", "--epochs", "2", "--batch-size", "16", "--lr", "0.05",
              *QUIET]  # fmt: skip
    part = tmp_path / "part"
    assert main(["pretrain", *data_args, "--out", str(part), *common]) == 0
    assert (part / "pretrain_state.pt").is_file()
    capsys.readouterr()
    # --lr 0.1 is another run: refused in one line naming the setting
    code = main(["pretrain", *data_args, "--out", str(part), *common, "--lr", "0.1",
                 "--resume", str(part / "pretrain_state.pt")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "lr: 0.05 -> 0.1" in err and "\n" not in err


def test_pretrain_resume_of_a_missing_file_is_one_line(data_args, tmp_path, capsys):
    code = main(["pretrain", *data_args, "--out", str(tmp_path), "--model", "small_cnn",
                 "--resume", str(tmp_path / "nope.pt"), *QUIET])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "`resume` file" in err and "\n" not in err


def test_interrupted_pretraining_resumes_bit_identically(data_args, tmp_path, monkeypatch):
    pretrain_module = sys.modules["selmix.engine.pretrain"]  # (selmix.pretrain is the function)

    common = ["--model", "small_cnn", "--epochs", "3", "--batch-size", "16", "--lr", "0.05",
              "--precision", "bf16", *QUIET]  # fmt: skip
    whole = tmp_path / "whole"
    assert main(["pretrain", *data_args, "--out", str(whole), *common]) == 0
    cut = tmp_path / "cut"
    original = pretrain_module._save_training_checkpoint
    saves = {"n": 0}

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 2:  # after the checkpoint of epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "_save_training_checkpoint", save_then_die)
    assert main(["pretrain", *data_args, "--out", str(cut), *common]) != 0
    monkeypatch.setattr(pretrain_module, "_save_training_checkpoint", original)
    # an interrupted run's checkpoint stays in the staging folder beside --out
    assert main(["pretrain", *data_args, "--out", str(cut), *common, "--resume",
                 str(tmp_path / "cut.partial" / "pretrain_state.pt")]) == 0  # fmt: skip
    resumed, _ = load_model(cut / "model.pt")
    reference, _ = load_model(whole / "model.pt")
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("command", ["pretrain", "finetune", "baseline", "evaluate", "demo"])
def test_device_accepts_cuda_n_and_mps_on_the_command_line(command):
    required = {
        "pretrain": ["--data", "demo", "--model", "small_cnn", "--out", "x"],
        "finetune": ["--data", "demo", "--checkpoint", "m.pt", "--out", "x"],
        "baseline": ["--data", "demo", "--checkpoint", "m.pt", "--out", "x", "--method", "crt"],
        "evaluate": ["--data", "demo", "--checkpoint", "m.pt"],
        "demo": [],
    }[command]
    for device in ("cuda:1", "mps"):
        settings = resolve_settings(command, [command, *required, "--device", device])
        assert settings["device"] == device
