"""MiSLAS stage 2 (Zhong et al. 2021) on a frozen backbone: cRT that fine-tunes the
model's own head with label-aware smoothing (:func:`mislas_stage2`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from selmix.baselines._common import LabelSmoothing
from selmix.baselines.crt import classifier_retraining


def mislas_stage2(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    label_smoothing: LabelSmoothing = (0.3, 0.0),
    reinit_head: bool = False,
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
) -> nn.Module:
    """MiSLAS stage 2 (Zhong et al. 2021) on a frozen backbone: head re-training with
    label-aware smoothing.

    :func:`classifier_retraining` with MiSLAS's CIFAR-10-LT (imbalance 100) stage-2
    values as defaults: label-aware smoothing from 0.3 on the most frequent class to 0 on
    the rarest (linear in the class count), the model's own head fine-tuned rather than
    re-initialised, 10 epochs of class-balanced batches, SGD with momentum and a cosine
    decay.

    Left out of MiSLAS's stage 2: the shift learning of batch norm (MiSLAS updates the
    batch-norm statistics and affine shifts of the backbone; here the backbone, batch norm
    included, stays frozen and the head trains on features computed once), the concave
    shape of the smoothing (MiSLAS's default; this is its linear variant), and its weight
    decay of 2e-4 (cRT's 5e-4 here). MiSLAS's stage 1 (mixup pre-training) is the user's
    pre-training of ``model``.

    Args:
        model: the trained classifier (not modified).
        train: the labelled training set; every class must be present (its class counts
            set the smoothing of each class).
        val: optional validation set, as for :func:`classifier_retraining`.
        label_smoothing: ``(eps_head, eps_tail)`` of label-aware smoothing, or one float
            eps for every class (see :func:`label_aware_smoothing`).
        reinit_head: re-initialise the head first (cRT's choice; MiSLAS keeps it).
        epochs, lr, batch_size, momentum, weight_decay, seed, device, eval_batch_size,
            features, head, callback, progress, precision, channels_last: as for
            :func:`classifier_retraining`.

    Returns:
        A new model: the copied backbone with the re-trained head, in eval mode.
    """
    return classifier_retraining(
        model, train, val, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
        weight_decay=weight_decay, seed=seed, device=device, eval_batch_size=eval_batch_size,
        features=features, head=head, callback=callback, progress=progress,
        precision=precision, channels_last=channels_last, label_smoothing=label_smoothing,
        reinit_head=reinit_head,
    )  # fmt: skip
