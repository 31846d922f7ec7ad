"""Post-hoc logit adjustment (Menon et al. 2020): predict with ``logits - tau * log(prior)``,
tau tuned on the validation set for the objective (:func:`posthoc_logit_adjustment`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selmix._validation import (
    check_int,
    check_labels,
    check_positive,
)
from selmix.baselines._common import ObjectiveLike, _copied_split
from selmix.core.metrics import all_metrics, confusion_matrix
from selmix.core.objectives import as_objective
from selmix.core.selection import ObjectiveScore, best_index, objective_score
from selmix.devices import to_host
from selmix.engine.evaluate import as_batch_dataset, resolve_device
from selmix.engine.precision import (
    resolve_precision,
)
from selmix.engine.views import FrozenFeatures

# The post-hoc tau grid: 0 (the model as it is) to 3 in steps of 0.25.
DEFAULT_TAUS: tuple[float, ...] = tuple(0.25 * i for i in range(13))


def class_log_prior(prior: Any, num_classes: int) -> torch.Tensor:
    """``log(prior)`` of K classes from counts, a prior or the labelled training set.

    Args:
        prior: Tensor[K] or sequence of K class counts or probabilities (normalised here),
            or a labelled data set (its labels are counted).
        num_classes: K.

    Returns:
        float64 Tensor[K] on the CPU.

    Raises:
        ValueError: if the length is not K, or an entry is negative, not finite or 0 (the
            log prior of a class with no training sample is -inf).
    """
    if isinstance(prior, (torch.Tensor, list, tuple)) or hasattr(prior, "__array__"):
        values = torch.as_tensor(prior, dtype=torch.float64).cpu()
        if values.dim() != 1 or values.numel() != num_classes:
            raise ValueError(
                f"`prior` must be a vector of one count or probability per class "
                f"({num_classes}), got shape {tuple(values.shape)}"
            )
        if not torch.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"`prior` must be finite and >= 0, got {values.tolist()}")
    else:
        dataset = as_batch_dataset(prior, "prior")
        labels = check_labels("prior", dataset.labels, num_classes)
        values = torch.bincount(labels, minlength=num_classes).double()
    empty = (values == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"`prior` is 0 for class(es) {empty}: their log prior is -inf; every class "
            "needs a positive prior (at least one training sample)"
        )
    return (values / values.sum()).log()


def _check_taus(taus: Any) -> list[float]:
    if taus is None:
        return list(DEFAULT_TAUS)
    if isinstance(taus, torch.Tensor):
        taus = taus.flatten().tolist()
    if isinstance(taus, (str, bytes)) or not isinstance(taus, Sequence):
        raise TypeError(f"`taus` must be a sequence of numbers, got {type(taus).__name__}")
    if len(taus) == 0:
        raise ValueError("`taus` must hold at least one value, got an empty sequence")
    # check_positive rejects inf and nan as well
    return [check_positive(f"taus[{i}]", tau, strict=False) for i, tau in enumerate(taus)]


@dataclass
class PosthocResult:
    """What :func:`posthoc_logit_adjustment` returns.

    Attributes:
        model: the adjusted copy of the model (head bias shifted by ``-tau * log_prior``).
        tau: the chosen tau.
        taus: the grid that was searched.
        scores: the validation :class:`ObjectiveScore` of each tau of the grid.
        val_metrics: :func:`selmix.all_metrics` of the validation set for each tau.
        log_prior: float64 Tensor[K], the log class prior that was used.
    """

    model: nn.Module
    tau: float
    taus: list[float]
    scores: list[ObjectiveScore]
    val_metrics: list[dict[str, Any]]
    log_prior: torch.Tensor


def posthoc_logit_adjustment(
    model: nn.Module,
    prior: Any,
    val: Any,
    objective: ObjectiveLike,
    taus: Sequence[float] | torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    precision: str = "fp32",
) -> PosthocResult:
    """Post-hoc logit adjustment (Menon et al. 2020) with tau tuned for ``objective``.

    The adjusted classifier predicts ``argmax_y f_y(x) - tau * log(prior_y)``. Validation
    logits are computed once; every tau of the grid is scored with :func:`objective_score`
    and the best one (the first on ties) is kept. The returned model is a deep copy whose
    head bias is shifted by ``-tau * log(prior)``, so it is an ordinary classifier that
    :func:`selmix.evaluate` and :func:`selmix.finetune` accept.

    Args:
        model: the trained classifier (not modified).
        prior: the training class counts or class prior, Tensor[K] or a sequence, or the
            training set itself (its labels are counted).
        val: the validation set; every class must be present.
        objective: name, :class:`~selmix.core.objectives.Objective` or callable of C that tau is
            tuned for (see :func:`objective_score` for the rule).
        taus: the grid of taus (>= 0); default :data:`DEFAULT_TAUS` (0 to 3 by 0.25).
        device: where to compute; the returned model is left there.
        batch_size: batch size of the feature extraction.
        features, head: an explicit split of ``model`` (see :func:`selmix.split_model`).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"``: the feature
            extraction's autocast (:mod:`selmix.engine.precision`); the logits are float32.

    Returns:
        A :class:`PosthocResult` with the adjusted model, the chosen tau and the
        validation score and metrics of every tau.
    """
    grid = _check_taus(taus)
    check_int("batch_size", batch_size, minimum=1)
    objective = as_objective(objective)
    device = resolve_device(device)
    adjusted, split = _copied_split(model, features, head, device)
    num_classes = split.head.out_features
    log_prior = class_log_prior(prior, num_classes)
    val = as_batch_dataset(val, "val")
    labels = check_labels("val", val.labels, num_classes, every_class=True)
    precision = resolve_precision(precision, device)
    view = FrozenFeatures(split, device, batch_size=batch_size, precision=precision)
    logits = to_host(view.logits(val)).double()
    head_classes = getattr(objective, "head_classes", None)
    scores, metrics = [], []
    for tau in grid:
        preds = (logits - tau * log_prior).argmax(dim=1)
        counts = confusion_matrix(labels, preds, num_classes, normalize=False)
        scores.append(objective_score(objective, counts))
        metrics.append(all_metrics(counts, head_classes))
    tau = grid[best_index(scores)]
    layer = split.head
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(layer.weight[:, 0]))
        layer.bias.sub_((tau * log_prior).to(layer.bias))
    return PosthocResult(adjusted, tau, grid, scores, metrics, log_prior)
