"""SGD with a cosine (or step) learning-rate schedule and an optional linear warm-up, by steps.

Shared by pre-training, FixMatch, SelMix fine-tuning and the baselines. The cosine schedule
multiplies each parameter group's base learning rate by

    (s + 1) / W                                          for s < W   (warm-up)
    0.5 * (1 + cos(pi * min(s - W, T - W) / (T - W)))    otherwise   (decay to 0 at s = T)

at step s (the number of ``scheduler.step()`` calls so far), for T total steps and W
warm-up steps. Without warm-up this is ``0.5 * (1 + cos(pi * min(s, T) / T))``, the
schedule fine-tuning has always used, computed with the same floating-point operations.

The step schedule (:class:`WarmupStep`, pre-training's ``lr_schedule="step"``) keeps the same
warm-up and then multiplies by ``gamma ** m`` after the m-th milestone: the schedule of
LDAM-DRW's and MiSLAS's CIFAR recipes (x0.1 at epoch 160, x0.01 at epoch 180 of 200).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from selmix._validation import check_in_range, check_int, check_positive

__all__ = [
    "WarmupCosine",
    "WarmupStep",
    "sgd",
    "sgd_cosine",
    "sgd_step",
    "split_sgd_cosine",
    "warmup_cosine",
]


class WarmupCosine:
    """The schedule's factor as a function of the step (a picklable ``LambdaLR`` lambda).

    Args:
        total_steps: T, the step at which the factor reaches 0 (>= 1).
        warmup_steps: W, linear warm-up steps (0 <= W <= T).
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0) -> None:
        self.total_steps = check_int("total_steps", total_steps, minimum=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        if warmup_steps > total_steps:
            raise ValueError(
                f"`warmup_steps` must be <= `total_steps` = {total_steps}, got {warmup_steps}"
            )

    def __call__(self, step: int) -> float:
        warmup, total = self.warmup_steps, self.total_steps
        if step < warmup:
            return (step + 1) / warmup
        if warmup == 0:
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        decay = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))


class WarmupStep:
    """Linear warm-up, then a constant rate cut by ``gamma`` at each milestone (picklable).

    Args:
        warmup_steps: W, linear warm-up steps (factor ``(s + 1) / W`` for s < W).
        milestones: steps at which the factor is multiplied by ``gamma``; increasing, each
            >= W.
        gamma: the cut, in (0, 1].
    """

    def __init__(
        self, warmup_steps: int = 0, milestones: Iterable[int] = (), gamma: float = 0.1
    ) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.milestones = [check_int("milestones", m, minimum=0) for m in milestones]
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"`milestones` must be increasing, got {self.milestones}")
        if self.milestones and self.milestones[0] < warmup_steps:
            raise ValueError(
                f"`milestones` must be >= `warmup_steps` = {warmup_steps}, got {self.milestones}"
            )
        self.gamma = check_positive("gamma", gamma)
        if self.gamma > 1:
            raise ValueError(f"`gamma` must be in (0, 1], got {gamma}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.gamma ** sum(step >= m for m in self.milestones)


def sgd(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.SGD:
    """``torch.optim.SGD`` with checked settings.

    Args:
        params: parameters, or parameter groups (dicts with ``"params"`` and optionally
            their own ``"lr"`` and a ``"name"``).
        lr: the default learning rate (of groups without their own).
        momentum, weight_decay: SGD settings.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
    """
    check_positive("lr", lr)
    check_in_range("momentum", momentum, 0.0, 1.0)
    check_positive("weight_decay", weight_decay, strict=False)
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay,
        nesterov=bool(nesterov) and momentum > 0,
    )  # fmt: skip


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule of ``optimizer``; call ``step()`` after every update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))


def sgd_cosine(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """:func:`sgd` and its :func:`warmup_cosine` schedule. Returns ``(optimizer, scheduler)``."""
    optimizer = sgd(params, lr, momentum, weight_decay, nesterov)
    return optimizer, warmup_cosine(optimizer, total_steps, warmup_steps)


def sgd_step(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    milestones: Iterable[int],
    warmup_steps: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    gamma: float = 0.1,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """:func:`sgd` and a :class:`WarmupStep` schedule. Returns ``(optimizer, scheduler)``."""
    optimizer = sgd(params, lr, momentum, weight_decay, nesterov)
    schedule = WarmupStep(warmup_steps, milestones, gamma)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def split_sgd_cosine(
    split: Any,
    steps: int,
    lr_head: float,
    lr_backbone: float | None,
    momentum: float,
    weight_decay: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over the head and (optionally) the backbone with a cosine decay to 0 over ``steps``.

    The optimiser of SelMix fine-tuning and of the baselines of :mod:`selmix.baselines`
    (bit-identical to the ``torch.optim.SGD`` + ``LambdaLR`` fine-tuning always used).

    Args:
        split: a :class:`selmix.models.ModelSplit` (``features``, ``head``).
        steps: the length of the schedule (the learning rates reach 0 at ``steps``).
        lr_head: learning rate of the head (parameter group ``"head"``).
        lr_backbone: learning rate of the trainable feature parameters (group
            ``"backbone"``); None trains the head only.
        momentum, weight_decay: SGD settings.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after every optimiser step.
    """
    head_params = list(split.head.parameters())
    head_ids = {id(p) for p in head_params}
    groups = [{"params": head_params, "lr": lr_head, "name": "head"}]
    if lr_backbone is not None:
        backbone = [
            p for p in split.features.parameters() if id(p) not in head_ids and p.requires_grad
        ]
        if backbone:
            groups.append({"params": backbone, "lr": lr_backbone, "name": "backbone"})
    # selmix.engine.optim's cosine without warm-up: the same floating-point operations as the
    # schedule fine-tuning always used, so runs are unchanged
    return sgd_cosine(groups, lr_head, steps, 0, momentum, weight_decay)
