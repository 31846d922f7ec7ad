"""The parts of :mod:`selmix.finetune` alone, without a Trainer: the best step so far, the
loss monitor, the resume identity and the presets."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from selmix.core.selection import ObjectiveScore
from selmix.engine.config import PRESETS, FinetuneConfig
from selmix.finetune.best import _BestSoFar
from selmix.finetune.monitor import DIVERGENCE_FACTOR, _check_finite, _LossMonitor
from selmix.finetune.run_state import data_fingerprint


class _Labelled:
    def __init__(self, labels: list[int]) -> None:
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)


def _model(value: float) -> nn.Module:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


# -- the best step so far ------------------------------------------------------------------
def test_best_keeps_the_first_of_equal_scores_and_a_copy_of_its_weights():
    best = _BestSoFar()
    model = _model(1.0)
    assert best.offer(ObjectiveScore(0.5), 0, model)
    assert not best.offer(ObjectiveScore(0.5), 10, _model(2.0))  # a tie keeps the earlier
    with torch.no_grad():
        model.weight.fill_(9.0)  # the kept copy does not follow the model
    assert best.step == 0 and torch.equal(best.weights["weight"], torch.ones(2, 2))
    assert best.offer(ObjectiveScore(0.6), 20, _model(3.0))
    assert best.step == 20 and best.stale == 0
    assert torch.equal(best.weights["bias"], torch.full((2,), 3.0))


def test_best_is_exhausted_after_patience_steps_without_a_better_score():
    best = _BestSoFar()
    best.offer(ObjectiveScore(0.5), 0, _model(1.0))
    assert not best.exhausted(None) and not best.exhausted(2)
    best.offer(ObjectiveScore(0.4), 10, _model(1.0))
    assert not best.exhausted(2)
    best.offer(ObjectiveScore(0.5), 20, _model(1.0))
    assert best.exhausted(2) and not best.exhausted(3) and not best.exhausted(None)


def test_best_state_round_trips_with_a_constrained_score():
    best = _BestSoFar()
    best.offer(ObjectiveScore(0.3, coverage=0.05, target=0.095), 30, _model(1.5))
    best.offer(ObjectiveScore(0.1, coverage=0.01, target=0.095), 40, _model(0.0))
    restored = _BestSoFar()
    restored.load_state_dict(best.state_dict())
    assert (restored.step, restored.stale) == (30, 1)
    assert restored.score == ObjectiveScore(0.3, coverage=0.05, target=0.095)
    # the restored score still orders as the saved one: an infeasible better metric wins
    assert restored.offer(ObjectiveScore(0.4, coverage=0.05, target=0.095), 50, _model(1.0))


# -- the loss monitor --------------------------------------------------------------------------
def test_loss_monitor_means_between_feedback_steps():
    monitor = _LossMonitor(num_classes=10, is_main=True)
    assert monitor.take_mean() is None
    for loss in (2.0, 3.0, 4.0):
        monitor.add(loss)
    assert monitor.take_mean() == 3.0 and monitor.take_mean() is None
    monitor.add(1.0)
    assert monitor.start_loss == 2.0 and monitor.take_mean() == 1.0


def test_loss_monitor_warns_once_above_the_divergence_threshold():
    monitor = _LossMonitor(num_classes=10, is_main=True)
    monitor.add(0.1)  # a near-perfect start: the threshold is set by log K, not by 0.1
    threshold = DIVERGENCE_FACTOR * math.log(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.warn_if_diverging(threshold * 0.99, 10)
    with pytest.warns(RuntimeWarning, match="diverging"):
        monitor.warn_if_diverging(threshold * 1.01, 20)
    assert monitor.diverged_step == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.warn_if_diverging(threshold * 10, 30)  # once only
    assert monitor.diverged_step == 20


def test_loss_monitor_state_round_trips_and_reads_checkpoints_without_a_start_loss():
    monitor = _LossMonitor(num_classes=3, is_main=False)
    monitor.add(1.5)
    monitor.add(2.5)
    restored = _LossMonitor(num_classes=3, is_main=False)
    restored.load_state_dict(monitor.state_dict())
    assert restored.take_mean() == 2.0 and restored.start_loss == 1.5
    old = _LossMonitor(num_classes=3, is_main=False)
    old.load_state_dict({"loss": [3.0, 2]})  # written before the divergence warning
    assert old.start_loss is None and old.diverged_step is None and old.take_mean() == 1.5


def test_a_non_finite_loss_names_only_a_finite_checkpoint():
    _check_finite(1.0, 5, None)
    with pytest.raises(FloatingPointError, match=r"at step 5: lower `lr_head`") as plain:
        _check_finite(float("nan"), 5, None)
    assert "checkpoint" not in str(plain.value)
    with pytest.raises(FloatingPointError, match=r"'ck.pt' \(step 4\)"):
        _check_finite(float("inf"), 5, ("ck.pt", 4))


# -- resume identity and settings ---------------------------------------------------------------
def test_data_fingerprint_follows_label_order_not_just_counts():
    train, val = _Labelled([0, 1, 0, 1]), _Labelled([0, 1])
    same = data_fingerprint(_Labelled([0, 1, 0, 1]), _Labelled([0, 1]))
    assert data_fingerprint(train, val) == same
    swapped = data_fingerprint(_Labelled([1, 0, 0, 1]), val)
    assert swapped["train"][0] == 4 and swapped["train"] != same["train"]
    assert data_fingerprint(train, val, unlabelled=[0] * 7)["unlabelled"] == 7


def test_a_preset_fills_only_what_was_not_given():
    paper = FinetuneConfig.from_dict({"preset": "paper", "steps": 30})
    assert paper.steps == 30 and paper.gain_scale == PRESETS["paper"]["gain_scale"]
    assert FinetuneConfig.from_dict({"preset": "defaults"}) == FinetuneConfig()
