"""Fine-tuning with the logit-adjusted cross-entropy under SelMix fine-tuning's optimiser,
i.e. SelMix's fine-tuning without the mixup (:func:`logit_adjusted_finetune`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selmix._progress import progress_bar
from selmix._validation import (
    as_generator,
    check_bool,
    check_in_range,
    check_int,
    check_positive,
)
from selmix.baselines._common import (
    _DEFAULTS,
    _check_finite,
    _copy_for_training,
    _frozen_training_features,
    _sgd_step,
)
from selmix.engine.optim import split_sgd_cosine as sgd_cosine
from selmix.engine.precision import (
    autocast,
    grad_scaler,
)
from selmix.engine.pretrain import logit_adjustment


def logit_adjusted_finetune(
    model: nn.Module,
    train: Any,
    *,
    steps: int = _DEFAULTS.steps,
    batch_size: int = _DEFAULTS.batch_size,
    lr_head: float = _DEFAULTS.lr_head,
    lr_backbone: float | None = None,
    frozen_backbone: bool = False,
    tau: float = 1.0,
    momentum: float = _DEFAULTS.momentum,
    weight_decay: float = _DEFAULTS.weight_decay,
    augment: bool = _DEFAULTS.augment,
    seed: int | torch.Generator = 0,
    device: str | torch.device = "cpu",
    eval_batch_size: int = 512,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    progress: bool = False,
    precision: str = "fp32",
    channels_last: bool = False,
) -> nn.Module:
    """Fine-tunes a copy of ``model`` with the logit-adjusted cross-entropy.

    The loss is ``CE(f(x) + tau * log(prior), y)`` with the training prior (the loss of
    :func:`selmix.pretrain` with ``loss="logit_adjusted"``, from
    :func:`selmix.engine.pretrain.logit_adjustment`); batches are drawn uniformly from the
    training samples with replacement (instance-balanced). Everything else is SelMix
    fine-tuning's: batch norm frozen (the model stays in eval mode), SGD with momentum and
    weight decay over a head group and a backbone group, a cosine decay to 0 over
    ``steps``; the defaults are :class:`selmix.FinetuneConfig`'s. With
    ``frozen_backbone`` the head trains on training features computed once.

    Args:
        model: the trained classifier (not modified).
        train: the labelled training set; every class must be present.
        steps: SGD steps.
        batch_size: samples per step.
        lr_head: learning rate of the head.
        lr_backbone: learning rate of the feature extractor; None means ``lr_head / 10``.
        frozen_backbone: train the head only, on cached features.
        tau: the logit-adjustment temperature (0 is plain cross-entropy).
        momentum, weight_decay: SGD settings.
        augment: random crop and flip of the images (full-backbone mode only).
        seed: an int or a CPU ``torch.Generator`` for the sampling and augmentation.
        device: where to compute; the returned model is left there.
        eval_batch_size: batch size of the feature extraction (frozen backbone).
        features, head: an explicit split of ``model``.
        progress: show a progress bar (:func:`selmix._progress.progress_bar`).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA, with loss scaling) or
            ``"auto"``: the autocast of the backbone's forward passes; the loss (of
            float32 logits), weights and optimiser state stay float32.
        channels_last: convert the copied model to the channels-last layout.

    Returns:
        The fine-tuned copy, in eval mode.
    """
    check_int("steps", steps, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_positive("lr_head", lr_head)
    if lr_backbone is not None:
        check_positive("lr_backbone", lr_backbone, strict=False)
    check_positive("tau", tau, strict=False)
    check_in_range("momentum", momentum, 0.0, 1.0)
    check_positive("weight_decay", weight_decay, strict=False)
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    for name, flag in (("frozen_backbone", frozen_backbone), ("augment", augment)):
        check_bool(name, flag)
    generator = as_generator(seed)
    tuned, split, train, labels, device, precision = _copy_for_training(
        model, train, features, head, device, precision, channels_last
    )
    scaler = grad_scaler(precision, device)
    num_classes = split.head.out_features
    adjustment = logit_adjustment(labels, num_classes, tau).to(device)
    backbone_lr = lr_head / 10 if lr_backbone is None else lr_backbone
    optimizer, scheduler = sgd_cosine(
        split, steps, lr_head, None if frozen_backbone else backbone_lr, momentum, weight_decay
    )
    cached = None
    if frozen_backbone:
        _, cached = _frozen_training_features(split, train, device, eval_batch_size, precision)
    device_labels = labels.to(device)
    rates = "`lr_head`" if frozen_backbone else "`lr_head` / `lr_backbone`"
    bar = progress_bar(steps, "la_finetune", check_bool("progress", progress), leave=False)
    for step in range(steps):
        index = torch.randint(labels.numel(), (batch_size,), generator=generator)
        on_device = index.to(device)
        if cached is not None:
            logits = split.head(cached[on_device])
        else:
            images, _ = train.batch(index, augment=augment, generator=generator, device=device)
            with autocast(precision, device):
                logits = split.head(split.features(images))
        # the loss in float32 whatever the precision of the forward pass
        loss = F.cross_entropy(logits.float() + adjustment, device_labels[on_device])
        _check_finite(loss, f"at step {step} of logit-adjusted fine-tuning", rates)
        _sgd_step(loss, optimizer, scheduler, scaler)
        bar.update(1)
    bar.close()
    tuned.eval()
    return tuned
