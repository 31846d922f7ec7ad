"""Estimates of the confusion matrix from few validation samples per class.

With n validation samples of a class its recall is known to about sqrt(r (1 - r) / n):
0.1 at n = 20. Steering and selecting by such numbers fits their noise: equalising K noisy
recalls leaves the true lowest one about two standard errors below the level reached.
:func:`shrunk_confusion` pools the classes instead (empirical Bayes): each row of the
confusion counts is pulled towards a prior row, the mean recall on the diagonal and the
pooled error distribution off it, with a strength ``m`` (pseudo-samples per class) that
the counts themselves set. When the classes' recalls differ by far more than their noise,
``m`` is small and the estimate stays with the counts; when the differences are within the
noise, ``m`` grows and the estimate says so.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from selmix._validation import check_confusion

__all__ = [
    "SHRINKAGE",
    "SMALL_VALIDATION",
    "SmallValidationWarning",
    "empirical_bayes_strength",
    "per_class_objective",
    "pools_classes",
    "recall_uncertainty",
    "shrinkage_prior",
    "shrunk_confusion",
    "warn_if_small_validation",
]

SHRINKAGE = ("none", "auto", "on")
"""Choices of the ``shrinkage`` setting: never, for per-class objectives, always."""

SMALL_VALIDATION = 50
"""Validation samples of the smallest class below which :func:`warn_if_small_validation`
warns for a per-class objective (docs/guide/known_limits.md has the measurements)."""


class SmallValidationWarning(UserWarning):
    """The validation set is too small to resolve a per-class objective."""


def per_class_objective(objective: Any) -> bool:
    """Whether an objective turns on each class's own recall (min recall, H-mean, G-mean,
    H-mean s.t. per-class coverage), rather than on sums over many classes (mean recall,
    coverage with mean recall, head/tail groups, a user's function): the objective's own
    ``per_class`` attribute (:class:`~selmix.core.objectives.Objective`), False for anything
    that declares none."""
    return bool(getattr(objective, "per_class", False))


def pools_classes(shrinkage: str, objective: Any) -> bool:
    """Whether a run with this ``shrinkage`` setting pools the classes' estimates
    (:func:`shrunk_confusion`) for this objective: ``"on"`` always, ``"auto"`` for
    :func:`per_class_objective` ones, ``"none"`` never."""
    return shrinkage == "on" or (shrinkage == "auto" and per_class_objective(objective))


# Bounds of the strength: m stays finite when every class looks alike (the prior is then
# nearly the answer), and is 0 when the spread is so large that any m would be tiny.
_MAX_STRENGTH = 1e4


def _rows(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = counts.double()
    totals = counts.sum(1)
    if bool((totals <= 0).any()):
        missing = (totals <= 0).nonzero().flatten().tolist()
        raise ValueError(
            f"`counts` must have a sample of every class; class(es) {missing} have none"
        )
    return counts, totals


def empirical_bayes_strength(counts: torch.Tensor) -> float:
    """The pseudo-sample count m of a beta-binomial fit to the per-class recalls.

    The recalls ``r_k = N_kk / n_k`` are modelled as binomial draws around true recalls
    spread with variance ``tau^2`` around their mean ``rbar``; the method of moments gives
    ``tau^2 = max(0, var(r) - mean(r (1 - r) / (n - 1)))`` and ``m = rbar (1 - rbar) / tau^2 - 1``
    (the prior's pseudo-sample count of a Beta with that mean and variance).

    Args:
        counts: Tensor[K, K] of confusion counts (rows: true classes), every row non-empty.

    Returns:
        m >= 0 (at most 1e4).
    """
    counts, totals = _rows(check_confusion(counts))
    recall = counts.diagonal() / totals
    mean = float(recall.mean())
    if mean <= 0.0 or mean >= 1.0:
        return 0.0
    noise = float((recall * (1 - recall) / (totals - 1).clamp(min=1)).mean())
    spread = float(recall.var(unbiased=True)) - noise
    if spread <= 0:
        return _MAX_STRENGTH
    return float(min(_MAX_STRENGTH, max(0.0, mean * (1 - mean) / spread - 1)))


def shrinkage_prior(counts: torch.Tensor) -> torch.Tensor:
    """The prior row of every class: Tensor[K, K] float64, rows summing to 1.

    The diagonal is the mean recall; off the diagonal, the remaining mass is spread over
    the other classes in proportion to the errors they absorb across all rows, half of it,
    and uniformly, the other half (so that no pair is left with a zero estimate).

    Args:
        counts: Tensor[K, K] of confusion counts, every row non-empty.
    """
    counts, totals = _rows(check_confusion(counts))
    k = counts.shape[0]
    rates = counts / totals[:, None]
    recall = rates.diagonal().mean()
    errors = rates - torch.diag(rates.diagonal())
    absorbed = errors.sum(0)  # Tensor[K]: error mass that lands on each predicted class
    off_diagonal = 1.0 - torch.eye(k, dtype=torch.float64, device=counts.device)
    others = absorbed[None, :] * off_diagonal  # row k: the classes other than k
    totals_others = others.sum(1, keepdim=True)
    uniform = off_diagonal / (k - 1)
    share = torch.where(totals_others > 0, others / totals_others.clamp(min=1e-300), uniform)
    prior = (1 - recall) * (0.5 * share + 0.5 * uniform)
    prior += torch.diag(torch.full((k,), float(recall), dtype=torch.float64, device=counts.device))
    return prior


def shrunk_confusion(counts: torch.Tensor, strength: float | None = None) -> torch.Tensor:
    """Empirical-Bayes estimate of C from confusion counts: Tensor[K, K] float64 summing to 1.

    Row k becomes ``N_k + m q_k`` (``q``: :func:`shrinkage_prior`, ``m``: ``strength``, or
    :func:`empirical_bayes_strength` when None), and the matrix is normalised to sum to 1.
    A row with n samples is pulled towards its prior by ``m / (n + m)``; with ``m = 0`` this
    is the plain ``counts / counts.sum()``.

    Args:
        counts: Tensor[K, K] of confusion counts (rows: true classes), every row non-empty.
        strength: m >= 0, pseudo-samples per class; None estimates it from the counts.

    Returns:
        The estimate, Tensor[K, K] float64.
    """
    counts, _ = _rows(check_confusion(counts))
    if strength is None:
        strength = empirical_bayes_strength(counts)
    if strength < 0:
        raise ValueError(f"`strength` must be >= 0, got {strength}")
    estimate = counts + strength * shrinkage_prior(counts)
    return estimate / estimate.sum()


def recall_uncertainty(samples: int) -> float:
    """The largest standard error of a recall measured on ``samples`` samples (at 0.5)."""
    return 0.5 / max(1, samples) ** 0.5


def warn_if_small_validation(class_counts: torch.Tensor, objective: Any, shrinkage: str) -> bool:
    """Warns (one line, :class:`SmallValidationWarning`) when the smallest class of the
    validation set has fewer than :data:`SMALL_VALIDATION` samples and the objective turns
    on per-class recalls (:func:`per_class_objective`).

    Args:
        class_counts: Tensor[K], validation samples per class.
        objective: the run's objective.
        shrinkage: the run's ``shrinkage`` setting (the message says what it does).

    Returns:
        Whether it warned.
    """
    smallest = int(torch.as_tensor(class_counts).min())
    if not per_class_objective(objective) or smallest >= SMALL_VALIDATION:
        return False
    action = (
        "selmix pools the classes' estimates to steer and select (shrinkage)"
        if pools_classes(shrinkage, objective)
        else "shrinkage='auto' would pool the classes' estimates"
    )
    warnings.warn(
        f"`val` has {smallest} samples of its smallest class: a class's recall on it is "
        f"known to about +/-{100 * recall_uncertainty(smallest):.0f} points, so "
        f"{objective.name} on it is optimistic once SelMix steers and selects by it; "
        f"{action}. Expect the test value below the validation value, and compare with "
        f"`selmix baseline` (docs/guide/known_limits.md); {SMALL_VALIDATION}+ samples per "
        "class resolve it.",
        SmallValidationWarning,
        stacklevel=3,
    )
    return True
