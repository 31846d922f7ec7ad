"""Metrics of a K x K confusion matrix (docs/maths.md section 1), as pure functions.

``C[y, p]`` is the share of samples with label ``y`` predicted as ``p``; every function
accepts counts as well, because each metric is invariant to the matrix's total.
"""

from __future__ import annotations

from typing import Any

import torch

from selmix._validation import check_all_classes_present, check_confusion, check_int
from selmix.devices import to_host

__all__ = [
    "accuracy",
    "all_metrics",
    "confusion_counts",
    "confusion_matrix",
    "g_mean",
    "h_mean",
    "head_mask",
    "infer_head_classes",
    "mean_recall",
    "min_coverage",
    "min_head_tail_coverage",
    "min_head_tail_recall",
    "min_recall",
    "per_class_coverage",
    "per_class_recall",
    "MetricTracker",
]

HEAD_FRACTION = 0.9


def confusion_counts(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The one confusion-count update: LongTensor[K, K] of ``(label, prediction)`` pairs.

    No checks (the callers validate where the data enters); ``labels`` and ``preds`` are
    integer tensors on one device, and the counts stay there. :func:`confusion_matrix`,
    :class:`MetricTracker`, :func:`selmix.evaluate` and the sharded evaluation all count
    with it.
    """
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def confusion_matrix(
    labels: torch.Tensor,
    preds: torch.Tensor,
    num_classes: int,
    normalize: bool = True,
) -> torch.Tensor:
    """Confusion matrix from integer labels and predictions.

    Args:
        labels: Tensor[N] of true labels in [0, num_classes).
        preds: Tensor[N] of predicted labels in [0, num_classes).
        num_classes: K.
        normalize: divide by N so that the matrix sums to 1 (float64); otherwise counts
            (int64).

    Returns:
        Tensor[K, K], rows indexed by the true label, columns by the prediction.
    """
    check_int("num_classes", num_classes, minimum=2)
    labels = torch.as_tensor(labels)
    preds = torch.as_tensor(preds)
    if labels.shape != preds.shape or labels.dim() != 1:
        raise ValueError(
            "`labels` and `preds` must be 1-d and of one length, got shapes "
            f"{tuple(labels.shape)} and {tuple(preds.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("`labels` must not be empty")
    for name, values in (("labels", labels), ("preds", preds)):
        if values.is_floating_point():
            raise TypeError(f"`{name}` must hold integers, got dtype {values.dtype}")
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`{name}` must lie in [0, {num_classes}), got values in [{low}, {high}]"
            )
    counts = confusion_counts(labels, preds, num_classes)
    return counts.double() / labels.numel() if normalize else counts


def _checked(confusion: torch.Tensor) -> torch.Tensor:
    confusion = check_confusion(confusion)
    check_all_classes_present(confusion)
    return confusion


def per_class_recall(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of every class, ``C[y, y] / pi_y``. Returns Tensor[K]."""
    confusion = _checked(confusion)
    return confusion.diagonal() / confusion.sum(dim=1)


def per_class_coverage(confusion: torch.Tensor) -> torch.Tensor:
    """Share of predictions that go to each class, ``sum_y C[y, p]``. Returns Tensor[K]."""
    confusion = check_confusion(confusion)
    return confusion.sum(dim=0) / confusion.sum()


def mean_recall(confusion: torch.Tensor) -> torch.Tensor:
    """Balanced accuracy: the mean of the per-class recalls."""
    return per_class_recall(confusion).mean()


def min_recall(confusion: torch.Tensor) -> torch.Tensor:
    """Worst-case recall over classes."""
    return per_class_recall(confusion).min()


def g_mean(confusion: torch.Tensor) -> torch.Tensor:
    """Geometric mean of the per-class recalls (0 when any recall is 0)."""
    recall = per_class_recall(confusion)
    if (recall <= 0).any():
        return recall.new_zeros(())
    return recall.log().mean().exp()


def h_mean(confusion: torch.Tensor) -> torch.Tensor:
    """Harmonic mean of the per-class recalls (0 when any recall is 0)."""
    recall = per_class_recall(confusion)
    if (recall <= 0).any():
        return recall.new_zeros(())
    return recall.numel() / recall.reciprocal().sum()


def accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Share of correct predictions under the matrix's own class prior."""
    confusion = check_confusion(confusion)
    return confusion.diagonal().sum() / confusion.sum()


def head_mask(
    num_classes: int, head_classes: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """Boolean mask of the head classes.

    Args:
        num_classes: K.
        head_classes: indices of the head classes, or a boolean mask of length K. Default:
            the first 90% of class indices (classes sorted most frequent first, as in
            long-tailed benchmarks), with at least one head and one tail class.

    Returns:
        BoolTensor[K], True for head classes.
    """
    check_int("num_classes", num_classes, minimum=2)
    if head_classes is None:
        num_tail = max(1, int(round((1 - HEAD_FRACTION) * num_classes)))
        mask = torch.zeros(num_classes, dtype=torch.bool)
        mask[: num_classes - num_tail] = True
        return mask
    head_classes = torch.as_tensor(head_classes)
    if head_classes.dtype == torch.bool:
        if head_classes.shape != (num_classes,):
            raise ValueError(
                f"`head_classes` as a mask must have length {num_classes}, "
                f"got shape {tuple(head_classes.shape)}"
            )
        mask = head_classes.clone()
    else:
        indices = head_classes.long().flatten()
        if indices.numel() and (indices.min() < 0 or indices.max() >= num_classes):
            raise ValueError(
                f"`head_classes` must hold class indices in [0, {num_classes}), "
                f"got {indices.tolist()}"
            )
        mask = torch.zeros(num_classes, dtype=torch.bool)
        mask[indices] = True
    if mask.all() or not mask.any():
        raise ValueError(
            "`head_classes` must leave at least one head and one tail class, "
            f"got {int(mask.sum())} head classes of {num_classes}"
        )
    return mask


def infer_head_classes(labels: Any, num_classes: int) -> list[int]:
    """The head classes of a training set: its :data:`HEAD_FRACTION` most frequent classes.

    Ties go to the smaller class index, so data sorted most frequent first gives the
    default of :func:`head_mask`. The CLI and :func:`selmix.finetune` both resolve
    ``head_classes=None`` with this function.

    Args:
        labels: Tensor[N] (or sequence) of training labels in [0, K).
        num_classes: K (>= 2).

    Returns:
        The sorted indices of the head classes.
    """
    check_int("num_classes", num_classes, minimum=2)
    counts = torch.bincount(torch.as_tensor(labels).long().cpu(), minlength=num_classes)
    num_head = int(head_mask(num_classes).sum())
    order = torch.argsort(-counts, stable=True)
    return sorted(order[:num_head].tolist())


def _head_tail_means(values: torch.Tensor, head_classes: Any) -> torch.Tensor:
    mask = head_mask(values.numel(), head_classes).to(values.device)
    return torch.stack([values[mask].mean(), values[~mask].mean()])


def min_head_tail_recall(
    confusion: torch.Tensor, head_classes: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """The smaller of the head classes' and the tail classes' mean recall."""
    return _head_tail_means(per_class_recall(confusion), head_classes).min()


def min_coverage(confusion: torch.Tensor) -> torch.Tensor:
    """Smallest share of predictions any class receives (fair share is 1 / K)."""
    return per_class_coverage(confusion).min()


def min_head_tail_coverage(
    confusion: torch.Tensor, head_classes: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """The smaller of the head classes' and the tail classes' mean coverage."""
    return _head_tail_means(per_class_coverage(confusion), head_classes).min()


def all_metrics(
    confusion: torch.Tensor, head_classes: torch.Tensor | list[int] | None = None
) -> dict[str, Any]:
    """Every metric of docs/maths.md section 1, as plain Python numbers (fractions in [0, 1]).

    Args:
        confusion: Tensor[K, K] of counts or fractions.
        head_classes: see :func:`head_mask`.

    Returns:
        A dict with keys ``mean_recall``, ``min_recall``, ``g_mean``, ``h_mean``,
        ``min_head_tail_recall``, ``min_coverage``, ``min_head_tail_coverage``,
        ``accuracy`` (floats) and ``per_class_recall``, ``per_class_coverage`` (lists of K
        floats).
    """
    confusion = _checked(confusion)
    return {
        "mean_recall": float(mean_recall(confusion)),
        "min_recall": float(min_recall(confusion)),
        "g_mean": float(g_mean(confusion)),
        "h_mean": float(h_mean(confusion)),
        "min_head_tail_recall": float(min_head_tail_recall(confusion, head_classes)),
        "min_coverage": float(min_coverage(confusion)),
        "min_head_tail_coverage": float(min_head_tail_coverage(confusion, head_classes)),
        "accuracy": float(accuracy(confusion)),
        "per_class_recall": per_class_recall(confusion).tolist(),
        "per_class_coverage": per_class_coverage(confusion).tolist(),
    }


class MetricTracker:
    """Accumulates a confusion matrix over batches (the stateful wrapper, torchmetrics-style).

    Example:
        >>> tracker = MetricTracker(num_classes=10)
        >>> for logits, y in batches:
        ...     tracker.update(logits.argmax(1), y)
        >>> tracker.compute()["min_recall"]
    """

    def __init__(
        self, num_classes: int, head_classes: torch.Tensor | list[int] | None = None
    ) -> None:
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.head_classes = head_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch of predictions (Tensor[N]) and labels (Tensor[N])."""
        # confusion_matrix validates the batch, then counts with confusion_counts
        self.counts += confusion_matrix(
            to_host(labels), to_host(preds), self.num_classes, normalize=False
        )

    def reset(self) -> None:
        """Forgets every batch seen so far."""
        self.counts.zero_()

    @property
    def confusion(self) -> torch.Tensor:
        """The normalised confusion matrix of everything seen, Tensor[K, K] float64."""
        return self.counts.double() / self.counts.sum().clamp_min(1)

    def compute(self) -> dict[str, Any]:
        """:func:`all_metrics` of everything seen so far."""
        return all_metrics(self.confusion, self.head_classes)
