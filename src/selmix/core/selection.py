"""Which of several models (or taus, or fine-tuning steps) is best for an objective.

:func:`objective_score` scores a confusion matrix for an objective by the metric the
objective stands for, computed exactly, with coverage constraints ordered feasibility
first (:class:`ObjectiveScore`); :func:`best_index` picks the best of a list. The post-hoc
baseline tunes its tau with it and :func:`selmix.finetune` selects its best feedback step
with it, so scores of different steps compare even though the objective's multipliers
change between them.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from selmix._validation import check_all_classes_present, check_confusion
from selmix.core.metrics import (
    g_mean,
    h_mean,
    mean_recall,
    min_coverage,
    min_head_tail_coverage,
    min_head_tail_recall,
    min_recall,
)
from selmix.core.objectives import (
    CoverageConstrained,
    GMean,
    HMean,
    MeanRecall,
    MinHeadTailRecall,
    MinRecall,
    Objective,
    as_objective,
)

__all__ = [
    "ObjectiveScore",
    "best_index",
    "objective_score",
    "selection_tolerance",
    "undominated_index",
]

ObjectiveLike = Objective | Callable[[torch.Tensor], torch.Tensor] | str

# Coverage computed from counts is exact up to rounding; this absorbs the rounding.
_FEASIBILITY_TOLERANCE = 1e-12


@functools.total_ordering
@dataclass(frozen=True, eq=False)
class ObjectiveScore:
    """How good a confusion matrix is for an objective; scores compare, larger is better.

    Scores order by :attr:`key`: for an objective without a constraint, by the metric; for
    a coverage-constrained one, any matrix that meets the constraint beats every matrix
    that does not (a class at 0 coverage never wins over a feasible model), matrices that
    meet it order by the metric (then the coverage), and matrices that do not order by the
    metric less the share of the target they miss, :attr:`penalized`, then the coverage.
    The shortfall share is in [0, 1], in the metric's units: among infeasible steps a
    gain of a tenth of the target coverage is worth 0.1 of mean recall, so neither a
    far-off coverage nor a collapsed metric can win (a Lagrangian with the run's
    multipliers would reward coverage linearly below the target and change from step to
    step).

    Attributes:
        metric: the objective's metric, e.g. min recall for ``"min_recall"``, mean recall
            for ``"mean_recall_min_coverage"``.
        coverage: the constrained quantity (min coverage, or min head/tail coverage for the
            ``*_min_head_tail_coverage`` objectives); None without a constraint.
        target: the constraint's target ``alpha / K``; None without a constraint.
        tiebreak: what orders equal metrics (the mean recall, for min recall and the
            min head/tail recall): a min recall on n samples per class moves in steps of
            1 / n, so on a small validation set many steps tie on it, and the first of
            them is rarely the best trained. None: ties stay ties (the earlier wins).
    """

    metric: float
    coverage: float | None = None
    target: float | None = None
    tiebreak: float | None = None

    @property
    def feasible(self) -> bool:
        """Whether the constraint is met (always True without a constraint)."""
        if self.coverage is None or self.target is None:
            return True
        return self.coverage >= self.target - _FEASIBILITY_TOLERANCE

    @property
    def shortfall(self) -> float:
        """``max(0, 1 - coverage / target)``: the share of the target coverage missed."""
        if self.coverage is None or self.target is None or self.feasible:
            return 0.0
        return max(0.0, 1.0 - self.coverage / self.target)

    @property
    def penalized(self) -> float:
        """``metric - shortfall``, e.g. ``mean_recall - max(0, 1 - K min_cov / alpha)``."""
        return self.metric - self.shortfall

    @property
    def key(self) -> tuple[float, ...]:
        """The tuple the scores are ordered by."""
        if self.coverage is None:
            if self.tiebreak is None:
                return (1.0, self.metric)
            return (1.0, self.metric, self.tiebreak)
        if self.feasible:
            return (1.0, self.metric, self.coverage)
        return (0.0, self.penalized, self.coverage)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ObjectiveScore):
            return NotImplemented
        return self.key == other.key

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, ObjectiveScore):
            return NotImplemented
        return self.key < other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for logs: metric, coverage, target and feasible."""
        return {
            "metric": self.metric,
            "coverage": self.coverage,
            "target": self.target,
            "tiebreak": self.tiebreak,
            "feasible": self.feasible,
        }


def objective_score(objective: ObjectiveLike, confusion: torch.Tensor) -> ObjectiveScore:
    """Scores a confusion matrix for an objective: the rule that picks a model or a tau.

    The metric is the one the objective stands for, computed exactly (not the objective's
    smooth surrogate): ``mean_recall``, ``min_recall``, ``min_head_tail_recall``,
    ``g_mean`` or ``h_mean``. A coverage-constrained objective (``*_min_coverage``,
    ``*_min_head_tail_coverage``) scores its metric (mean recall or H-mean) subject to
    ``min coverage >= alpha / K`` (or the head and tail mean coverages for the head/tail
    variants), see :class:`ObjectiveScore`. Any other objective scores its own value
    ``psi(C)``, with its multipliers (if any) refreshed from ``confusion`` on a copy.

    Args:
        objective: an objective name, an :class:`~selmix.core.objectives.Objective` (its
            ``alpha`` and ``head_classes`` are used) or a differentiable callable of C.
        confusion: Tensor[K, K] of counts or fractions, rows are true labels; every class
            must have a sample.

    Returns:
        An :class:`ObjectiveScore`; ``max`` over scores is the best (see :func:`best_index`).
    """
    objective = as_objective(objective)
    confusion = check_confusion(confusion)
    check_all_classes_present(confusion)
    if isinstance(objective, CoverageConstrained):
        metric = mean_recall if objective.metric == "mean_recall" else h_mean
        if objective.head_tail:
            coverage = min_head_tail_coverage(confusion, objective.head_classes)
        else:
            coverage = min_coverage(confusion)
        target = objective.alpha / confusion.shape[0]
        return ObjectiveScore(float(metric(confusion)), float(coverage), target)
    if isinstance(objective, MinHeadTailRecall):  # before MinRecall: it is a subclass
        value = min_head_tail_recall(confusion, objective.head_classes)
        return ObjectiveScore(float(value), tiebreak=float(mean_recall(confusion)))
    if isinstance(objective, MinRecall):
        return ObjectiveScore(float(min_recall(confusion)), tiebreak=float(mean_recall(confusion)))
    if isinstance(objective, MeanRecall):
        value = mean_recall(confusion)
    elif isinstance(objective, GMean):
        value = g_mean(confusion)
    elif isinstance(objective, HMean):
        value = h_mean(confusion)
    else:
        probe = copy.deepcopy(objective)  # the caller's multipliers stay as they are
        with torch.no_grad():
            probe.update(confusion)
            value = probe(confusion)
    return ObjectiveScore(float(value))


def best_index(scores: Sequence[ObjectiveScore]) -> int:
    """Index of the best score; the first one on ties (e.g. the smallest tau of a grid)."""
    if len(scores) == 0:
        raise ValueError("`scores` must hold at least one score, got none")
    return max(range(len(scores)), key=lambda i: scores[i].key)


def selection_tolerance(
    objective: ObjectiveLike, class_counts: torch.Tensor | Sequence[int], width: float = 1.0
) -> float:
    """How far apart two scores of the objective's metric may be and still tie: ``width``
    standard errors of the metric on a validation set with ``class_counts`` samples per class.

    For min recall and min head/tail recall it is ``width`` times
    :meth:`~selmix.core.objectives.MinRecall.recall_spread` (``0.5 / sqrt(min_k n_k)`` for min
    recall: with 40 samples per class, 0.079); for every other objective 0 (no tie).

    Args:
        objective: the run's objective.
        class_counts: Tensor[K], the validation samples of each class.
        width: the number of standard errors (>= 0; 0: only equal scores tie).
    """
    objective = as_objective(objective)
    if width < 0:
        raise ValueError(f"`width` must be >= 0, got {width}")
    if width == 0 or not isinstance(objective, MinRecall):
        return 0.0
    return width * objective.recall_spread(torch.as_tensor(class_counts))


def undominated_index(scores: Sequence[ObjectiveScore], tolerance: float) -> int:
    """The step to return among those tied on the metric within ``tolerance``.

    The scores whose metric is within ``tolerance`` of the best metric tie on the objective
    (:func:`selection_tolerance`: their difference is within the noise of the validation
    set); of them, the one with the highest tie-break (the mean recall, for min recall),
    then the highest metric, then the earliest. That score is not dominated by any tied
    score: none has both a metric and a tie-break at least as high, and one higher. With
    ``tolerance = 0``, or scores without a tie-break, it is :func:`best_index`.

    Args:
        scores: the candidates' scores, e.g. one per feedback step.
        tolerance: the largest difference of the metric that still ties (>= 0).
    """
    if len(scores) == 0:
        raise ValueError("`scores` must hold at least one score, got none")
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance}")
    if tolerance == 0 or any(s.tiebreak is None or s.coverage is not None for s in scores):
        return best_index(scores)
    top = max(s.metric for s in scores)
    tied = [i for i, s in enumerate(scores) if s.metric >= top - tolerance]
    return max(tied, key=lambda i: (scores[i].tiebreak, scores[i].metric, -i))
