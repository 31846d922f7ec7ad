"""Objectives psi(C) that SelMix maximises (docs/maths.md section 2).

Every objective is a callable of a K x K confusion matrix that returns a differentiable
scalar tensor. Objectives with Lagrange multipliers refresh them with :meth:`update` from
the validation confusion matrix at each feedback step; the multipliers stay fixed while the
gain is computed, so the gain is the derivative of a plain weighted metric.

A user's own objective needs nothing from this module: any differentiable torch function
of C works wherever an objective is expected (its derivative comes from autograd).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from selmix._validation import check_confusion, check_in_range, check_positive
from selmix.core.metrics import head_mask

__all__ = [
    "CallableObjective",
    "CoverageConstrained",
    "GMean",
    "HMean",
    "MeanRecall",
    "MinHeadTailRecall",
    "MinRecall",
    "Objective",
    "as_objective",
    "get_objective",
    "list_objectives",
    "noise_rate",
    "register_objective",
]

CLIP = 1e-7  # docs/maths.md: entries are clipped below before any objective is evaluated


def _prepared(confusion: torch.Tensor) -> torch.Tensor:
    """Normalises to a total of 1 and clips tiny entries (keeps the graph for autograd)."""
    return (confusion / confusion.sum()).clamp_min(CLIP)


def _recall(prepared: torch.Tensor) -> torch.Tensor:
    return prepared.diagonal() / prepared.sum(dim=1)


def _coverage(prepared: torch.Tensor) -> torch.Tensor:
    return prepared.sum(dim=0) / prepared.sum()


def _spread(group_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spreads a (head, tail) pair over classes as value / group size."""
    head_value = group_values[0] / mask.sum()
    tail_value = group_values[1] / (~mask).sum()
    return torch.where(mask.to(group_values.device), head_value, tail_value)


class Objective:
    """Base class: validation of C, lazy K, multipliers and their state.

    Subclasses implement :meth:`value` (a differentiable function of the prepared matrix)
    and, if they have multipliers, :meth:`_new_multipliers`. Two class attributes say
    what kind of objective it is, for the parts of a run that treat kinds differently:

    * ``per_class``: psi turns on each class's own recall or coverage (min recall, G-mean,
      H-mean, H-mean subject to per-class coverage), rather than on sums over many classes
      (mean recall, head/tail groups). With ``shrinkage="auto"`` a run pools the classes'
      noisy validation estimates for such an objective
      (:func:`selmix.core.estimates.pools_classes`). Default False, as for a user's
      callable.
    * ``worst_case``: psi is the worst of the classes (or groups), steered by softmax
      multipliers (min recall, min head/tail recall). A run then mixes a uniform share of
      pairs in by default (``uniform_mix=None``). Default False.

    Attributes:
        name: the name in logs and ``state_dict``.
        has_multipliers: whether :meth:`update` refreshes Lagrange multipliers.
        per_class: see above.
        worst_case: see above.

    Args:
        head_classes: head classes for head/tail objectives (see :func:`selmix.core.head_mask`).
    """

    name = "objective"
    has_multipliers = False
    per_class = False
    worst_case = False

    def __init__(self, head_classes: torch.Tensor | list[int] | None = None) -> None:
        self.head_classes = head_classes
        self.num_classes: int | None = None
        self._head_mask: torch.Tensor | None = None
        self._multipliers: torch.Tensor | None = None

    # -- public API -------------------------------------------------------------------
    def __call__(self, confusion: torch.Tensor) -> torch.Tensor:
        """psi(C): a scalar tensor, differentiable with respect to ``confusion``."""
        confusion = self._bind(confusion)
        prepared = _prepared(confusion)
        if self.has_multipliers:
            if self._multipliers is None:
                self._multipliers = self._initial_multipliers()
            # the multipliers follow the matrix (updated on the CPU, used on the GPU)
            self._multipliers = self._multipliers.to(prepared)
        return self.value(prepared)

    def update(self, confusion: torch.Tensor, step_size: float = 1.0) -> None:
        """Refreshes the Lagrange multipliers from a (validation) confusion matrix.

        With ``step_size = 1`` (the paper, App. F) each update uses only this matrix. A
        smaller step moves the multipliers part of the way, ``l <- (1 - a) l + a l_new``
        (the initial multipliers are the starting point): an exponential average of the
        per-step multipliers, which keeps a noisy validation estimate (a few images per
        class) from swinging the policy between classes from one feedback step to the next.

        Args:
            confusion: Tensor[K, K], counts or fractions.
            step_size: a in (0, 1], the step of the multiplier (dual) update.
        """
        step_size = check_in_range("step_size", check_positive("step_size", step_size), 0.0, 1.0)
        confusion = self._bind(confusion)
        if self.has_multipliers:
            with torch.no_grad():
                fresh = self._new_multipliers(_prepared(confusion.detach()))
                if step_size < 1.0:
                    previous = self._multipliers
                    if previous is None:
                        previous = self._initial_multipliers()
                    fresh = (1 - step_size) * previous.to(fresh) + step_size * fresh
                self._multipliers = fresh

    @property
    def multipliers(self) -> torch.Tensor | None:
        """Per-class multipliers, Tensor[K] (None for objectives without any)."""
        return None if self._multipliers is None else self._multipliers.detach().clone()

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's arguments, for logs and ``state_dict``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: name, K, hyper-parameters and multipliers."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "hyperparameters": self.hyperparameters(),
            "multipliers": self.multipliers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved."""
        if state.get("name") != self.name:
            raise ValueError(
                f"`state` belongs to objective {state.get('name')!r}, not {self.name!r}"
            )
        for key, value in state.get("hyperparameters", {}).items():
            if key != "head_classes" and hasattr(self, key):
                setattr(self, key, value)
        self.num_classes = state["num_classes"]
        if self.num_classes is not None:
            self._head_mask = self._make_head_mask(self.num_classes)
        multipliers = state.get("multipliers")
        self._multipliers = None if multipliers is None else multipliers.clone()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    # -- to override --------------------------------------------------------------------
    def value(self, prepared: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _initial_multipliers(self) -> torch.Tensor:
        raise NotImplementedError

    def _new_multipliers(self, prepared: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------
    def _make_head_mask(self, num_classes: int) -> torch.Tensor:
        return head_mask(num_classes, self.head_classes)

    def _bind(self, confusion: torch.Tensor) -> torch.Tensor:
        confusion = check_confusion(confusion)
        size = confusion.shape[0]
        if self.num_classes is None:
            self.num_classes = size
            self._head_mask = self._make_head_mask(size)
        elif size != self.num_classes:
            raise ValueError(
                f"`confusion` has K = {size} classes but {self.name} was set up for "
                f"K = {self.num_classes}"
            )
        return confusion

    @property
    def mask(self) -> torch.Tensor:
        assert self._head_mask is not None  # set by _bind before any use
        return self._head_mask

    @property
    def _bound_classes(self) -> int:
        """K, once a matrix has been seen (set by _bind before any use)."""
        assert self.num_classes is not None
        return self.num_classes

    @property
    def _current_multipliers(self) -> torch.Tensor:
        """The multipliers ``value`` uses (set by ``__call__`` before it calls ``value``)."""
        assert self._multipliers is not None
        return self._multipliers


class MeanRecall(Objective):
    """Mean recall (balanced accuracy)."""

    name = "mean_recall"

    def value(self, prepared: torch.Tensor) -> torch.Tensor:
        return _recall(prepared).mean()


class GMean(Objective):
    """Geometric mean of recalls."""

    name = "g_mean"
    per_class = True

    def value(self, prepared: torch.Tensor) -> torch.Tensor:
        return _recall(prepared).log().mean().exp()


class HMean(Objective):
    """Harmonic mean of recalls."""

    name = "h_mean"
    per_class = True

    def value(self, prepared: torch.Tensor) -> torch.Tensor:
        recall = _recall(prepared)
        return recall.numel() / recall.reciprocal().sum()


def noise_rate(spread: float) -> float:
    """The multiplier rate w at which ``softmax(-w * recall)`` is the chance of each class
    being the worst, when every recall is known to a standard error ``spread``.

    If the measured recalls are the true ones plus independent Gumbel errors of scale b,
    the class with the lowest measured recall is class k with probability
    ``softmax(-recall / b)[k]``; matching the Gumbel's standard deviation
    ``b pi / sqrt(6)`` to ``spread`` gives ``w = pi / (sqrt(6) spread)``. Classes whose
    recalls differ by less than their noise then share the weight: with 40 samples per
    class (spread 0.5 / sqrt(40) = 0.079) w = 16, and a recall 2 points lower weighs
    ``exp(0.02 w)`` = 1.4 times as much, where the paper's w = 50 makes it 2.7 times; at 500
    samples per class w = 57, about the paper's.

    Args:
        spread: the standard error of the recalls (> 0), e.g.
            :meth:`MinRecall.recall_spread` of the validation set's class counts.
    """
    spread = check_positive("spread", spread)
    return math.pi / (math.sqrt(6.0) * spread)


class MinRecall(Objective):
    """Worst-case recall through a weighted recall, ``sum_y l_y recall_y``.

    ``l = (1 - floor) softmax(-w * recall) + floor / K``: with ``floor`` > 0 every class
    keeps a share of the weight, so the objective is the worst recall first and the mean
    recall second (``floor`` = 0: the paper).

    Args:
        rate: the "validation learning rate" w of ``l = softmax(-w * recall)``
            (:func:`noise_rate` sets it from the validation set's size).
        floor: the share of the weight spread evenly over the classes, in [0, 1).
    """

    name = "min_recall"
    has_multipliers = True
    per_class = True
    worst_case = True

    def __init__(self, rate: float = 50.0, head_classes: Any = None, floor: float = 0.0) -> None:
        super().__init__(head_classes)
        self.rate = check_positive("rate", rate)
        self.floor = check_in_range("floor", floor, 0.0, 1.0)
        if self.floor >= 1.0:
            raise ValueError(f"`floor` must be below 1 (none left for the worst), got {floor}")

    def hyperparameters(self) -> dict[str, Any]:
        if self.floor:
            return {"rate": self.rate, "floor": self.floor}
        return {"rate": self.rate}

    def recall_spread(self, class_counts: torch.Tensor) -> float:
        """The standard error of the recall the multipliers compare, at its largest
        (recall 0.5): ``0.5 / sqrt(min_k n_k)`` for the class with fewest samples.

        Args:
            class_counts: Tensor[K], the validation samples of each class (each > 0).
        """
        counts = _class_counts(class_counts)
        return 0.5 / math.sqrt(float(counts.min()))

    def value(self, prepared: torch.Tensor) -> torch.Tensor:
        return (self._current_multipliers * _recall(prepared)).sum()

    def _initial_multipliers(self) -> torch.Tensor:
        size = self._bound_classes
        return torch.full((size,), 1.0 / size, dtype=torch.float64)

    def _new_multipliers(self, prepared: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(-self.rate * _recall(prepared), dim=0)
        return (1 - self.floor) * weights + self.floor / weights.numel()


class MinHeadTailRecall(MinRecall):
    """The smaller of head and tail mean recall, through one multiplier per group."""

    name = "min_head_tail_recall"
    per_class = False  # two group means, each over many classes

    def __init__(self, rate: float = 50.0, head_classes: Any = None, floor: float = 0.0) -> None:
        super().__init__(rate, head_classes, floor)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "head_classes": self.head_classes}

    def recall_spread(self, class_counts: torch.Tensor) -> float:
        """The larger standard error of the two groups' mean recalls, at recall 0.5:
        ``sqrt(sum_{k in G} 0.25 / n_k) / |G|`` for G the head or the tail.

        Args:
            class_counts: Tensor[K], the validation samples of each class (each > 0).
        """
        counts = _class_counts(class_counts)
        mask = self._make_head_mask(counts.numel())
        return max(
            math.sqrt(float((0.25 / counts[group]).sum())) / int(group.sum())
            for group in (mask, ~mask)
        )

    def _initial_multipliers(self) -> torch.Tensor:
        return _spread(torch.tensor([0.5, 0.5], dtype=torch.float64), self.mask)

    def _new_multipliers(self, prepared: torch.Tensor) -> torch.Tensor:
        recall = _recall(prepared)
        mask = self.mask.to(recall.device)
        groups = torch.stack([recall[mask].mean(), recall[~mask].mean()])
        weights = torch.softmax(-self.rate * groups, dim=0)
        return _spread((1 - self.floor) * weights + self.floor / 2, mask)


def _class_counts(class_counts: torch.Tensor | list[int]) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or bool((counts <= 0).any()):
        raise ValueError(f"`class_counts` must be positive counts, got {counts.tolist()}")
    return counts


class CoverageConstrained(Objective):
    """A recall metric subject to coverage constraints, as one Lagrangian.

    ``psi = [metric + sum_p l_p coverage_p] / (1 + max_p l_p)`` with
    ``l_p = max(0, L * (1 - exp((coverage_p - alpha / K) / tau)))``: a multiplier grows
    only for classes whose coverage is below the target ``alpha / K``.

    Args:
        metric: ``"mean_recall"`` or ``"h_mean"``.
        head_tail: one constraint on each of the head's and the tail's mean coverage
            (spread as l_H/|H|, l_T/|T|) instead of one per class.
        alpha: the target share of the fair coverage 1/K.
        scale: L, the multipliers' ceiling.
        tau: the temperature of the multiplier update.
    """

    has_multipliers = True

    def __init__(
        self,
        metric: str = "mean_recall",
        head_tail: bool = False,
        alpha: float = 0.95,
        scale: float = 100.0,
        tau: float = 0.01,
        head_classes: Any = None,
    ) -> None:
        super().__init__(head_classes)
        if metric not in ("mean_recall", "h_mean"):
            raise ValueError(f"`metric` must be 'mean_recall' or 'h_mean', got {metric!r}")
        self.metric = metric
        self.head_tail = bool(head_tail)
        self.alpha = check_in_range("alpha", alpha, 0.0, 1.0)
        self.scale = check_positive("scale", scale)
        self.tau = check_positive("tau", tau)
        suffix = "min_head_tail_coverage" if self.head_tail else "min_coverage"
        self.name = f"{metric}_{suffix}"
        # mean recall and group coverages are sums over many classes; H-mean and per-class
        # coverage constraints each turn on one class
        self.per_class = metric == "h_mean" and not self.head_tail

    def hyperparameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {"alpha": self.alpha, "scale": self.scale, "tau": self.tau}
        if self.head_tail:
            params["head_classes"] = self.head_classes
        return params

    def value(self, prepared: torch.Tensor) -> torch.Tensor:
        recall = _recall(prepared)
        if self.metric == "mean_recall":
            metric = recall.mean()
        else:
            metric = recall.numel() / recall.reciprocal().sum()
        multipliers = self._current_multipliers
        penalty = (multipliers * _coverage(prepared)).sum()
        return (metric + penalty) / (1 + self._largest_constraint_multiplier(multipliers))

    def _largest_constraint_multiplier(self, multipliers: torch.Tensor) -> torch.Tensor:
        """max_p l_p over the constraints (docs/maths.md section 2).

        Head/tail: the constraints are on the groups' mean coverage with multipliers
        l_H, l_T (spread over classes as l_H/|H|, l_T/|T|), so the normaliser is
        1 + max(l_H, l_T), not 1 + the largest spread value.
        """
        if not self.head_tail:
            return multipliers.max()
        mask = self.mask.to(multipliers.device)
        return torch.maximum(multipliers[mask].sum(), multipliers[~mask].sum())

    def _initial_multipliers(self) -> torch.Tensor:
        return torch.zeros(self._bound_classes, dtype=torch.float64)

    def _rule(self, coverage: torch.Tensor) -> torch.Tensor:
        target = self.alpha / self._bound_classes
        return (self.scale * (1 - torch.exp((coverage - target) / self.tau))).clamp_min(0)

    def _new_multipliers(self, prepared: torch.Tensor) -> torch.Tensor:
        coverage = _coverage(prepared)
        if not self.head_tail:
            return self._rule(coverage)
        mask = self.mask.to(coverage.device)
        groups = torch.stack([coverage[mask].mean(), coverage[~mask].mean()])
        return _spread(self._rule(groups), mask)


class CallableObjective(Objective):
    """Wraps a user's differentiable function of C (no multipliers, no derivative needed).

    The function receives the matrix normalised to a total of 1 and clipped at 1e-7.
    """

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], name: str = "") -> None:
        super().__init__()
        if not callable(function):
            raise TypeError(f"`function` must be callable, got {type(function).__name__}")
        self.function = function
        self.name = name or getattr(function, "__name__", "custom")

    def value(self, prepared: torch.Tensor) -> torch.Tensor:
        result = self.function(prepared)
        if not isinstance(result, torch.Tensor) or result.numel() != 1:
            raise TypeError(
                f"objective {self.name!r} must return a scalar tensor, got "
                f"{type(result).__name__} {getattr(result, 'shape', '')}"
            )
        return result.reshape(())


_REGISTRY: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Decorator that makes an objective factory available to :func:`get_objective`."""

    def decorator(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _coverage_factory(metric: str, head_tail: bool) -> Callable[..., Objective]:
    def factory(
        alpha: float = 0.95, scale: float = 100.0, tau: float = 0.01, head_classes: Any = None
    ) -> Objective:
        return CoverageConstrained(metric, head_tail, alpha, scale, tau, head_classes)

    return factory


register_objective("mean_recall")(MeanRecall)
register_objective("min_recall")(MinRecall)
register_objective("min_head_tail_recall")(MinHeadTailRecall)
register_objective("g_mean")(GMean)
register_objective("h_mean")(HMean)
register_objective("mean_recall_min_coverage")(_coverage_factory("mean_recall", False))
register_objective("mean_recall_min_head_tail_coverage")(_coverage_factory("mean_recall", True))
register_objective("h_mean_min_coverage")(_coverage_factory("h_mean", False))
register_objective("h_mean_min_head_tail_coverage")(_coverage_factory("h_mean", True))


def list_objectives() -> list[str]:
    """Names accepted by :func:`get_objective`."""
    return sorted(_REGISTRY)


def get_objective(name: str, **hyperparameters: Any) -> Objective:
    """Builds an objective by name.

    Args:
        name: one of :func:`list_objectives`.
        **hyperparameters: e.g. ``rate`` (w) for the min-recall objectives; ``alpha``,
            ``scale`` (L), ``tau`` for the coverage objectives; ``head_classes`` for the
            head/tail ones. Defaults follow docs/maths.md.

    Returns:
        A fresh :class:`Objective` (K is learnt from the first confusion matrix).
    """
    if name not in _REGISTRY:
        known = ", ".join(list_objectives())
        raise ValueError(f"unknown `objective` {name!r}; expected one of {known}")
    try:
        return _REGISTRY[name](**hyperparameters)
    except TypeError as error:
        if "unexpected keyword" in str(error):
            raise TypeError(f"objective {name!r}: {error}") from None
        raise


def as_objective(objective: str | Objective | Callable[[torch.Tensor], torch.Tensor]) -> Objective:
    """Accepts a name, an :class:`Objective` or any differentiable callable of C."""
    if isinstance(objective, str):
        return get_objective(objective)
    if isinstance(objective, Objective):
        return objective
    if callable(objective):
        return CallableObjective(objective)
    raise TypeError(
        "`objective` must be a name, an Objective or a callable of the confusion matrix, "
        f"got {type(objective).__name__}"
    )
