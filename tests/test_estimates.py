"""The empirical-Bayes estimate of C (selmix.core.estimates) against simulated recalls."""

from __future__ import annotations

import pytest
import torch

from selmix.core import objectives
from selmix.core.estimates import (
    SmallValidationWarning,
    empirical_bayes_strength,
    per_class_objective,
    pools_classes,
    shrinkage_prior,
    shrunk_confusion,
    warn_if_small_validation,
)
from selmix.core.objectives import (
    Objective,
    as_objective,
    get_objective,
    list_objectives,
    register_objective,
)
from selmix.core.policy import MIN_RECALL_UNIFORM_MIX
from selmix.engine.feedback import SelMixFeedback, smoothed_confusion


def _binomial_counts(recalls: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Confusion counts with the given true recalls; errors spread uniformly."""
    generator = torch.Generator().manual_seed(seed)
    k = recalls.numel()
    hits = torch.binomial(torch.full((k,), float(per_class)), recalls.float(), generator=generator)
    counts = torch.zeros(k, k, dtype=torch.float64)
    for row in range(k):
        misses = per_class - int(hits[row])
        wrong = torch.randint(0, k - 1, (misses,), generator=generator)
        wrong = wrong + (wrong >= row).long()  # any class but the true one
        counts[row] += torch.bincount(wrong, minlength=k).double()
        counts[row, row] = hits[row]
    return counts


def test_zero_strength_is_the_plain_estimate():
    counts = torch.tensor([[8.0, 2, 0], [1, 5, 4], [0, 3, 7]])
    assert torch.allclose(shrunk_confusion(counts, 0.0), counts.double() / counts.sum())


def test_prior_rows_hold_the_mean_recall_and_sum_to_one():
    counts = torch.tensor([[8.0, 2, 0, 0], [1, 5, 4, 0], [0, 3, 7, 0], [5, 0, 0, 5]])
    prior = shrinkage_prior(counts)
    recalls = counts.diagonal() / counts.sum(1)
    assert torch.allclose(prior.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(prior.diagonal(), recalls.double().mean().expand(4))
    # no zero pair: class 3 absorbs no error, and still gets the uniform half of the mass
    assert bool((prior > 0).all())
    # the class that absorbs the most errors (class 0 and 2 tie at 6 / 10 ... class 1 at
    # 0.5) gets more of row 3's error mass than the class that absorbs none
    assert prior[0, 1] > prior[0, 3]


@pytest.mark.parametrize("strength", [5.0, 40.0])
def test_strength_recovers_a_beta_prior(strength):
    """True recalls ~ Beta with a + b = strength: the method of moments finds it."""
    generator = torch.Generator().manual_seed(0)
    mean = 0.6
    beta = torch.distributions.Beta(mean * strength, (1 - mean) * strength)
    torch.manual_seed(1)
    recalls = beta.sample((3000,))
    counts = _binomial_counts(recalls, per_class=30, seed=2)
    estimated = empirical_bayes_strength(counts)
    assert abs(estimated - strength) / strength < 0.25, (estimated, generator)


def test_equal_recalls_give_a_large_strength_and_a_flat_estimate():
    counts = _binomial_counts(torch.full((50,), 0.5), per_class=20, seed=3)
    assert empirical_bayes_strength(counts) > 100
    recalls = shrunk_confusion(counts)
    recalls = recalls.diagonal() / recalls.sum(1)
    raw = counts.diagonal() / counts.sum(1)
    assert float(recalls.std()) < 0.5 * float(raw.std())


def test_shrinkage_is_closer_to_the_true_recalls_on_small_validation_sets():
    generator = torch.Generator().manual_seed(4)
    recalls = 0.3 + 0.4 * torch.rand(20, generator=generator, dtype=torch.float64)
    errors_raw, errors_shrunk = [], []
    for seed in range(40):
        counts = _binomial_counts(recalls, per_class=20, seed=100 + seed)
        raw = counts.diagonal() / counts.sum(1)
        estimate = shrunk_confusion(counts)
        shrunk = estimate.diagonal() / estimate.sum(1)
        errors_raw.append(float(((raw - recalls) ** 2).mean()))
        errors_shrunk.append(float(((shrunk - recalls) ** 2).mean()))
    assert sum(errors_shrunk) < 0.8 * sum(errors_raw)


def test_far_apart_recalls_are_left_almost_alone():
    recalls = torch.tensor([0.05, 0.95] * 10, dtype=torch.float64)
    counts = _binomial_counts(recalls, per_class=200, seed=5)
    estimate = shrunk_confusion(counts)
    shrunk = estimate.diagonal() / estimate.sum(1)
    raw = counts.diagonal() / counts.sum(1)
    assert float((shrunk - raw).abs().max()) < 0.01


def test_smoothed_confusion_applies_shrinkage_after_the_pseudo_count():
    counts = torch.tensor([[8.0, 2, 0], [1, 5, 4], [0, 3, 7]])
    expected = shrunk_confusion(counts + 1.0)
    assert torch.allclose(smoothed_confusion(counts, 1.0, pool=True), expected)
    plain = (counts.double() + 1) / (counts.double() + 1).sum()
    assert torch.allclose(smoothed_confusion(counts, 1.0), plain)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`strength` must be >= 0, got -1"):
        shrunk_confusion(torch.eye(3), -1.0)
    with pytest.raises(ValueError, match="class\\(es\\) \\[1\\] have none"):
        shrunk_confusion(torch.tensor([[1.0, 0], [0, 0]]))
    with pytest.raises(ValueError, match="shrinkage"):
        SelMixFeedback("min_recall", torch.arange(4) % 2, shrinkage="always")


# What each built-in declares: (per_class, worst_case), the behaviour before the
# attributes existed (pooled with shrinkage="auto"; uniform mix by default).
BUILT_IN_KINDS = {
    "mean_recall": (False, False),
    "g_mean": (True, False),
    "h_mean": (True, False),
    "min_recall": (True, True),
    "min_head_tail_recall": (False, True),
    "mean_recall_min_coverage": (False, False),
    "mean_recall_min_head_tail_coverage": (False, False),
    "h_mean_min_coverage": (True, False),
    "h_mean_min_head_tail_coverage": (False, False),
}


def test_every_registered_objective_has_a_declared_kind():
    assert sorted(BUILT_IN_KINDS) == list_objectives()


@pytest.mark.parametrize("name", sorted(BUILT_IN_KINDS))
def test_built_in_objectives_declare_their_kind(name):
    per_class, worst_case = BUILT_IN_KINDS[name]
    objective = get_objective(name)
    assert (objective.per_class, objective.worst_case) == (per_class, worst_case)
    assert per_class_objective(objective) is per_class
    assert pools_classes("auto", objective) is per_class
    assert pools_classes("on", objective) and not pools_classes("none", objective)
    mix = SelMixFeedback(name, torch.arange(4) % 2).uniform_mix
    assert mix == (MIN_RECALL_UNIFORM_MIX if worst_case else 0.0)


class _WorstRecall(Objective):
    """A user's own worst-class objective: a soft minimum of the recalls."""

    name = "soft_worst_recall"
    per_class = True
    worst_case = True

    def value(self, prepared: torch.Tensor) -> torch.Tensor:
        recall = prepared.diagonal() / prepared.sum(dim=1)
        return -torch.logsumexp(-20 * recall, dim=0) / 20


def test_a_registered_user_objective_is_pooled_as_it_declares(monkeypatch):
    monkeypatch.setattr(objectives, "_REGISTRY", dict(objectives._REGISTRY))
    register_objective("soft_worst_recall")(_WorstRecall)
    declared = get_objective("soft_worst_recall")
    built_in = get_objective("min_recall")
    assert pools_classes("auto", declared) and pools_classes("auto", built_in)
    with pytest.warns(SmallValidationWarning, match="soft_worst_recall"):
        assert warn_if_small_validation(torch.full((3,), 10), declared, "auto")
    assert SelMixFeedback(declared, torch.arange(4) % 2).uniform_mix == MIN_RECALL_UNIFORM_MIX
    # a plain function of C declares nothing: neither pooled nor mixed
    function = as_objective(lambda c: c.diagonal().sum())
    assert not function.per_class and not pools_classes("auto", function)
    assert SelMixFeedback(function, torch.arange(4) % 2).uniform_mix == 0.0
