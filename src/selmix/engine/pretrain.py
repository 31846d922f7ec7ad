"""Supervised pre-training of the starting model.

Cross-entropy, logit-adjusted cross-entropy (Menon et al. 2020: add ``tau * log prior`` to
the logits during training) and input mixup (the MiSLAS stage-1 recipe the paper starts
from), with SGD, momentum, weight decay, linear warm-up and a cosine schedule
(:mod:`selmix.engine.optim`).

``precision`` runs the forward passes under autocast (:mod:`selmix.engine.precision`; bf16 ran a
ResNet-32 pre-training step 1.7-2.0x faster than float32 in CPU time on an AMD EPYC with
AVX-512-bf16, ``docs/results/finetune_speed_precision.md``, and 1.09x on an Intel Xeon with
it, issue 27). The default stays ``"fp32"``: ``"auto"`` is measured on the machine
(:mod:`selmix.engine.hardware`), so a seeded run would no longer give the same numbers on every
machine. ``channels_last`` defaults to ``"auto"`` (measured the same way; the layout changes
only the float rounding); the config of the result holds the resolved values. With
``checkpoint_path`` a run writes resumable checkpoints; ``pretrain(..., resume=path)``
continues one bit-identically on the same device, precision, layout and thread count.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selmix._config import Choice, ConfigMixin, Flag, Int, Optional, Real, Seed, setting
from selmix._progress import progress_bar, progress_setting
from selmix.devices import to_host
from selmix.engine.evaluate import DEVICE_HELP, as_batch_dataset, evaluate, resolve_device
from selmix.engine.hardware import resolve_for_run
from selmix.engine.memory import resolve_eval_batch_size
from selmix.engine.optim import sgd_cosine, sgd_step
from selmix.engine.precision import (
    autocast,
    channels_last_setting,
    configure_threads,
    grad_scaler,
    precision_setting,
    threads_setting,
    to_channels_last,
)
from selmix.models import split_model
from selmix.models.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_model,
)
from selmix.models.split import output_tensor

__all__ = ["LOSSES", "PretrainConfig", "PretrainResult", "logit_adjustment", "pretrain"]

LOSSES = ("ce", "logit_adjusted")
LR_SCHEDULES = ("cosine", "step")


@dataclass
class PretrainConfig(ConfigMixin):
    """Settings of supervised pre-training.

    Each field declares its help text, constraint and CLI flag (:mod:`selmix._config`);
    ``run`` marks the settings a resumed run must keep (the others do not change the
    trajectory on one device, thread count and precision). ``checkpoint_path``: if set, a
    checkpoint is written there (atomically) every ``checkpoint_every`` epochs and at the
    end; it is a model file (:func:`selmix.load_model` reads it) that also holds the
    training state, so ``pretrain(..., resume=checkpoint_path)`` continues the run.
    ``precision``: the forward passes (training and validation) run under autocast;
    weights, optimiser state and losses stay float32 (:mod:`selmix.engine.precision`).
    """

    settings_name = "pre-training"

    epochs: int = setting(30, help="passes over the training set", check=Int(1), run=True,
                          flag=True)  # fmt: skip
    batch_size: int = setting(128, help="images per step", check=Int(1), run=True, flag=True)
    lr: float = setting(0.1, help="peak learning rate (SGD)", check=Real(), run=True, flag=True)
    momentum: float = setting(0.9, help="SGD momentum", check=Real(high=1.0), run=True)
    weight_decay: float = setting(5e-4, help="SGD weight decay", check=Real(strict=False), run=True)
    loss: str = setting("ce", help="training loss", check=Choice(LOSSES), run=True, flag=True)
    la_tau: float = setting(
        1.0, help="logit-adjustment temperature (loss logit_adjusted)",
        check=Real(strict=False), run=True,
    )  # fmt: skip
    mixup_alpha: float = setting(
        0.0, help="input mixup Beta(alpha, alpha); 0 turns it off", check=Real(strict=False),
        run=True, flag=True, key="mixup", metavar="ALPHA",
    )  # fmt: skip
    augment: bool = setting(True, help="random crop and flip", check=Flag(), run=True)
    warmup_epochs: int = setting(
        0, help="linear warm-up epochs before the decay", check=Int(0), run=True
    )
    lr_schedule: str = setting(
        "cosine", check=Choice(LR_SCHEDULES), run=True,
        help="learning-rate decay after the warm-up: 'cosine' (per step, to 0 at the end) or "
        "'step' (x0.1 after 80% and x0.01 after 90% of the epochs, the 160 / 180 of 200 of "
        "LDAM-DRW's and MiSLAS's CIFAR recipes)",
    )  # fmt: skip
    seed: int = setting(
        0, help="seeds the shuffling, augmentation and mixup", check=Seed(), run=True,
        flag=True,
    )  # fmt: skip
    device: str = setting(
        "cpu", help=f"where to run: {DEVICE_HELP}", cli_default="auto", flag=True,
        metavar="DEVICE",
    )  # fmt: skip
    eval_batch_size: int | None = setting(
        None, check=Optional(Int(1)), metavar="N",
        help="batch size of the per-epoch validation; unset: sized from the input size, the "
        "model's activations and the memory available (selmix.engine.memory; at most 512)",
    )  # fmt: skip
    progress: bool = progress_setting()
    checkpoint_path: str | None = setting(
        None, help="where resume checkpoints go (written atomically)", cli=False
    )
    checkpoint_every: int = setting(
        1, help="epochs between resume checkpoints", check=Int(1), metavar="EPOCHS"
    )
    precision: str = precision_setting(run=True, flag=True)
    threads: int | None = threads_setting(flag=True)
    channels_last: bool | str = channels_last_setting(run=True, flag=True)

    def __post_init__(self) -> None:
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"`warmup_epochs` must be <= `epochs` = {self.epochs}, got {self.warmup_epochs}"
            )


@dataclass
class PretrainResult:
    """The trained model and one record per epoch (loss, validation metrics)."""

    model: nn.Module
    config: PretrainConfig
    history: list[dict[str, Any]]
    #: what ``auto`` precision and layout resolved to (a
    #: :class:`selmix.engine.hardware.HardwareChoice`)
    hardware: dict[str, Any] = field(default_factory=dict)

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
    resume: str | Path | None = None,
    **overrides: Any,
) -> PretrainResult:
    """Trains ``model`` from its current weights on ``train``.

    Args:
        model: a classifier (trained in place).
        train: the labelled training set.
        val: optional validation set, evaluated after every epoch.
        config: a :class:`PretrainConfig` or a dict of its fields.
        callback: called with each epoch's record.
        resume: a checkpoint written by an earlier run with the same settings (its
            ``checkpoint_path``): the weights, optimiser, schedule, random states and
            history are restored and training continues after the checkpoint's epoch. On
            the same device, precision and thread count the result is bit-identical to an
            uninterrupted run. Settings that do not change the trajectory (``progress``,
            ``checkpoint_path``, ``checkpoint_every``, ``eval_batch_size``, ``threads``,
            ``device``) may differ.
        **overrides: any :class:`PretrainConfig` field.

    Returns:
        A :class:`PretrainResult`.
    """
    config = PretrainConfig.resolve(config, overrides)
    device = resolve_device(config.device)
    configure_threads(config.threads)
    model.to(device)
    train = as_batch_dataset(train, "train")
    # "auto" precision and layout are measured (selmix.engine.hardware) and recorded resolved
    hardware = resolve_for_run(
        model, train, device, config.precision, config.channels_last,
        batch_size=config.batch_size,
    )  # fmt: skip
    config = config.replace(precision=hardware.precision, channels_last=hardware.channels_last)
    precision = hardware.precision
    if config.channels_last:
        to_channels_last(model)
    # fails early, in one line naming the setting, when a batch cannot fit in the memory
    config = config.replace(
        eval_batch_size=resolve_eval_batch_size(
            model, train, device, precision, config.eval_batch_size, config.batch_size
        )
    )
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
    steps_per_epoch = math.ceil(labels.numel() / config.batch_size)
    optimizer, scheduler = _optimizer(model, config, steps_per_epoch)
    scaler = grad_scaler(precision, device)
    history: list[dict[str, Any]] = []
    first_epoch = 0
    if resume is not None:
        first_epoch = _restore(
            resume, config, model, optimizer, scheduler, scaler, generator, mixup_rng, history
        )
        if config.channels_last:
            to_channels_last(model)

    def save(epoch: int) -> None:
        if config.checkpoint_path is None:  # called only with a checkpoint path
            return
        state = {
            "epoch": epoch,
            "config": config.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": capture_rng_state(generator),
            # the numpy state as a string: its 128-bit integers are not tensors
            "mixup_rng": repr(mixup_rng.bit_generator.state),
            "history": history,
        }
        _save_training_checkpoint(config.checkpoint_path, model, epoch, state)

    bar = progress_bar(
        range(first_epoch, config.epochs), "pretrain", config.progress, leave=False,
        initial=first_epoch, total=config.epochs,
    )  # fmt: skip
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
            with autocast(precision, device):
                # Hugging Face models return an output object holding the logits
                logits = output_tensor(model(images))
            # the loss in float32 whatever the precision of the forward pass
            logits = logits.float()
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
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * index.numel()
            seen += index.numel()
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / seen, "val": None}
        if val is not None:
            # evaluate() enters inference mode itself, around its forward passes only: a
            # model it moves must not be moved inside inference mode (its parameters would
            # become inference tensors that the next training step cannot use)
            record["val"] = evaluate(
                model, val, device, config.eval_batch_size, precision=precision
            ).metrics()
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", val_mr=f"{record['val']['mean_recall']:.3f}"
            )
        else:
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        history.append(record)
        if callback is not None:
            callback(record)
        done = epoch + 1
        if config.checkpoint_path and (
            done % config.checkpoint_every == 0 or done == config.epochs
        ):
            save(done)
    bar.close()
    model.eval()
    return PretrainResult(model, config, history, hardware.to_dict())


def step_milestones(epochs: int, warmup_epochs: int = 0) -> list[int]:
    """The epochs after which ``lr_schedule="step"`` cuts the rate: 80% and 90% of ``epochs``.

    Rounded, at least one epoch after the warm-up and apart; 200 epochs give [160, 180] as in
    the LDAM-DRW and MiSLAS CIFAR recipes. Fewer than 3 epochs after the warm-up leave the
    cuts that do not fit out.
    """
    milestones: list[int] = []
    for fraction in (0.8, 0.9):
        epoch = max(int(round(fraction * epochs)), warmup_epochs + 1)
        if milestones:
            epoch = max(epoch, milestones[-1] + 1)
        if epoch < epochs:
            milestones.append(epoch)
    return milestones


def _optimizer(
    model: nn.Module, config: PretrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    nesterov = config.momentum > 0
    warmup = config.warmup_epochs * steps_per_epoch
    if config.lr_schedule == "step":
        milestones = [
            e * steps_per_epoch for e in step_milestones(config.epochs, config.warmup_epochs)
        ]
        return sgd_step(
            model.parameters(), config.lr, milestones, warmup, config.momentum,
            config.weight_decay, nesterov=nesterov,
        )  # fmt: skip
    return sgd_cosine(
        model.parameters(), config.lr, config.epochs * steps_per_epoch, warmup,
        config.momentum, config.weight_decay, nesterov=nesterov,
    )  # fmt: skip


# settings that may change between a run and its resumption: they do not change the
# trajectory (on one device, thread count and precision the run is bit-identical); the
# others are declared with run=True
_RESUME_FREE = set(PretrainConfig.__dataclass_fields__) - set(PretrainConfig.run_fields())


def _save_training_checkpoint(
    path: str | Path, model: nn.Module, epoch: int, state: dict[str, Any]
) -> None:
    """A :func:`selmix.save_model` file with the training state under ``"pretrain_state"``."""
    spec = getattr(model, "selmix_spec", None)
    save_checkpoint(
        path,
        {
            "format": "selmix-model-v1",
            "spec": dict(spec) if spec else None,
            # contiguous copies: a channels-last model saves and reloads in either layout
            "state_dict": {k: v.contiguous() for k, v in to_host(model.state_dict()).items()},
            "meta": {"pretrain_config": state["config"], "epoch": epoch},
            "pretrain_state": state,
        },
    )


def _restore(
    path: str | Path,
    config: PretrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    mixup_rng: np.random.Generator,
    history: list[dict[str, Any]],
) -> int:
    """Loads a pre-training checkpoint into the run's objects; returns its epoch."""

    checkpoint = load_checkpoint(path)
    state = checkpoint.get("pretrain_state")
    if checkpoint.get("format") != "selmix-model-v1" or not isinstance(state, dict):
        raise ValueError(f"`resume` {str(path)!r} is not a selmix pre-training checkpoint")
    saved, current = state["config"], config.to_dict()
    fields = PretrainConfig.__dataclass_fields__
    # a setting added after the checkpoint was written counts as its default there
    differ = sorted(
        key
        for key in current
        if key not in _RESUME_FREE and saved.get(key, fields[key].default) != current[key]
    )
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differ)
        raise ValueError(
            f"`resume` {str(path)!r} was written with other settings ({changes}); "
            "resume with the settings of the interrupted run"
        )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"`resume` {str(path)!r} does not match the model: {str(error).splitlines()[0]}"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"], generator)
    mixup_rng.bit_generator.state = ast.literal_eval(state["mixup_rng"])
    history.extend(state["history"])
    return int(state["epoch"])


def _num_outputs(model: nn.Module, train: Any) -> int:

    try:
        return split_model(model).head.out_features
    except TypeError:
        declared = getattr(train, "num_classes", None)
        if declared is None:
            raise
        return int(declared)
