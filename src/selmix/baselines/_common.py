"""What the baselines share: the copied model and its split, the checked training set,
the training features of a frozen backbone, one optimiser step, the stop on a non-finite
loss and the head's re-initialisation."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from selmix._validation import check_bool, check_labels
from selmix.core.objectives import Objective
from selmix.engine.config import FinetuneConfig
from selmix.engine.evaluate import as_batch_dataset, resolve_device
from selmix.engine.precision import resolve_precision, to_channels_last
from selmix.engine.views import FrozenFeatures
from selmix.models import ModelSplit, split_model

ObjectiveLike = Objective | Callable[[torch.Tensor], torch.Tensor] | str
# one smoothing for every class, or (head, tail) of label-aware smoothing
LabelSmoothing = float | tuple[float, float]

_DEFAULTS = FinetuneConfig()


def _copied_split(
    model: nn.Module,
    features: nn.Module | None,
    head: nn.Linear | None,
    device: torch.device,
) -> tuple[nn.Module, ModelSplit]:
    """A deep copy of the model and its split, on ``device``, in eval mode."""
    split_model(model, features=features, head=head)  # errors name the caller's arguments
    model, features, head = copy.deepcopy((model, features, head))  # one memo: shared stays
    split = split_model(model, features=features, head=head)
    for module in (model, split.features, split.head):
        module.to(device)
        module.eval()
    return model, split


class _TrainingCopy(NamedTuple):
    """What :func:`_copy_for_training` gives a baseline that trains a copy of the model."""

    model: nn.Module
    split: ModelSplit
    train: Any
    labels: torch.Tensor
    device: torch.device
    precision: str


def _copy_for_training(
    model: nn.Module,
    train: Any,
    features: nn.Module | None,
    head: nn.Linear | None,
    device: str | torch.device,
    precision: str,
    channels_last: bool,
) -> _TrainingCopy:
    """The resolved device and precision, the copied model and split (:func:`_copied_split`,
    in the channels-last layout with ``channels_last``), the training set and its checked
    labels (every class present)."""
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    copied, split = _copied_split(model, features, head, device)
    train = as_batch_dataset(train, "train")
    labels = check_labels("train", train.labels, split.head.out_features, every_class=True)
    if check_bool("channels_last", channels_last):
        to_channels_last(copied)
    return _TrainingCopy(copied, split, train, labels, device, precision)


def _check_finite(loss: torch.Tensor, where: str, rates: str) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss ({value}) {where}: lower {rates}")
    return value


def _reset_linear(head: nn.Linear, generator: torch.Generator) -> None:
    """``nn.Linear``'s default initialisation, U(-1/sqrt(d), 1/sqrt(d)), from ``generator``."""
    bound = 1.0 / math.sqrt(head.in_features)
    with torch.no_grad():
        weight = (torch.rand(head.weight.shape, generator=generator) * 2 - 1) * bound
        head.weight.copy_(weight)
        if head.bias is not None:
            bias = (torch.rand(head.bias.shape, generator=generator) * 2 - 1) * bound
            head.bias.copy_(bias)


def _frozen_training_features(
    split: ModelSplit, train: Any, device: torch.device, batch_size: int, precision: str
) -> tuple[FrozenFeatures, torch.Tensor]:
    """The frozen backbone's view and the training features, computed once in eval mode
    without augmentation: what a head trains on in cRT, MiSLAS stage 2 and frozen
    logit-adjusted fine-tuning.

    Returns:
        ``(view, features)``: the view (it also evaluates the validation set) and float32
        Tensor[N, d] on ``device``.
    """
    view = FrozenFeatures(split, device, batch_size=batch_size, precision=precision)
    return view, view.features(train)


def _sgd_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any = None
) -> None:
    """One step of a baseline's training: backward, optimiser step (through the fp16 loss
    ``scaler`` when given) and schedule step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
