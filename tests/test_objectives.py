"""Objectives psi(C) and their multiplier updates (MATH.md section 2), checked by hand in numpy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import selmix
from selmix.core import metrics
from selmix.core.objectives import get_objective, list_objectives

MULTIPLIER_OBJECTIVES = [
    "min_recall",
    "min_head_tail_recall",
    "mean_recall_min_coverage",
    "mean_recall_min_head_tail_coverage",
    "h_mean_min_coverage",
    "h_mean_min_head_tail_coverage",
]

# hand-made matrices (counts; rows = labels, columns = predictions), all entries positive
COUNTS3 = np.array([[50.0, 6.0, 4.0], [10.0, 30.0, 10.0], [9.0, 12.0, 19.0]])
COUNTS4 = np.array(
    [[30.0, 5.0, 3.0, 2.0], [4.0, 25.0, 6.0, 5.0], [3.0, 7.0, 20.0, 10.0], [6.0, 4.0, 9.0, 11.0]]
)


def tensor(counts: np.ndarray) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.float64)


def np_recall(counts: np.ndarray) -> np.ndarray:
    return np.diag(counts) / counts.sum(axis=1)


def np_coverage(counts: np.ndarray) -> np.ndarray:
    return counts.sum(axis=0) / counts.sum()


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def np_h_mean(recall: np.ndarray) -> float:
    return recall.size / np.sum(1.0 / recall)


def np_coverage_rule(values, num_classes, alpha=0.95, scale=100.0, tau=0.01):
    return np.maximum(0.0, scale * (1.0 - np.exp((values - alpha / num_classes) / tau)))


def np_spread(head_value, tail_value, head: list[int], num_classes: int) -> np.ndarray:
    is_head = np.zeros(num_classes, dtype=bool)
    is_head[head] = True
    return np.where(is_head, head_value / is_head.sum(), tail_value / (~is_head).sum())


def np_group_means(values: np.ndarray, head: list[int]) -> tuple[float, float]:
    is_head = np.zeros(values.size, dtype=bool)
    is_head[head] = True
    return values[is_head].mean(), values[~is_head].mean()


# -- construction, K, differentiability ---------------------------------------------------------
def test_list_objectives_holds_the_math_md_table():
    assert set(list_objectives()) == {
        "mean_recall",
        "min_recall",
        "min_head_tail_recall",
        "g_mean",
        "h_mean",
        "mean_recall_min_coverage",
        "mean_recall_min_head_tail_coverage",
        "h_mean_min_coverage",
        "h_mean_min_head_tail_coverage",
    }


@pytest.mark.parametrize("name", list_objectives())
def test_every_objective_builds_learns_k_and_is_differentiable(name):
    objective = get_objective(name)
    assert isinstance(objective, selmix.Objective)
    assert objective.num_classes is None
    confusion = tensor(COUNTS4 / COUNTS4.sum()).requires_grad_(True)
    objective.update(confusion.detach())
    assert objective.num_classes == 4
    value = objective(confusion)
    assert value.dim() == 0 and value.dtype == torch.float64
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, confusion)
    assert grad.shape == (4, 4)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    # the gradient is the derivative: compare one directional derivative with a difference
    direction = torch.rand(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps = 1e-6
    with torch.no_grad():
        plus = objective(confusion + eps * direction)
        minus = objective(confusion - eps * direction)
    numeric = float((plus - minus) / (2 * eps))
    assert numeric == pytest.approx(float((grad * direction).sum()), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match=r"K = 3 classes .* K = 4"):
        objective(tensor(COUNTS3))


@pytest.mark.parametrize(
    ("name", "metric"),
    [("mean_recall", metrics.mean_recall), ("g_mean", metrics.g_mean), ("h_mean", metrics.h_mean)],
)
@pytest.mark.parametrize("counts", [COUNTS3, COUNTS4])
def test_plain_objectives_equal_the_metrics(name, metric, counts):
    objective = get_objective(name)
    as_counts = objective(tensor(counts))
    fresh = get_objective(name)
    as_fractions = fresh(tensor(counts / counts.sum()))
    expected = float(metric(tensor(counts)))
    recall = np_recall(counts)
    by_hand = {
        "mean_recall": recall.mean(),
        "g_mean": np.exp(np.mean(np.log(recall))),
        "h_mean": np_h_mean(recall),
    }[name]
    assert float(as_counts) == pytest.approx(expected, rel=1e-12)
    assert float(as_fractions) == pytest.approx(by_hand, rel=1e-12)
    assert objective.multipliers is None


def test_mean_recall_gradient_matches_the_analytic_derivative():
    counts = COUNTS4 / COUNTS4.sum()
    confusion = tensor(counts).requires_grad_(True)
    (grad,) = torch.autograd.grad(get_objective("mean_recall")(confusion), confusion)
    prior = counts.sum(axis=1)
    # d/dC[y, p] of (1/K) sum_y C[y, y] / pi_y (the normalisation adds nothing: recall is
    # invariant to the total and the matrix already sums to 1)
    expected = -(np.diag(counts) / prior**2)[:, None] * np.ones((1, 4)) / 4
    expected[np.diag_indices(4)] += 1 / (4 * prior)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12)


def test_entries_are_clipped_at_1e_7():
    counts = np.array([[0.5, 0.0], [0.1, 0.4]])
    value = get_objective("mean_recall")(tensor(counts))
    clipped = np.maximum(counts, 1e-7)
    assert float(value) == pytest.approx(np_recall(clipped).mean(), rel=1e-14)
    assert float(value) != pytest.approx(np_recall(counts).mean(), rel=1e-9)


# -- multiplier updates ------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [COUNTS3, COUNTS4])
@pytest.mark.parametrize("rate", [None, 7.0])
def test_min_recall_multipliers_and_value(counts, rate):
    params = {} if rate is None else {"rate": rate}
    objective = get_objective("min_recall", **params)
    w = 50.0 if rate is None else rate
    objective.update(tensor(counts))
    expected = np_softmax(-w * np_recall(counts))
    np.testing.assert_allclose(objective.multipliers.numpy(), expected, rtol=1e-12, atol=1e-300)
    # the value is the weighted recall, on another matrix too (multipliers stay fixed)
    other = counts + np.eye(counts.shape[0]) * 5
    assert float(objective(tensor(other))) == pytest.approx(
        float(np.sum(expected * np_recall(other))), rel=1e-12
    )
    # the worst class gets the largest multiplier
    assert int(objective.multipliers.argmax()) == int(np.argmin(np_recall(counts)))


@pytest.mark.parametrize(
    ("counts", "head_classes", "head"),
    [(COUNTS3, None, [0, 1]), (COUNTS4, None, [0, 1, 2]), (COUNTS4, [1, 3], [1, 3])],
)
def test_min_head_tail_recall_multipliers_and_value(counts, head_classes, head):
    num_classes = counts.shape[0]
    objective = get_objective("min_head_tail_recall", rate=20.0, head_classes=head_classes)
    objective.update(tensor(counts))
    recall = np_recall(counts)
    head_mean, tail_mean = np_group_means(recall, head)
    l_head, l_tail = np_softmax(-20.0 * np.array([head_mean, tail_mean]))
    expected = np_spread(l_head, l_tail, head, num_classes)
    np.testing.assert_allclose(objective.multipliers.numpy(), expected, rtol=1e-12)
    assert float(objective.multipliers.sum()) == pytest.approx(1.0)
    assert float(objective(tensor(counts))) == pytest.approx(
        l_head * head_mean + l_tail * tail_mean, rel=1e-12
    )


COVERAGE_CASES = [
    # (hyper-parameters, alpha, scale, tau)
    ({}, 0.95, 100.0, 0.01),
    ({"alpha": 0.9, "tau": 0.1}, 0.9, 100.0, 0.1),
    ({"alpha": 1.0, "scale": 3.0, "tau": 0.02}, 1.0, 3.0, 0.02),
]


@pytest.mark.parametrize("metric", ["mean_recall", "h_mean"])
@pytest.mark.parametrize(("params", "alpha", "scale", "tau"), COVERAGE_CASES)
@pytest.mark.parametrize("counts", [COUNTS3, COUNTS4])
def test_coverage_multipliers_and_value(metric, params, alpha, scale, tau, counts):
    num_classes = counts.shape[0]
    objective = get_objective(f"{metric}_min_coverage", **params)
    objective.update(tensor(counts))
    coverage = np_coverage(counts)
    expected = np_coverage_rule(coverage, num_classes, alpha, scale, tau)
    np.testing.assert_allclose(objective.multipliers.numpy(), expected, rtol=1e-12, atol=1e-12)
    recall = np_recall(counts)
    value = recall.mean() if metric == "mean_recall" else np_h_mean(recall)
    by_hand = (value + np.sum(expected * coverage)) / (1 + expected.max())
    assert float(objective(tensor(counts))) == pytest.approx(by_hand, rel=1e-12)


def test_coverage_multipliers_on_the_4x4_matrix_are_non_trivial():
    # guard for the cases above: one class is under-covered, the others are not
    objective = get_objective("mean_recall_min_coverage", alpha=0.9, tau=0.1)
    objective.update(tensor(COUNTS4))
    multipliers = objective.multipliers.numpy()
    assert multipliers[:3].tolist() == [0.0, 0.0, 0.0]
    assert 10 < multipliers[3] < 90


@pytest.mark.parametrize("metric", ["mean_recall", "h_mean"])
@pytest.mark.parametrize(
    ("counts", "head_classes", "head", "tau"),
    [
        (COUNTS4, None, [0, 1, 2], 0.01),
        (COUNTS4, [0, 3], [0, 3], 0.01),
        (COUNTS3, None, [0, 1], 0.05),
        (COUNTS3, [2], [2], 0.05),
    ],
)
def test_head_tail_coverage_multipliers_and_value(metric, counts, head_classes, head, tau):
    num_classes = counts.shape[0]
    objective = get_objective(
        f"{metric}_min_head_tail_coverage", tau=tau, head_classes=head_classes
    )
    objective.update(tensor(counts))
    coverage = np_coverage(counts)
    groups = np.array(np_group_means(coverage, head))
    l_head, l_tail = np_coverage_rule(groups, num_classes, tau=tau)
    assert max(l_head, l_tail) > 0  # every case has one under-covered group
    expected = np_spread(l_head, l_tail, head, num_classes)
    np.testing.assert_allclose(objective.multipliers.numpy(), expected, rtol=1e-12, atol=1e-12)
    recall = np_recall(counts)
    value = recall.mean() if metric == "mean_recall" else np_h_mean(recall)
    # MATH.md section 2: the normaliser is 1 + max(l_H, l_T), not 1 + the largest spread value
    by_hand = (value + np.sum(expected * coverage)) / (1 + max(l_head, l_tail))
    assert float(objective(tensor(counts))) == pytest.approx(by_hand, rel=1e-12)
    if not np.isclose(max(l_head, l_tail), expected.max()):  # the spread form differs here
        spread_form = (value + np.sum(expected * coverage)) / (1 + expected.max())
        assert float(objective(tensor(counts))) != pytest.approx(spread_form, rel=1e-9)


def test_updates_have_no_momentum():
    objective = get_objective("min_recall")
    objective.update(tensor(COUNTS4))
    objective.update(tensor(COUNTS4.T.copy()))
    expected = np_softmax(-50.0 * np_recall(COUNTS4.T))
    np.testing.assert_allclose(objective.multipliers.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["min_recall", "mean_recall_min_coverage"])
def test_multiplier_step_size_averages_the_updates(name):
    step = 0.3
    smoothed = get_objective(name)
    smoothed.update(tensor(COUNTS4))  # step 1: from the initial multipliers
    initial = get_objective(name)
    initial(tensor(COUNTS4))  # binds K, sets the initial multipliers
    first, second = get_objective(name), get_objective(name)
    first.update(tensor(COUNTS4))
    second.update(tensor(COUNTS4.T.copy()))
    smoothed = get_objective(name)
    smoothed.update(tensor(COUNTS4), step_size=step)
    expected_first = (1 - step) * initial.multipliers + step * first.multipliers
    np.testing.assert_allclose(smoothed.multipliers.numpy(), expected_first.numpy(), rtol=1e-12)
    smoothed.update(tensor(COUNTS4.T.copy()), step_size=step)
    expected = (1 - step) * expected_first + step * second.multipliers
    np.testing.assert_allclose(smoothed.multipliers.numpy(), expected.numpy(), rtol=1e-12)
    assert not np.allclose(expected.numpy(), second.multipliers.numpy())


@pytest.mark.parametrize("step", [0.0, -0.5, 1.5])
def test_multiplier_step_size_is_validated(step):
    with pytest.raises(ValueError, match="step_size"):
        get_objective("min_recall").update(tensor(COUNTS4), step_size=step)


# -- state -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MULTIPLIER_OBJECTIVES)
def test_state_dict_round_trip(name):
    objective = get_objective(name)
    objective.update(tensor(COUNTS4))
    state = objective.state_dict()
    assert state["name"] == name and state["num_classes"] == 4
    restored = get_objective(name)
    restored.load_state_dict(state)
    assert restored.num_classes == 4
    torch.testing.assert_close(restored.multipliers, objective.multipliers, rtol=0, atol=0)
    probe = tensor(COUNTS4 + 3 * np.eye(4))
    assert float(restored(probe)) == float(objective(probe))
    # a fresh objective (never updated) gives a different value on the probe
    assert float(get_objective(name)(probe)) != pytest.approx(float(objective(probe)), rel=1e-6)
    with pytest.raises(ValueError, match=r"K = 3 classes .* K = 4"):
        restored(tensor(COUNTS3))
    with pytest.raises(ValueError, match=r"K = 3 classes .* K = 4"):
        restored.update(tensor(COUNTS3))
    # the state is a copy: changing it does not change the objective
    state["multipliers"].fill_(123.0)
    assert float(objective.multipliers.max()) < 123.0


def test_load_state_dict_rejects_another_objective():
    state = get_objective("min_recall").state_dict()
    with pytest.raises(ValueError, match="min_recall"):
        get_objective("mean_recall_min_coverage").load_state_dict(state)


# -- errors ------------------------------------------------------------------------------------
def test_unknown_objective_lists_known_names():
    with pytest.raises(ValueError, match="no_such_metric") as info:
        get_objective("no_such_metric")
    for name in list_objectives():
        assert re.search(rf"\b{re.escape(name)}\b", str(info.value)), name
    with pytest.raises(ValueError, match="h_mean_min_coverage"):
        selmix.core.as_objective("worst_recall")


@pytest.mark.parametrize(
    "name", ["mean_recall", "min_recall", "mean_recall_min_coverage", "h_mean_min_coverage"]
)
def test_unknown_hyperparameter_is_a_type_error_naming_it(name):
    with pytest.raises(TypeError, match="learning_rate"):
        get_objective(name, learning_rate=3.0)


@pytest.mark.parametrize(
    ("name", "params", "argument"),
    [
        ("min_recall", {"rate": 0.0}, "rate"),
        ("min_recall", {"rate": -5.0}, "rate"),
        ("min_head_tail_recall", {"rate": 0}, "rate"),
        ("mean_recall_min_coverage", {"alpha": 1.5}, "alpha"),
        ("mean_recall_min_coverage", {"alpha": -0.1}, "alpha"),
        ("h_mean_min_head_tail_coverage", {"alpha": 2.0}, "alpha"),
        ("mean_recall_min_coverage", {"tau": 0.0}, "tau"),
        ("h_mean_min_coverage", {"tau": -0.01}, "tau"),
        ("h_mean_min_coverage", {"scale": 0.0}, "scale"),
        ("min_recall", {"rate": float("nan")}, "rate"),
    ],
)
def test_bad_hyperparameter_values_name_the_argument(name, params, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        get_objective(name, **params)


def test_non_numeric_hyperparameter_is_a_type_error():
    with pytest.raises(TypeError, match="`rate`"):
        get_objective("min_recall", rate="fast")


# -- user callables ----------------------------------------------------------------------------
def soft_min_recall(confusion: torch.Tensor, temperature: float = 30.0) -> torch.Tensor:
    recall = confusion.diagonal() / confusion.sum(dim=1)
    return -torch.logsumexp(-temperature * recall, dim=0) / temperature


def test_user_callable_via_as_objective():
    objective = selmix.core.as_objective(soft_min_recall)
    assert isinstance(objective, selmix.Objective)
    assert selmix.core.as_objective(objective) is objective
    confusion = tensor(COUNTS4).requires_grad_(True)
    value = objective(confusion)
    recall = np_recall(COUNTS4)
    by_hand = -np.log(np.sum(np.exp(-30.0 * recall))) / 30.0
    assert float(value.detach()) == pytest.approx(by_hand, rel=1e-12)
    assert objective.num_classes == 4 and objective.multipliers is None
    (grad,) = torch.autograd.grad(value, confusion)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    lam = selmix.core.as_objective(lambda c: c.diagonal().sum() / c.sum())
    assert float(lam(tensor(COUNTS3))) == pytest.approx(np.trace(COUNTS3) / COUNTS3.sum())


def test_user_callable_in_gain_matrix_equals_the_built_in_objective():
    generator = torch.Generator().manual_seed(3)
    num_classes, dim = 4, 6
    head = nn.Linear(dim, num_classes).double()
    prototypes = 2 * torch.randn(num_classes, dim, dtype=torch.float64, generator=generator)
    confusion = tensor(COUNTS4)
    built_in = selmix.core.gain_matrix("mean_recall", confusion, prototypes, head)
    by_lambda = selmix.core.gain_matrix(
        lambda c: (c.diagonal() / c.sum(dim=1)).mean(), confusion, prototypes, head
    )
    torch.testing.assert_close(by_lambda, built_in, rtol=1e-12, atol=1e-14)
    assert built_in.abs().max() > 1e-3
    soft = selmix.core.gain_matrix(soft_min_recall, confusion, prototypes, head)
    assert torch.isfinite(soft).all()
    assert not torch.allclose(soft, built_in, rtol=1e-3)


def test_bad_callables():
    with pytest.raises(TypeError, match="objective"):
        selmix.core.as_objective(42)
    vector = selmix.core.as_objective(lambda c: c.diagonal())
    with pytest.raises(TypeError, match="scalar"):
        vector(tensor(COUNTS3))
    with pytest.raises(ValueError, match="does not depend"):
        selmix.core.confusion_gradient(lambda c: torch.tensor(1.0), tensor(COUNTS3))


def test_register_objective_rejects_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        selmix.register_objective("mean_recall")(lambda: None)
