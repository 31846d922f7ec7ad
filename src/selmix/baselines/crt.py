"""Classifier re-training (cRT, Kang et al. 2020) on a frozen backbone, with class-balanced
sampling and optional label-aware smoothing (:func:`classifier_retraining`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selmix._progress import progress_bar
from selmix._validation import (
    as_generator,
    check_bool,
    check_choice,
    check_in_range,
    check_int,
    check_labels,
    check_positive,
)
from selmix.baselines._common import (
    LabelSmoothing,
    _check_finite,
    _copy_for_training,
    _frozen_training_features,
    _reset_linear,
    _sgd_step,
)
from selmix.core.sampler import ClassPools
from selmix.engine.evaluate import as_batch_dataset
from selmix.engine.optim import split_sgd_cosine as sgd_cosine


class ClassBalancedSampler:
    """Class-balanced sampling (Kang et al. 2020): a class uniformly at random among the
    classes that have samples, then one of its samples uniformly at random.

    Args:
        labels: Tensor[N] of labels in [0, K).
        num_classes: K.
        generator: CPU ``torch.Generator`` of every draw (or an int seed).
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> None:
        check_int("num_classes", num_classes, minimum=2)
        self.pools = ClassPools(labels, num_classes)
        self.classes = (self.pools.sizes > 0).nonzero().flatten()
        if self.classes.numel() == 0:
            raise ValueError("`labels` must hold at least one sample, got none")
        self.generator = as_generator(generator, "generator")

    def sample(self, num_samples: int) -> torch.Tensor:
        """Draws sample indices (with replacement). Returns LongTensor[num_samples]."""
        check_int("num_samples", num_samples, minimum=1)
        picks = torch.randint(self.classes.numel(), (num_samples,), generator=self.generator)
        return self.pools.draw(self.classes[picks], self.generator)


_SMOOTHING_ERROR = "`label_smoothing` must be a float in [0, 1) or a pair (head, tail) of them"


def _check_label_smoothing(value: Any) -> LabelSmoothing:
    """A float eps in [0, 1), or a pair ``(head, tail)`` of them (a tuple or a list)."""
    pair = isinstance(value, (tuple, list))
    items = list(value) if pair else [value]
    valid = not pair or len(items) == 2
    if valid:
        try:  # the number checks of every setting; one message for all that fails here
            items = [check_in_range("label_smoothing", eps, 0.0, 1.0) for eps in items]
        except (TypeError, ValueError):
            valid = False
        else:
            valid = all(eps < 1.0 for eps in items)
    if not valid:
        raise ValueError(f"{_SMOOTHING_ERROR}, got {value!r}")
    return (items[0], items[1]) if pair else items[0]


def label_aware_smoothing(counts: Any, label_smoothing: LabelSmoothing) -> torch.Tensor:
    """The smoothing eps of each class, from the training class counts.

    A float eps is every class's. A pair ``(eps_head, eps_tail)`` is label-aware smoothing
    (Zhong et al. 2021, MiSLAS's linear variant): class y gets
    ``eps_tail + (eps_head - eps_tail) * (n_y - n_min) / (n_max - n_min)``, so the most
    frequent class gets ``eps_head`` and the rarest ``eps_tail``; when every class has the
    same count, every class gets ``eps_head``.

    Args:
        counts: Tensor[K] or sequence of the K training class counts (>= 0).
        label_smoothing: a float in [0, 1) or a pair ``(eps_head, eps_tail)`` of them.

    Returns:
        float64 Tensor[K] on the CPU, every entry in [0, 1).

    Raises:
        ValueError: if ``label_smoothing`` is not a float in [0, 1) or a pair of them, or
            ``counts`` is not a vector of finite counts >= 0.
    """
    smoothing = _check_label_smoothing(label_smoothing)
    counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"`counts` must be a vector of class counts, got shape {tuple(counts.shape)}"
        )
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"`counts` must be finite and >= 0, got {counts.tolist()}")
    if not isinstance(smoothing, tuple):
        return torch.full_like(counts, smoothing)
    head, tail = smoothing
    low, high = counts.min(), counts.max()
    if high == low:
        return torch.full_like(counts, head)
    return tail + (head - tail) * (counts - low) / (high - low)


def smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_smoothing: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy with soft targets smoothed by the eps of each sample's class.

    The target of a sample of class y is ``(1 - eps_y) * onehot(y) + eps_y / K`` on every
    class, so its loss is ``(1 - eps_y) * -log p_y + eps_y * mean_k(-log p_k)``. With one
    eps for every class this is ``F.cross_entropy(logits, labels, label_smoothing=eps)``.

    Args:
        logits: Tensor[B, K].
        labels: LongTensor[B] of classes in [0, K).
        class_smoothing: Tensor[K], the eps of each class
            (:func:`label_aware_smoothing`).
        reduction: ``"mean"`` (the batch's mean, a scalar) or ``"none"`` (Tensor[B]).

    Returns:
        The loss, in the dtype of ``logits``.
    """
    check_choice("reduction", reduction, ["mean", "none"])
    log_probs = F.log_softmax(logits, dim=1)
    eps = class_smoothing.to(log_probs)[labels]
    nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    loss = (1 - eps) * nll + eps * uniform
    return loss.mean() if reduction == "mean" else loss


def classifier_retraining(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    epochs: int = 10,
    lr: float = 0.1,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int | torch.Generator = 0,
    device: str | torch.device = "cpu",
    eval_batch_size: int = 512,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    precision: str = "fp32",
    channels_last: bool = False,
    label_smoothing: LabelSmoothing = 0.0,
    reinit_head: bool = True,
) -> nn.Module:
    """Classifier re-training (cRT, Kang et al. 2020) on a frozen backbone.

    The training features are computed once in eval mode (no augmentation); the linear
    head is re-initialised (``nn.Linear``'s default, drawn from ``seed``) and trained on
    them with cross-entropy, class-balanced batches (:class:`ClassBalancedSampler`) and
    SGD with a cosine decay over ``epochs * ceil(N / batch_size)`` steps. The backbone is
    never updated.

    With ``label_smoothing`` the loss is :func:`smoothed_cross_entropy` with the eps of
    each class from :func:`label_aware_smoothing` and the training class counts; a pair
    ``(eps_head, eps_tail)`` is label-aware smoothing (MiSLAS, :func:`mislas_stage2`).
    With ``reinit_head=False`` the model's own head is the starting point.

    Args:
        model: the trained classifier (not modified).
        train: the labelled training set; every class must be present.
        val: optional validation set; if given, its metrics after each epoch go to
            ``callback`` (they do not change the training).
        epochs: passes of ``ceil(N / batch_size)`` class-balanced batches.
        lr, momentum, weight_decay: SGD settings of the head.
        batch_size: samples per step.
        seed: an int or a CPU ``torch.Generator`` for the initialisation and sampling.
        device: where to compute; the returned model is left there.
        eval_batch_size: batch size of the feature extraction.
        features, head: an explicit split of ``model``.
        callback: called after each epoch with ``{"epoch", "loss", "val"}`` (``val`` is
            :func:`selmix.all_metrics` of the validation set, or None).
        progress: show a progress bar (:func:`selmix._progress.progress_bar`).
        precision: the feature extraction's autocast (:mod:`selmix.engine.precision`); the head
            trains in float32 on float32 features.
        channels_last: convert the copied backbone to the channels-last layout.
        label_smoothing: 0 (plain cross-entropy, the default), a float eps in [0, 1) for
            every class, or a pair ``(eps_head, eps_tail)`` of label-aware smoothing.
        reinit_head: re-initialise the head before training (cRT); False fine-tunes the
            model's head (MiSLAS stage 2).

    Returns:
        A new model: the copied backbone with the re-trained head, in eval mode.

    Raises:
        ValueError: if ``label_smoothing`` is not a float in [0, 1) or a pair of them.
    """
    smoothing = _check_label_smoothing(label_smoothing)
    reinit_head = check_bool("reinit_head", reinit_head)
    check_int("epochs", epochs, minimum=1)
    check_positive("lr", lr)
    check_int("batch_size", batch_size, minimum=1)
    check_in_range("momentum", momentum, 0.0, 1.0)
    check_positive("weight_decay", weight_decay, strict=False)
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    generator = as_generator(seed)
    retrained, split, train, labels, device, precision = _copy_for_training(
        model, train, features, head, device, precision, channels_last
    )
    num_classes = split.head.out_features
    if val is not None:
        val = as_batch_dataset(val, "val")
        check_labels("val", val.labels, num_classes, every_class=True)
    view, train_features = _frozen_training_features(
        split, train, device, eval_batch_size, precision
    )
    device_labels = labels.to(device)
    class_smoothing = None  # a float 0: F.cross_entropy, as cRT always did
    if isinstance(smoothing, tuple) or smoothing > 0:
        counts = torch.bincount(labels, minlength=num_classes)
        class_smoothing = label_aware_smoothing(counts, smoothing).float().to(device)
    if reinit_head:
        _reset_linear(split.head, generator)
    steps_per_epoch = math.ceil(labels.numel() / batch_size)
    optimizer, scheduler = sgd_cosine(
        split, epochs * steps_per_epoch, lr, None, momentum, weight_decay
    )
    sampler = ClassBalancedSampler(labels, num_classes, generator)
    bar = progress_bar(range(epochs), "crt", check_bool("progress", progress), leave=False)
    for epoch in bar:
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            index = sampler.sample(batch_size).to(device)
            logits, targets = split.head(train_features[index]), device_labels[index]
            if class_smoothing is None:
                loss = F.cross_entropy(logits, targets)
            else:
                loss = smoothed_cross_entropy(logits, targets, class_smoothing)
            loss_sum += _check_finite(loss, f"at epoch {epoch}, step {step} of cRT", "`lr`")
            _sgd_step(loss, optimizer, scheduler)
        val_metrics = None if val is None else view.evaluate(val).metrics()
        record = {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "val": val_metrics}
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if callback is not None:
            callback(record)
    bar.close()
    retrained.eval()
    return retrained
