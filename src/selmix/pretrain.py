"""Supervised pre-training of the starting model.

Cross-entropy, logit-adjusted cross-entropy (Menon et al. 2020: add ``tau * log prior`` to
the logits during training) and input mixup (the MiSLAS stage-1 recipe the paper starts
from), with SGD, momentum, weight decay, linear warm-up and a cosine schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selmix._config import ConfigMixin
from selmix._progress import progress_bar
from selmix._validation import check_choice, check_in_range, check_int, check_positive
from selmix.checkpoint import save_model
from selmix.evaluate import as_batch_dataset, evaluate, resolve_device
from selmix.models.split import output_tensor

__all__ = ["LOSSES", "PretrainConfig", "PretrainResult", "logit_adjustment", "pretrain"]

LOSSES = ("ce", "logit_adjusted")


@dataclass
class PretrainConfig(ConfigMixin):
    """Settings of supervised pre-training.

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step.
        lr: peak learning rate (SGD).
        momentum, weight_decay: SGD settings.
        loss: ``"ce"`` or ``"logit_adjusted"``.
        la_tau: the logit-adjustment temperature.
        mixup_alpha: input mixup with ``lam ~ Beta(alpha, alpha)``; 0 turns it off.
        augment: random crop and flip.
        warmup_epochs: linear warm-up before the cosine decay.
        seed: seeds the shuffling, augmentation and mixup.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        eval_batch_size: batch size for the per-epoch validation.
        progress: show a progress bar.
        checkpoint_path: if set, the model is saved there after every epoch.
    """

    settings_name = "pre-training"

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    loss: str = "ce"
    la_tau: float = 1.0
    mixup_alpha: float = 0.0
    augment: bool = True
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 512
    progress: bool = True
    checkpoint_path: str | None = None

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_positive("lr", self.lr)
        check_in_range("momentum", self.momentum, 0.0, 1.0)
        check_positive("weight_decay", self.weight_decay, strict=False)
        check_choice("loss", self.loss, LOSSES)
        check_positive("la_tau", self.la_tau, strict=False)
        check_positive("mixup_alpha", self.mixup_alpha, strict=False)
        check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        check_int("seed", self.seed)


@dataclass
class PretrainResult:
    """The trained model and one record per epoch (loss, validation metrics)."""

    model: nn.Module
    config: PretrainConfig
    history: list[dict[str, Any]]

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Saves the model (rebuildable with :func:`selmix.load_model`)."""
        return save_model(
            path, self.model, {"pretrain_config": self.config.to_dict(), **(meta or {})}
        )


def logit_adjustment(labels: torch.Tensor, num_classes: int, tau: float = 1.0) -> torch.Tensor:
    """``tau * log(prior)`` of the training labels, added to logits in the LA loss.

    Returns:
        Tensor[K].
    """
    counts = torch.bincount(torch.as_tensor(labels).long(), minlength=num_classes).double()
    prior = counts / counts.sum()
    return (tau * prior.clamp_min(1e-12).log()).float()


def pretrain(
    model: nn.Module,
    train: Any,
    val: Any = None,
    config: PretrainConfig | dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> PretrainResult:
    """Trains ``model`` from its current weights on ``train``.

    Args:
        model: a classifier (trained in place).
        train: the labelled training set.
        val: optional validation set, evaluated after every epoch.
        config: a :class:`PretrainConfig` or a dict of its fields.
        callback: called with each epoch's record.
        **overrides: any :class:`PretrainConfig` field.

    Returns:
        A :class:`PretrainResult`.
    """
    config = PretrainConfig.resolve(config, overrides)
    device = resolve_device(config.device)
    model.to(device)
    train = as_batch_dataset(train, "train")
    labels = torch.as_tensor(train.labels).long()
    num_classes = _num_outputs(model, train)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"`train` labels must lie in [0, {num_classes}), got labels in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    adjustment = None
    if config.loss == "logit_adjusted":
        adjustment = logit_adjustment(labels, num_classes, config.la_tau).to(device)

    generator = torch.Generator().manual_seed(config.seed)
    mixup_rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, nesterov=config.momentum > 0,
    )  # fmt: skip
    steps_per_epoch = math.ceil(labels.numel() / config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history: list[dict[str, Any]] = []
    bar = progress_bar(range(config.epochs), "pretrain", config.progress, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(labels.numel(), generator=generator)
        loss_sum, seen = 0.0, 0
        for start in range(0, order.numel(), config.batch_size):
            index = order[start : start + config.batch_size]
            images, targets = train.batch(
                index, augment=config.augment, generator=generator, device=device
            )
            targets = targets.to(device).long()
            if config.mixup_alpha > 0:
                lam = float(mixup_rng.beta(config.mixup_alpha, config.mixup_alpha))
                perm = torch.randperm(images.shape[0], generator=generator).to(device)
                images = lam * images + (1 - lam) * images[perm]
            # Hugging Face models return an output object holding the logits
            logits = output_tensor(model(images))
            if adjustment is not None:
                logits = logits + adjustment
            if config.mixup_alpha > 0:
                loss = lam * F.cross_entropy(logits, targets) + (1 - lam) * F.cross_entropy(
                    logits, targets[perm]
                )
            else:
                loss = F.cross_entropy(logits, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at epoch {epoch}, step {start // config.batch_size}: "
                    "lower `lr`"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * index.numel()
            seen += index.numel()
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / seen, "val": None}
        if val is not None:
            record["val"] = evaluate(model, val, device, config.eval_batch_size).metrics()
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", val_mr=f"{record['val']['mean_recall']:.3f}"
            )
        else:
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        history.append(record)
        if callback is not None:
            callback(record)
        if config.checkpoint_path:
            save_model(config.checkpoint_path, model, {"epoch": epoch + 1})
    model.eval()
    return PretrainResult(model, config, history)


def _num_outputs(model: nn.Module, train: Any) -> int:
    from selmix.models import split_model

    try:
        return split_model(model).head.out_features
    except TypeError:
        declared = getattr(train, "num_classes", None)
        if declared is None:
            raise
        return int(declared)
