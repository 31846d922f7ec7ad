"""Issue 13: the robust defaults, the presets and the selection rule under a coverage target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from selmix.cli import UsageError, resolve_settings
from selmix.core.objectives import get_objective
from selmix.core.selection import best_index, objective_score
from selmix.finetune import PRESETS, FinetuneConfig

BASE = ["finetune", "--data", "demo", "--checkpoint", "m.pt", "--out", "o"]


def test_defaults_are_the_robust_ones():
    config = FinetuneConfig()
    assert config.frozen_backbone is True and config.steps == 4000
    assert config.feedback_every == 10 and config.normalize_gain is True
    assert config.gain_scale == 3.0 and config.confusion_smoothing == 1.0
    assert config.select == "best"
    assert (config.soft_confusion, config.multiplier_step) == (False, 1.0)
    # issue 38: unset uniform_mix is 0.5 for min recall (0 for the others, resolve_objective),
    # the start head chosen among those tied within one standard error, w = 50
    assert config.uniform_mix is None and config.head_init_tolerance == 1.0
    assert (config.multiplier_rate, config.select_tolerance) == ("objective", 0.0)


def test_paper_preset_fills_what_the_user_did_not_give():
    config = FinetuneConfig.resolve(None, {"preset": "paper", "gain_scale": 5.0})
    assert config.gain_scale == 5.0  # the user's value wins
    for name, value in PRESETS["paper"].items():
        if name != "gain_scale":
            assert getattr(config, name) == value, name
    assert config.frozen_backbone is False and config.head_first == 0
    # the recorded config holds the final values, and replaying it changes nothing
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    assert config.replace(steps=7).gain_scale == 5.0
    # a dict config and keyword overrides combine the same way
    from_dict = FinetuneConfig.resolve({"preset": "paper"}, {"select": "best"})
    assert from_dict.select == "best" and from_dict.feedback_every == 50
    # a preset override on an instance applies the preset, then the other overrides
    instance = FinetuneConfig.resolve(FinetuneConfig(), {"preset": "paper", "steps": 9})
    assert instance.normalize_gain is False and instance.steps == 9


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^`preset` must be one of 'defaults', 'paper', got 'x'$"):
        FinetuneConfig.resolve(None, {"preset": "x"})
    with pytest.raises(UsageError, match="unknown `preset` 'x'"):
        resolve_settings("finetune", [*BASE, "--set", "preset=x"])
    with pytest.raises(SystemExit):  # argparse's choices
        resolve_settings("finetune", [*BASE, "--preset", "x"])


def test_cli_preset_sits_under_config_flags_and_set(tmp_path: Path):
    settings = resolve_settings("finetune", [*BASE, "--preset", "paper"])
    assert settings["feedback_every"] == 50 and settings["gain_scale"] == 10.0
    assert settings["frozen_backbone"] is False and settings["select"] == "last"
    settings = resolve_settings(
        "finetune", [*BASE, "--preset", "paper", "--gain-scale", "4", "--set", "select=best"]
    )
    assert settings["gain_scale"] == 4.0 and settings["select"] == "best"
    assert settings["normalize_gain"] is False
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({"preset": "paper", "steps": 11}))
    settings = resolve_settings("finetune", [*BASE, "--config", str(config_file)])
    assert settings["steps"] == 11 and settings["feedback_every"] == 50
    # without a preset, the defaults
    assert resolve_settings("finetune", BASE)["feedback_every"] == 10


def test_help_lists_the_presets(capsys):
    from selmix.cli import main

    try:
        main(["finetune", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {defaults,paper}" in text
    assert "preset paper: frozen_backbone=false" in text
    assert "defaults < preset < --config" in text


# -- selection under a coverage target -------------------------------------------------------
def test_a_class_at_zero_coverage_never_beats_a_feasible_model():
    objective = get_objective("mean_recall_min_coverage")  # alpha 0.95, K = 3: target .3167
    # mean recall 0.667, but class 2 is never predicted: its coverage is 0
    zero_coverage = torch.tensor([[10, 0, 0], [0, 10, 0], [5, 5, 0]])
    feasible_poor = torch.tensor([[4, 3, 3], [3, 4, 3], [3, 3, 4]])  # MR 0.4, cov 1/3
    scores = [objective_score(objective, c) for c in (zero_coverage, feasible_poor)]
    assert scores[0].coverage == 0.0 and not scores[0].feasible and scores[1].feasible
    assert scores[1] > scores[0] and best_index(scores) == 1


def test_infeasible_steps_order_by_metric_minus_coverage_shortfall():
    objective = get_objective("mean_recall_min_coverage")
    target = 0.95 / 3
    # both infeasible: a little more coverage must not buy a collapse of the metric
    good_recall = torch.tensor([[10, 0, 0], [0, 10, 0], [0, 3, 7]])  # MR .9, cov 7/30
    more_coverage = torch.tensor([[2, 4, 4], [4, 2, 4], [3, 4, 3]])  # MR .233, cov .3
    scores = [objective_score(objective, c) for c in (good_recall, more_coverage)]
    assert not any(s.feasible for s in scores)
    assert scores[1].coverage > scores[0].coverage
    assert scores[0].penalized == pytest.approx(0.9 - (1 - (7 / 30) / target))
    assert scores[1].coverage == pytest.approx(0.3)
    assert scores[1].penalized == pytest.approx(7 / 30 - (1 - 0.3 / target))
    assert best_index(scores) == 0
    # but a model at zero coverage pays the whole shortfall (1): it loses to one that is
    # close to the target even with a lower mean recall
    zero = torch.tensor([[10, 0, 0], [0, 10, 0], [5, 5, 0]])  # MR .667, cov 0
    near = torch.tensor([[8, 0, 2], [0, 8, 2], [1, 3, 6]])  # MR .733, cov .3
    assert objective_score(objective, zero).penalized == pytest.approx(2 / 3 - 1)
    assert objective_score(objective, near) > objective_score(objective, zero)
