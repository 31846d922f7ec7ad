"""`max_time` (a wall-clock budget, #37) returns the best model so far and says so; every
setting has help on the command line, the keys of `objective_params` are listed, and
`--export`'s metavar shows that it takes a list."""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path

import pytest
import torch

from selmix._config import settings_of
from selmix.cli import main
from selmix.core.objectives import get_objective, list_objectives
from selmix.data import load_data
from selmix.engine.timing import parse_duration
from selmix.finetune import FinetuneConfig, finetune
from selmix.models import create_model

torch.set_num_threads(1)
# the module, not the function `selmix.finetune` that shadows the package's name
trainer_module = importlib.import_module("selmix.finetune.trainer")


@pytest.fixture(scope="module")
def demo():
    return load_data("demo", max_per_class=60, val_per_class=10)


class FakeClock:
    """time.monotonic that advances one second per call (the trainer's only clock read
    for max_time), so a budget of n seconds allows n steps whatever the machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


def run(demo, monkeypatch, **settings):
    import time

    clock = FakeClock()
    fake = types.SimpleNamespace(monotonic=clock.monotonic, perf_counter=time.perf_counter)
    monkeypatch.setattr(trainer_module, "time", fake)
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, in_channels=1)
    return finetune(
        model, demo.train, demo.val, "mean_recall", steps=40, feedback_every=2,
        batch_size=16, head_init="none", progress=False, **settings,
    )  # fmt: skip


def test_max_time_stops_early_with_the_best_step_so_far(demo, monkeypatch) -> None:
    # the deadline is read once (t = 1); each step's check advances the clock: steps at
    # t = 2 ... 7 run, the check at t = 8 >= 1 + 7 stops the run after 6 steps
    result = run(demo, monkeypatch, max_time=7)
    assert result.stop_reason == "max_time"
    assert result.last_step == 6
    assert result.history[-1]["step"] == 6  # the last step is evaluated before selecting
    steps = [record["step"] for record in result.history]
    assert result.best_step in steps and result.selected_step == result.best_step
    state = result.model.state_dict()
    assert all(torch.equal(state[key].cpu(), value) for key, value in result.best_state.items())
    full = run(demo, monkeypatch, max_time=None)
    assert full.stop_reason is None and full.last_step == 40


def test_max_time_with_select_last_returns_the_last_step(demo, monkeypatch) -> None:
    result = run(demo, monkeypatch, max_time="00:00:00:05", select="last")
    assert result.stop_reason == "max_time" and result.selected_step == result.last_step == 4


def test_durations_are_seconds_or_lightning_strings() -> None:
    assert parse_duration("max_time", 90) == 90.0
    assert parse_duration("max_time", "2.5") == 2.5
    assert parse_duration("max_time", "01:02:03") == 3723.0
    assert parse_duration("max_time", "1:00:00:01") == 86401.0
    for bad in (0, -1, "abc", "1:2", True, float("inf"), "00:-1:00"):
        with pytest.raises(ValueError, match=r"`max_time` must be seconds > 0 or 'DD:HH:MM:SS'"):
            parse_duration("max_time", bad)
    with pytest.raises(ValueError, match="`max_time`"):
        FinetuneConfig(max_time="soon")


def test_cli_max_time_says_it_stopped(tmp_path: Path, capsys) -> None:
    from selmix.models.checkpoint import save_model

    torch.manual_seed(0)
    save_model(tmp_path / "start.pt", create_model("small_cnn", 10, in_channels=1), {})
    out = tmp_path / "run"
    argv = ["finetune", "--data", "demo", "--max-per-class", "60", "--val-per-class", "10",
            "--device", "cpu", "--checkpoint", str(tmp_path / "start.pt"), "--out", str(out),
            "--steps", "50", "--batch-size", "8", "--head-init", "none",
            "--max-time", "0.000001", "--set", "progress=false"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    # a microsecond runs out before the first few of 50 steps, whatever the machine
    assert saved["stop_reason"] == "max_time" and saved["last_step"] < 50
    line = (
        f"stopped at step {saved['last_step']} of 50: max_time (1e-06 s) ran out; returned "
        f"step {saved['selected_step']} (best so far)"
    )
    assert line in printed.splitlines()
    assert main([*argv[:-4], "--max-time", "soon", "--set", "progress=false"]) == 2
    assert "`max_time` must be seconds > 0 or 'DD:HH:MM:SS', got 'soon'" in capsys.readouterr().err


def help_text(capsys, command: str) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def squeezed(text: str) -> str:
    """Text without whitespace: argparse re-wraps the help."""
    return "".join(text.split())


@pytest.mark.parametrize("command", ["finetune", "baseline"])
def test_every_setting_has_help_on_the_command_line(capsys, command: str) -> None:
    shown = squeezed(help_text(capsys, command))
    for item in settings_of(FinetuneConfig):
        assert item.help.strip(), f"{item.name} has no help"
        if not item.cli or command == "baseline":
            continue
        assert squeezed(item.help.replace("%%", "%")) in shown, f"{item.key}'s help is not shown"
    if command == "finetune":
        for name in ("lam_min", "soft_confusion", "uniform_mix", "multiplier_step"):
            assert f"{name}=" in shown  # listed with its default, its help beside it (above)


def test_objective_params_keys_are_listed(capsys) -> None:
    text = help_text(capsys, "finetune")
    section = text[text.index("objective_params keys") :]
    for name in list_objectives():
        for key in get_objective(name).hyperparameters():
            assert f"\n  {key}: " in section, key
    assert "min_recall: rate" in squeezed(section).replace(":rate", ": rate")


def test_export_metavar_shows_a_list(capsys) -> None:
    assert "--export {safetensors,state_dict,hf}[,...]" in help_text(capsys, "finetune")
