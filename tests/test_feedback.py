"""Tests of selmix.engine.feedback.SelMixFeedback, the feedback step for a loop the user owns."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from selmix import evaluate, finetune, get_objective
from selmix.core import gain_matrix, mixup_distribution
from selmix.data.formats import FeatureTensorDataset
from selmix.engine.feedback import SelMixFeedback, smoothed_confusion
from selmix.engine.optim import split_sgd_cosine as sgd_cosine
from selmix.models import create_model, split_model

torch.set_num_threads(1)


def tiny_data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 40 + [1] * 12 + [2] * 5)
    centres = torch.randn(3, 6, generator=generator) * 2
    features = centres[labels] + torch.randn(labels.numel(), 6, generator=generator)
    return FeatureTensorDataset(features, labels, 3)


def tiny_model():
    torch.manual_seed(0)
    return create_model("linear", 3, in_channels=6)


def test_update_computes_the_gain_and_policy_of_the_validation_confusion():
    data, model = tiny_data(), tiny_model()
    # uniform_mix=0: the policy alone (min recall mixes in half uniform pairs by default)
    feedback = SelMixFeedback("min_recall", data.labels, objective_params={"rate": 20.0},
                              gain_scale=5.0, confusion_smoothing=1.0, lam_min=0.5,
                              uniform_mix=0.0)  # fmt: skip
    record = feedback.update(model, data, step=7)

    evaluation = evaluate(model, data)
    objective = get_objective("min_recall", rate=20.0)
    estimate = smoothed_confusion(evaluation.counts, 1.0, pool=True)  # shrinkage="auto"
    objective.update(estimate)
    expected_gain = gain_matrix(objective, estimate, evaluation.prototypes, model.head, 0.75)
    torch.testing.assert_close(record["gain"], expected_gain)
    # the default policy is the scale-free one (normalize_gain=True)
    expected = mixup_distribution(expected_gain, 5.0, "selmix", True)
    torch.testing.assert_close(feedback.distribution, expected)
    assert record["step"] == 7
    assert record["multipliers"] == pytest.approx(objective.multipliers.tolist())
    assert record["objective"] == pytest.approx(float(objective(estimate)))
    assert record["metrics"]["min_recall"] == pytest.approx(evaluation.metrics()["min_recall"])
    assert feedback.history == [record]


def test_sample_pairs_follows_the_policy_and_the_seed():
    data, model = tiny_data(), tiny_model()
    feedback = SelMixFeedback("mean_recall", data.labels, seed=3, policy="greedy")
    feedback.update(model, data)
    i, j = divmod(int(feedback.distribution.argmax()), 3)
    pairs = feedback.sample_pairs(32)
    assert (data.labels[pairs.first] == i).all() and (pairs.labels == i).all()
    assert (data.labels[pairs.second] == j).all()
    assert ((pairs.lam >= 0.6) & (pairs.lam <= 1)).all()
    again = SelMixFeedback("mean_recall", data.labels, seed=3, policy="greedy")
    again.update(model, data)
    assert all(torch.equal(a, b) for a, b in zip(pairs, again.sample_pairs(32), strict=True))
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        feedback.sample_pairs(0)


def test_a_plain_loop_with_selmix_feedback_reproduces_the_trainer_exactly():
    """The Trainer's frozen-backbone run is this loop: it could be built on SelMixFeedback."""
    data = tiny_data()
    settings = {"steps": 20, "feedback_every": 5, "batch_size": 16, "lr_head": 0.05,
                "gain_scale": 10.0, "confusion_smoothing": 1.0, "seed": 4,
                "head_init": "none"}  # fmt: skip
    # select="last": the loop below returns its last weights, not the best step's
    trained = finetune(tiny_model(), data, data, "min_recall", frozen_backbone=True,
                       progress=False, select="last", **settings).model  # fmt: skip

    model = tiny_model()
    split = split_model(model)
    optimizer, scheduler = sgd_cosine(
        split, settings["steps"], settings["lr_head"], None, 0.9, 5e-4
    )
    feedback = SelMixFeedback("min_recall", data.labels, gain_scale=settings["gain_scale"],
                              confusion_smoothing=1.0, seed=settings["seed"])  # fmt: skip
    for step in range(settings["steps"]):
        if step % settings["feedback_every"] == 0:
            feedback.update(model, data, step=step)
        pairs = feedback.sample_pairs(settings["batch_size"])
        lam = pairs.lam[:, None]
        mixed = lam * data.features[pairs.first] + (1 - lam) * data.features[pairs.second]
        loss = F.cross_entropy(split.head(mixed), pairs.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(model.head.weight, trained.head.weight)
    torch.testing.assert_close(model.head.bias, trained.head.bias)


def test_state_dict_round_trip_continues_the_same_pairs():
    data, model = tiny_data(), tiny_model()
    feedback = SelMixFeedback("h_mean", data.labels, seed=1)
    feedback.update(model, data)
    state = copy.deepcopy(feedback.state_dict())
    expected = feedback.sample_pairs(8)
    restored = SelMixFeedback("h_mean", data.labels, seed=99)
    restored.load_state_dict(state)
    got = restored.sample_pairs(8)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_feedback_validates_its_inputs():
    with pytest.raises(ValueError, match="`policy`"):
        SelMixFeedback("min_recall", [0, 1], policy="best")
    with pytest.raises(ValueError, match="`objective_params` must be empty"):
        SelMixFeedback(get_objective("min_recall"), [0, 1], objective_params={"rate": 2})
    with pytest.raises(ValueError, match="no samples of class"):
        SelMixFeedback("min_recall", [0, 2])
    feedback = SelMixFeedback("min_recall", [0, 1, 2])
    two_classes = evaluate(create_model("linear", 2, in_channels=6), tiny_data().subset(range(45)))
    with pytest.raises(ValueError, match="`evaluation` must be for 3 classes"):
        feedback.update_from_evaluation(two_classes, torch.nn.Linear(6, 2))


def test_selmix_feedback_has_the_fine_tuning_defaults():
    """A loop of one's own gets the same robust defaults as selmix.finetune."""
    import inspect

    from selmix import FinetuneConfig

    defaults = FinetuneConfig()
    parameters = inspect.signature(SelMixFeedback).parameters
    shared = ["policy", "gain_scale", "normalize_gain", "lam_min", "confusion_smoothing",
              "soft_confusion", "uniform_mix", "multiplier_step"]  # fmt: skip
    for name in shared:
        assert parameters[name].default == getattr(defaults, name), name


def test_the_stabilisers_reach_selmix_feedback():
    data, model = tiny_data(), tiny_model()
    plain = SelMixFeedback("min_recall", data.labels, seed=0, uniform_mix=0.0)
    mixed = SelMixFeedback("min_recall", data.labels, seed=0, uniform_mix=0.5)
    # unset: 0.5 for min recall, 0 for the others (as selmix.finetune)
    assert SelMixFeedback("min_recall", data.labels).uniform_mix == 0.5
    assert SelMixFeedback("h_mean", data.labels).uniform_mix == 0.0
    plain.update(model, data)
    mixed.update(model, data)
    K = plain.num_classes
    torch.testing.assert_close(mixed.distribution, 0.5 * plain.distribution + 0.5 / K**2)
    with pytest.raises(ValueError, match="`multiplier_step`"):
        SelMixFeedback("min_recall", data.labels, multiplier_step=0)
