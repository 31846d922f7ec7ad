"""Evaluation: the confusion matrix and the class-mean features (prototypes) of a data set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selmix._validation import check_labels
from selmix.core.metrics import all_metrics, confusion_counts
from selmix.data import as_tensor_dataset
from selmix.devices import to_host
from selmix.engine.memory import resolve_eval_batch_size
from selmix.engine.precision import autocast, evaluation_mode
from selmix.models import split_model

__all__ = [
    "Evaluation",
    "as_batch_dataset",
    "evaluate",
    "class_sums",
    "extract_features",
    "prediction_sums",
    "resolve_device",
    "summarize",
]


DEVICE_HELP = "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a run uses.

    Args:
        device: ``"auto"`` (or None): CUDA when present, else CPU; ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` (the N-th GPU) or ``"mps"`` (Apple GPUs), or a ``torch.device``.

    Raises:
        ValueError: one line, for a value that names no device of these kinds, or a
            device this machine does not have (no CUDA, fewer than N + 1 GPUs, no MPS).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"`device` must be {DEVICE_HELP}, got {device!r}")
    if resolved.type == "cpu" and resolved.index not in (None, 0):
        raise ValueError(f"`device` must be {DEVICE_HELP}, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` {str(device)!r} was asked for but CUDA is not available")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"`device` {str(device)!r} was asked for but this machine has {count} CUDA "
                f"device(s) (cuda:0 to cuda:{count - 1})"
            )
    if resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"`device` {str(device)!r} was asked for but MPS (Apple GPU) is not available"
            )
    return resolved


def as_batch_dataset(dataset: Any, name: str = "dataset") -> Any:
    """Returns an object with ``.labels`` and ``.batch(indices, ...)`` for ``dataset``.

    selmix's own :class:`~selmix.data.ImageTensorDataset` already is one; any other
    ``(x, y)`` map-style dataset is wrapped.
    """
    if hasattr(dataset, "batch") and hasattr(dataset, "labels"):
        return dataset
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"`{name}` must be a map-style dataset of (x, y) pairs, got {type(dataset).__name__}"
        )

    return as_tensor_dataset(dataset)


@dataclass
class Evaluation:
    """Confusion counts and prototypes of a model on one data set.

    Attributes:
        counts: LongTensor[K, K], rows are true labels.
        prototypes: Tensor[K, d], the mean feature of each true class (zeros for a class
            with no sample).
        class_counts: LongTensor[K], samples per true class.
        soft_counts: float64 Tensor[K, K], row y the sum over the samples of true class y
            of their softmax probabilities (a confusion matrix of probabilities: no entry
            of a row with samples is exactly 0); None where the evaluation left them out
            (a frozen-features evaluation asked for ``soft=False``).
    """

    counts: torch.Tensor
    prototypes: torch.Tensor
    class_counts: torch.Tensor
    soft_counts: torch.Tensor | None

    @classmethod
    def from_sums(
        cls,
        sums: tuple[torch.Tensor, ...]
        | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    ) -> Evaluation:
        """The evaluation of the totals :func:`summarize` returns (summed over batches and,
        under ``torch.distributed``, over ranks); the soft counts may be None (a
        frozen-features evaluation without them). The sums may lie on any device (each
        on its own); the evaluation is on the CPU (:mod:`selmix.devices`)."""
        # the result boundary (selmix.devices): the totals leave the device together,
        # whichever device each sum was made on, and the class means are taken on the host
        counts, feature_sums, class_counts, soft_counts = to_host(tuple(sums))
        if counts is None or feature_sums is None or class_counts is None:
            raise ValueError("`sums` must hold the counts, feature sums and class counts")
        prototypes = feature_sums / class_counts.clamp_min(1)[:, None].double()
        return cls(counts, prototypes.float(), class_counts, soft_counts)

    @property
    def confusion(self) -> torch.Tensor:
        """The confusion matrix normalised to a total of 1 (float64)."""
        return self.counts.double() / self.counts.sum().clamp_min(1)

    def metrics(self, head_classes: Any = None) -> dict[str, Any]:
        """:func:`selmix.all_metrics` of the confusion matrix."""
        return all_metrics(self.confusion, head_classes)


@torch.no_grad()
def extract_features(
    features: nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int | None = None,
    indices: torch.Tensor | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Features of every sample (no augmentation; the caller sets eval mode).

    Args:
        features: the feature extractor.
        dataset: a selmix dataset or any map-style dataset of (x, y).
        device: where to compute.
        batch_size: images per forward pass (None: sized from the memory,
            :func:`selmix.engine.memory.resolve_eval_batch_size`).
        indices: LongTensor[n] of the samples to extract (default: all).
        precision: a resolved precision (:func:`selmix.engine.precision.resolve_precision`); the
            forward passes run under its autocast, the features are returned in float32.

    Returns:
        float32 Tensor[N, d] on ``device`` (ordinary tensors, usable by autograd later:
        this runs under ``no_grad``, not inference mode, so that a feature cache can feed
        a trained head).
    """
    dataset = as_batch_dataset(dataset)
    if indices is None:
        indices = torch.arange(len(dataset.labels))
    if batch_size is None:

        batch_size = resolve_eval_batch_size(features, dataset, device, precision)
    chunks = []
    for start in range(0, indices.numel(), batch_size):
        images, _ = dataset.batch(indices[start : start + batch_size], device=device)
        with autocast(precision, device):
            chunks.append(features(images).float())
    return torch.cat(chunks)


def class_sums(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feature sums float64 Tensor[K, d], class counts LongTensor[K])`` of a batch: the
    part of :func:`summarize` that depends on the features only, not on the head."""
    labels = labels.to(features.device).long()
    feature_sums = torch.zeros(
        num_classes, features.shape[1], device=features.device, dtype=torch.float64
    )
    feature_sums.index_add_(0, labels, features.double())
    return feature_sums, torch.bincount(labels, minlength=num_classes)


def prediction_sums(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, soft: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(counts LongTensor[K, K], soft counts float64 Tensor[K, K] or None)`` of a batch:
    the part of :func:`summarize` that depends on the head; ``soft=False`` leaves the soft
    counts (a softmax over every logit, the cost that grows fastest with K) out."""
    labels = labels.to(logits.device).long()
    counts = confusion_counts(labels, logits.argmax(dim=1), num_classes)
    if not soft:
        return counts, None
    soft_counts = torch.zeros(num_classes, num_classes, device=logits.device, dtype=torch.float64)
    soft_counts.index_add_(0, labels, torch.softmax(logits.double(), dim=1))
    return counts, soft_counts


def summarize(
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sums an :class:`Evaluation` is made of, for one batch (or a whole set).

    Args:
        features: Tensor[N, d].
        logits: Tensor[N, K], the head's output for ``features``.
        labels: Tensor[N] of true labels.
        num_classes: K.

    Returns:
        ``(counts LongTensor[K, K], feature sums float64 Tensor[K, d], class counts
        LongTensor[K], soft counts float64 Tensor[K, K])``, on the logits' device; sums
        of batches (or of ranks) add up to the sums of their union.
    """
    feature_sums, class_counts = class_sums(features, labels, num_classes)
    counts, soft_counts = prediction_sums(logits, labels, num_classes)
    assert soft_counts is not None  # soft=True
    return counts, feature_sums, class_counts.to(logits.device), soft_counts


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    reduce: Any = None,
    precision: str = "fp32",
) -> Evaluation:
    """Confusion counts and prototypes of ``model`` on ``dataset``, in eval mode.

    Args:
        model: the classifier (its split into features and head is found with
            :func:`selmix.split_model` unless ``features`` and ``head`` are given).
        dataset: a selmix dataset or any map-style dataset of (x, y).
        device: where to run.
        batch_size: evaluation batch size (None: sized from the model's activations and
            the memory, :func:`selmix.engine.memory.resolve_eval_batch_size`).
        features, head: an explicit split of ``model``.
        reduce: optional function applied in place to each summed tensor (used to
            all-reduce across processes).
        precision: a resolved precision; the forward passes run under
            :func:`selmix.engine.precision.evaluation_mode` (inference mode and autocast). The
            sums (counts, float64 feature sums, float64 soft counts) do not depend on it.

    Returns:
        An :class:`Evaluation` (tensors on the CPU).
    """

    device = resolve_device(device)
    split = split_model(model, features=features, head=head)
    dataset = as_batch_dataset(dataset)
    num_classes = split.head.out_features
    labels = check_labels("dataset", dataset.labels, num_classes)
    model.to(device)  # the model is evaluated (and left) on `device`
    if batch_size is None:

        batch_size = resolve_eval_batch_size(split.features, dataset, device, precision)
    was_training = model.training
    model.eval()
    try:
        totals: tuple[torch.Tensor, ...] | None = None
        for start in range(0, labels.numel(), batch_size):
            index = torch.arange(start, min(start + batch_size, labels.numel()))
            images, batch_labels = dataset.batch(index, device=device)
            with evaluation_mode(precision, device):
                feats = split.features(images)
                logits = split.head(feats)
            # the sums outside autocast and inference mode: ordinary float64 / int tensors
            parts = summarize(feats.float(), logits.float(), batch_labels, num_classes)
            totals = (
                parts
                if totals is None
                else tuple(a + b for a, b in zip(totals, parts, strict=True))
            )
    finally:
        model.train(was_training)
    if totals is None:
        raise ValueError("`dataset` is empty")
    if reduce is not None:
        for tensor in totals:
            reduce(tensor)
    return Evaluation.from_sums(totals)
