"""Semi-supervised pre-training: FixMatch and FixMatch(LA), and pseudo-label reports.

FixMatch (Sohn et al., 2020) trains on a labelled batch of B images and an unlabelled
batch of mu * B images per step. Each unlabelled image is seen twice: a weak view (the
data set's random crop and flip) and a strong view (crop and flip, then torchvision's
RandAugment, then Cutout). The weak view's prediction becomes a hard pseudo-label where the
model is confident, and the strong view is trained towards it:

    loss = CE(z(x_weak) + a, y)                                         (labelled)
         + lambda_u * (1 / (mu B)) * sum_b m_b * CE(z(u_strong_b), yhat_b)  (unlabelled)
    q_b = softmax(z(u_weak_b)) (no gradient),  yhat_b = argmax q_b,  m_b = [max q_b >= 0.95]

with z the model's logits. FixMatch uses a = 0. FixMatch(LA) is the paper's pre-training
for SelMix (paper Sec. 5, "FixMatch, replacing the loss function with the logit adjusted
(LA) cross-entropy loss (Menon et al., 2020) for debiased pseudo-labels"), defined here as:

* the labelled term is the logit-adjusted cross-entropy, a = tau * log pi_l, with pi_l the
  class prior of the labelled set (docs/maths.md section 7's long tail; the same adjustment as
  :func:`selmix.engine.pretrain.logit_adjustment`);
* the pseudo-label is the logit-adjusted (debiased) prediction. Under the LA loss,
  z + a models the long-tailed training posterior, so the balanced posterior is
  softmax((z + a) - a) = softmax(z): the pseudo-label and the confidence mask use the
  raw logits z, never z + a (Menon et al., Sec. 4, post-hoc adjustment). With
  ``debias_pseudo_labels=False`` they use z + a instead (the biased, long-tailed
  prediction), for comparison;
* the unlabelled term is the plain cross-entropy on z (the pseudo-labels are already
  balanced-posterior labels). ``adjust_unlabelled_loss=True`` trains it with CE(z + a, yhat)
  instead, the "adaptive margin" of DebiasPL (Wang et al., 2022); on matched
  Fashion-MNIST-LT (one seed) it gave test mean / min recall 71.1 / 24.2 against 69.3 / 24.0.

Strong augmentation on the CPU: ``torchvision.transforms.v2.RandAugment`` applied to a
batch tensor draws one pair of operations for the whole batch. Per-image calls cost about
0.2 ms per 28x28 image on one CPU core: 23 ms for the 112 unlabelled images of a
B = 16, mu = 7 step, 14% of the small CNN's 0.16 s training step. So the batch is cut
into groups of ``randaugment_group`` images (default 8: 4.6 ms, 3%); each group draws its
own two operations, signs and magnitude. Batches are shuffled, so over an epoch every image
still meets independent draws; only images in the same group of the same step share
them. ``randaugment_group=1`` gives per-image operations. All draws come from the run's
seeded generator (torchvision's global-RNG draws are made inside a forked, seeded RNG), so a
run is reproducible and leaves the global RNG alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selmix._config import Choice, ConfigMixin, Flag, Int, Real, Seed, setting
from selmix._progress import progress_bar
from selmix._validation import check_in_range, check_int, check_labels, check_positive
from selmix.data.augment import normalize, random_crop_flip
from selmix.devices import to_host
from selmix.engine.evaluate import DEVICE_HELP, as_batch_dataset, evaluate, resolve_device
from selmix.engine.optim import sgd_cosine
from selmix.engine.precision import (
    autocast,
    channels_last_setting,
    configure_threads,
    grad_scaler,
    precision_setting,
    resolve_precision,
    threads_setting,
    to_channels_last,
)
from selmix.engine.pretrain import logit_adjustment
from selmix.engine.views import predict_logits
from selmix.models import split_model
from selmix.models.checkpoint import save_model

__all__ = [
    "FixMatchConfig",
    "FixMatchLoss",
    "FixMatchResult",
    "cutout",
    "fixmatch_loss",
    "fixmatch_pretrain",
    "predict_pseudo_labels",
    "pseudo_label_report",
    "pseudo_labels",
    "strong_augment",
]

FIXMATCH_LOSSES = ("ce", "logit_adjusted")


# ---------------------------------------------------------------------------------------
# The loss


class FixMatchLoss(NamedTuple):
    """The parts of one FixMatch loss evaluation.

    Attributes:
        total: scalar, ``labelled + lambda_u * unlabelled`` (differentiable).
        labelled: scalar, the (logit-adjusted) cross-entropy of the labelled batch.
        unlabelled: scalar, the masked cross-entropy of the strong views, averaged over all
            mu * B unlabelled images (masked ones count as zero).
        mask: BoolTensor[U], which unlabelled images passed the confidence threshold.
        pseudo_labels: LongTensor[U], argmax of the weak views' (debiased) prediction.
        confidence: Tensor[U], its probability.
    """

    total: Tensor
    labelled: Tensor
    unlabelled: Tensor
    mask: Tensor
    pseudo_labels: Tensor
    confidence: Tensor


def pseudo_labels(
    logits_weak: Tensor,
    threshold: float = 0.95,
    adjustment: Tensor | None = None,
    debias: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hard pseudo-labels and the confidence mask from the weak views' logits.

    Args:
        logits_weak: Tensor[U, K], the raw logits z of the weak views.
        threshold: keep a pseudo-label when its probability is >= ``threshold``.
        adjustment: Tensor[K], a = tau * log pi_l of a logit-adjusted model, or None.
        debias: with an adjustment, predict from z (the balanced posterior; True) or from
            z + a (the long-tailed training posterior; False). Ignored without one.

    Returns:
        ``(labels LongTensor[U], mask BoolTensor[U], confidence Tensor[U])``, no gradient.
    """
    check_in_range("threshold", threshold, 0.0, 1.0)
    if logits_weak.dim() != 2:
        raise ValueError(
            f"`logits_weak` must be Tensor[U, K], got shape {tuple(logits_weak.shape)}"
        )
    logits = logits_weak.detach().float()
    if adjustment is not None and not debias:
        logits = logits + _checked_adjustment(adjustment, logits.shape[1]).to(logits.device)
    confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
    return labels, confidence >= threshold, confidence


def fixmatch_loss(
    logits_labelled: Tensor,
    targets: Tensor,
    logits_weak: Tensor,
    logits_strong: Tensor,
    threshold: float = 0.95,
    lambda_u: float = 1.0,
    adjustment: Tensor | None = None,
    debias_pseudo_labels: bool = True,
    adjust_unlabelled_loss: bool = False,
) -> FixMatchLoss:
    """The FixMatch / FixMatch(LA) loss of one step (see the module docstring).

    Args:
        logits_labelled: Tensor[B, K], raw logits of the labelled (weak) views.
        targets: LongTensor[B], their labels.
        logits_weak: Tensor[U, K], raw logits of the unlabelled weak views (detached here).
        logits_strong: Tensor[U, K], raw logits of the same images' strong views.
        threshold: the confidence threshold (0.95 in FixMatch).
        lambda_u: the weight of the unlabelled term.
        adjustment: Tensor[K], a = tau * log pi_l for FixMatch(LA); None for FixMatch.
        debias_pseudo_labels: see :func:`pseudo_labels`.
        adjust_unlabelled_loss: with an adjustment, train the strong views with the
            logit-adjusted CE(z + a, yhat) too (DebiasPL's adaptive margin) instead of CE(z, yhat).

    Returns:
        A :class:`FixMatchLoss`.
    """
    check_positive("lambda_u", lambda_u, strict=False)
    if logits_labelled.dim() != 2 or targets.shape != logits_labelled.shape[:1]:
        raise ValueError(
            f"`logits_labelled` must be Tensor[B, K] and `targets` Tensor[B], got shapes "
            f"{tuple(logits_labelled.shape)} and {tuple(targets.shape)}"
        )
    if logits_weak.shape != logits_strong.shape or logits_weak.dim() != 2:
        raise ValueError(
            "`logits_weak` and `logits_strong` must both be Tensor[U, K], got shapes "
            f"{tuple(logits_weak.shape)} and {tuple(logits_strong.shape)}"
        )
    if logits_weak.shape[1] != logits_labelled.shape[1]:
        raise ValueError(
            f"labelled logits have K = {logits_labelled.shape[1]} columns but unlabelled "
            f"logits have {logits_weak.shape[1]}"
        )
    supervised_logits = logits_labelled
    if adjustment is not None:
        adjustment = _checked_adjustment(adjustment, logits_labelled.shape[1])
        supervised_logits = logits_labelled + adjustment.to(logits_labelled)
    labelled = F.cross_entropy(supervised_logits, targets.long())
    labels, mask, confidence = pseudo_labels(
        logits_weak, threshold, adjustment, debias_pseudo_labels
    )
    if logits_strong.shape[0]:
        strong = logits_strong
        if adjustment is not None and adjust_unlabelled_loss:
            strong = logits_strong + adjustment.to(logits_strong)
        per_sample = F.cross_entropy(strong, labels, reduction="none")
        unlabelled = (per_sample * mask.to(per_sample.dtype)).mean()
    else:
        unlabelled = logits_strong.sum() * 0.0
    total = labelled + lambda_u * unlabelled
    return FixMatchLoss(total, labelled, unlabelled, mask, labels, confidence)


def _checked_adjustment(adjustment: Tensor, num_classes: int) -> Tensor:
    adjustment = torch.as_tensor(adjustment)
    if adjustment.shape != (num_classes,):
        raise ValueError(
            f"`adjustment` must be Tensor[K] with K = {num_classes}, got shape "
            f"{tuple(adjustment.shape)}"
        )
    if not torch.isfinite(adjustment).all():
        raise ValueError("`adjustment` must be finite (every class needs a labelled sample)")
    return adjustment.float()


# ---------------------------------------------------------------------------------------
# Strong augmentation


def cutout(
    images: Tensor,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
    fill: int = 127,
) -> Tensor:
    """Paints one square of side ``fraction * min(H, W)`` per image with ``fill`` (batched).

    The square's centre is uniform over the image, so it may be partly outside (as in
    FixMatch's ``CutoutAbs``).

    Args:
        images: Tensor[B, C, H, W] (uint8 or float in [0, 255]).
        fraction: side of the square relative to the image (0 disables).
        generator: CPU generator for the positions.
        fill: the painted value.

    Returns:
        A new Tensor[B, C, H, W] of the same dtype and device.
    """
    if images.dim() != 4:
        raise ValueError(f"`images` must be Tensor[B, C, H, W], got shape {tuple(images.shape)}")
    check_in_range("fraction", fraction, 0.0, 1.0)
    batch, _, height, width = images.shape
    size = int(round(fraction * min(height, width)))
    if size == 0 or batch == 0:
        return images.clone()
    centre_y = torch.randint(0, height, (batch,), generator=generator)
    centre_x = torch.randint(0, width, (batch,), generator=generator)
    top = (centre_y - size // 2)[:, None]
    left = (centre_x - size // 2)[:, None]
    rows = torch.arange(height)[None, :]
    cols = torch.arange(width)[None, :]
    inside_rows = (rows >= top) & (rows < top + size)  # [B, H]
    inside_cols = (cols >= left) & (cols < left + size)  # [B, W]
    box = (inside_rows[:, :, None] & inside_cols[:, None, :]).to(images.device)  # [B, H, W]
    return images.masked_fill(box[:, None], fill)


def strong_augment(
    images: Tensor,
    generator: torch.Generator,
    *,
    padding: int = 4,
    flip: bool = True,
    num_ops: int = 2,
    max_magnitude: int = 20,
    group_size: int = 8,
    cutout_fraction: float = 0.5,
) -> Tensor:
    """FixMatch's strong view: crop and flip, RandAugment (per group), then Cutout.

    Args:
        images: uint8 Tensor[B, C, H, W] (C = 1 or 3).
        generator: CPU generator; every random draw comes from it.
        padding, flip: the crop/flip of the weak view.
        num_ops: RandAugment operations per image.
        max_magnitude: each group's magnitude is uniform in [1, max_magnitude] of
            torchvision's 31 bins (30 = the largest distortion).
        group_size: images that share one draw of operations (1 = per image); see the
            module docstring for the cost.
        cutout_fraction: side of the Cutout square relative to the image.

    Returns:
        uint8 Tensor[B, C, H, W] on the images' device.
    """
    from torchvision.transforms import v2

    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"`images` must be a uint8 Tensor[B, C, H, W], got {images.dtype} of shape "
            f"{tuple(images.shape)}"
        )
    check_int("group_size", group_size, minimum=1)
    check_int("num_ops", num_ops, minimum=0)
    check_int("max_magnitude", max_magnitude, minimum=1)
    if max_magnitude > 30:
        raise ValueError(f"`max_magnitude` must be <= 30, got {max_magnitude}")
    out = random_crop_flip(images, padding, flip, generator)
    batch = out.shape[0]
    if num_ops and batch:
        groups = range(0, batch, group_size)
        magnitudes = torch.randint(1, max_magnitude + 1, (len(groups),), generator=generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        augmenter = v2.RandAugment(num_ops=num_ops, num_magnitude_bins=31)
        parts = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for number, start in enumerate(groups):
                augmenter.magnitude = int(magnitudes[number])
                parts.append(augmenter(out[start : start + group_size]))
        out = torch.cat(parts)
    return cutout(out, cutout_fraction, generator)


# ---------------------------------------------------------------------------------------
# Pre-training


@dataclass
class FixMatchConfig(ConfigMixin):
    """Settings of FixMatch / FixMatch(LA) pre-training.

    Each field declares its help text and constraint (:mod:`selmix._config`;
    :func:`selmix._config.settings_of` lists them); ``run`` marks what a run computes.
    ``mu * batch_size`` unlabelled images per step; FixMatch counts steps, not epochs.
    """

    settings_name = "FixMatch"

    steps: int = setting(2000, help="SGD steps", check=Int(1), run=True)
    batch_size: int = setting(32, help="labelled images per step, B", check=Int(1), run=True)
    mu: int = setting(7, help="unlabelled-to-labelled batch ratio", check=Int(0), run=True)
    threshold: float = setting(
        0.95, help="confidence threshold of the pseudo-labels", check=Real(high=1.0), run=True
    )
    lambda_u: float = setting(
        1.0, help="weight of the unlabelled term", check=Real(strict=False), run=True
    )
    loss: str = setting(
        "ce", help="ce (FixMatch) or logit_adjusted (FixMatch(LA))",
        check=Choice(FIXMATCH_LOSSES), run=True,
    )  # fmt: skip
    la_tau: float = setting(
        1.0, help="tau of the adjustment a = tau * log pi_l", check=Real(strict=False), run=True
    )
    debias_pseudo_labels: bool = setting(
        True, help="FixMatch(LA) pseudo-labels from z (true) or z + a (false)", check=Flag(),
        run=True,
    )  # fmt: skip
    adjust_unlabelled_loss: bool = setting(
        False, help="FixMatch(LA) trains the strong views with CE(z + a, yhat) (true) or "
        "CE(z, yhat) (false)", check=Flag(), run=True,
    )  # fmt: skip
    lr: float = setting(0.03, help="peak learning rate (SGD, Nesterov)", check=Real(), run=True)
    momentum: float = setting(0.9, help="SGD momentum", check=Real(high=1.0), run=True)
    weight_decay: float = setting(5e-4, help="SGD weight decay", check=Real(strict=False), run=True)
    warmup_steps: int = setting(
        0, help="linear warm-up steps before the cosine decay", check=Int(0), run=True
    )
    randaugment_ops: int = setting(
        2, help="RandAugment operations per image", check=Int(0), run=True
    )
    randaugment_max_magnitude: int = setting(
        20, help="largest RandAugment magnitude bin (of 31) drawn per group", check=Int(1),
        run=True,
    )  # fmt: skip
    randaugment_group: int = setting(
        8, help="images sharing one RandAugment draw (1 = per image)", check=Int(1), run=True
    )
    cutout: float = setting(
        0.5, help="side of the Cutout square relative to the image (0 disables)",
        check=Real(high=1.0), run=True,
    )  # fmt: skip
    eval_every: int = setting(
        200, help="steps between validation evaluations (and history records)", check=Int(1)
    )
    eval_batch_size: int = setting(512, help="batch size of evaluation", check=Int(1))
    seed: int = setting(0, help="seeds every draw of the run", check=Seed(), run=True)
    device: str = setting("cpu", help=f"where to run: {DEVICE_HELP}", metavar="DEVICE")
    progress: bool = setting(True, help="show a progress bar", check=Flag())
    checkpoint_path: str | None = setting(
        None, help="the model is saved there at every evaluation and at the end", cli=False
    )
    precision: str = precision_setting(run=True)
    threads: int | None = threads_setting()
    channels_last: bool = channels_last_setting(False, run=True)

    def __post_init__(self) -> None:
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"`warmup_steps` must be <= `steps` = {self.steps}, got {self.warmup_steps}"
            )
        if self.randaugment_max_magnitude > 30:
            raise ValueError(
                f"`randaugment_max_magnitude` must be <= 30, got {self.randaugment_max_magnitude}"
            )


@dataclass
class FixMatchResult:
    """What :func:`fixmatch_pretrain` returns.

    Attributes:
        model: the trained model (the object that was passed in), in eval mode.
        config: the resolved configuration.
        history: one record every ``eval_every`` steps: ``{"step", "loss",
            "labelled_loss", "unlabelled_loss", "mask_rate", "lr", "seconds", "val"}``
            (losses and mask rate averaged since the previous record; ``val`` is
            :func:`selmix.all_metrics` of the validation set or None).
    """

    model: nn.Module
    config: FixMatchConfig
    history: list[dict[str, Any]]

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Saves the model (rebuildable with :func:`selmix.load_model` for registry models)."""
        return save_model(
            path, self.model, {"fixmatch_config": self.config.to_dict(), **(meta or {})}
        )


class _IndexStream:
    """Endless batches of indices: a fresh seeded permutation each pass."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def take(self, count: int) -> Tensor:
        parts = []
        while count > 0:
            if self.position >= self.order.numel():
                self.order = torch.randperm(self.size, generator=self.generator)
                self.position = 0
            part = self.order[self.position : self.position + count]
            self.position += part.numel()
            count -= part.numel()
            parts.append(part)
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def fixmatch_pretrain(
    model: nn.Module,
    labelled: Any,
    unlabelled: Any,
    val: Any = None,
    config: FixMatchConfig | dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> FixMatchResult:
    """Trains ``model`` with FixMatch or FixMatch(LA) (``config.loss``), from its weights.

    Each step takes ``batch_size`` labelled images (weak view: the data set's crop and
    flip) and ``mu * batch_size`` unlabelled images (a weak and a strong view each), runs
    one forward pass over the concatenation in training mode, and takes an SGD step on
    :func:`fixmatch_loss`. The learning rate warms up linearly for ``warmup_steps`` and then
    follows a cosine decay to zero. The unlabelled set's true labels are never read.

    Args:
        model: a classifier (trained in place).
        labelled: the labelled set (``.labels``, ``.batch``, ``.images`` uint8; e.g.
            :class:`~selmix.data.ImageTensorDataset`).
        unlabelled: the unlabelled pool (:class:`UnlabelledDataset` or any object with
            uint8 ``.images`` and the crop/flip settings ``.padding``, ``.flip``, ``.mean``,
            ``.std``).
        val: optional validation set, evaluated every ``eval_every`` steps.
        config: a :class:`FixMatchConfig` or a dict of its fields.
        callback: called with each history record.
        **overrides: any :class:`FixMatchConfig` field.

    Returns:
        A :class:`FixMatchResult`.
    """
    config = FixMatchConfig.resolve(config, overrides)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    configure_threads(config.threads)
    labelled = as_batch_dataset(labelled, "labelled")
    _check_image_set("unlabelled", unlabelled)
    num_classes = _num_outputs(model)
    targets_all = check_labels("labelled", labelled.labels, num_classes)
    if config.mu > 0 and len(unlabelled) == 0:
        raise ValueError("`unlabelled` is empty; use mu=0 for labelled-only training")
    adjustment = None
    if config.loss == "logit_adjusted":
        present = torch.bincount(targets_all, minlength=num_classes)
        if (present == 0).any():
            missing = (present == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"`labelled` has no samples of class(es) {missing}: the logit adjustment "
                "log(prior) is undefined"
            )
        adjustment = logit_adjustment(targets_all, num_classes, config.la_tau).to(device)

    model.to(device)
    if config.channels_last:
        to_channels_last(model)
    generator = torch.Generator().manual_seed(config.seed)
    labelled_stream = _IndexStream(targets_all.numel(), generator)
    unlabelled_stream = _IndexStream(len(unlabelled), generator)
    optimizer, scheduler = sgd_cosine(
        model.parameters(), config.lr, config.steps, config.warmup_steps, config.momentum,
        config.weight_decay, nesterov=config.momentum > 0,
    )  # fmt: skip
    scaler = grad_scaler(precision, device)
    history: list[dict[str, Any]] = []
    sums = {"loss": 0.0, "labelled_loss": 0.0, "unlabelled_loss": 0.0, "mask_rate": 0.0}
    count = 0
    started = time.perf_counter()
    bar = progress_bar(range(config.steps), f"fixmatch({config.loss})",
                       disable=not config.progress, leave=False)  # fmt: skip
    for step in bar:
        model.train()
        index = labelled_stream.take(config.batch_size)
        images, targets = labelled.batch(index, augment=True, generator=generator, device=device)
        parts = [images]
        unlabelled_count = config.mu * config.batch_size
        if unlabelled_count:
            u_index = unlabelled_stream.take(unlabelled_count)
            weak, _ = unlabelled.batch(u_index, augment=True, generator=generator, device=device)
            # the strong augmentation runs on the host, from the run's CPU generator
            raw = to_host(unlabelled.images[u_index.to(unlabelled.images.device)])
            strong = strong_augment(
                raw, generator, padding=unlabelled.padding, flip=unlabelled.flip,
                num_ops=config.randaugment_ops,
                max_magnitude=config.randaugment_max_magnitude,
                group_size=config.randaugment_group, cutout_fraction=config.cutout,
            )  # fmt: skip
            parts += [weak, normalize(strong.to(device), unlabelled.mean, unlabelled.std)]
        with autocast(precision, device):
            logits = model(torch.cat(parts))
        # the loss, pseudo-labels and confidences in float32 whatever the forward precision
        logits = logits.float()
        b = images.shape[0]
        logits_l = logits[:b]
        logits_w, logits_s = logits[b:].chunk(2) if unlabelled_count else (logits[b:],) * 2
        result = fixmatch_loss(
            logits_l, targets.to(device).long(), logits_w, logits_s, config.threshold,
            config.lambda_u, adjustment, config.debias_pseudo_labels,
            config.adjust_unlabelled_loss,
        )  # fmt: skip
        loss_value = float(result.total.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite loss ({loss_value}) at step {step}: lower `lr`")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(result.total).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        sums["loss"] += loss_value
        sums["labelled_loss"] += float(result.labelled.detach())
        sums["unlabelled_loss"] += float(result.unlabelled.detach())
        sums["mask_rate"] += float(result.mask.float().mean()) if result.mask.numel() else 0.0
        count += 1
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            record: dict[str, Any] = {"step": step + 1}
            record.update({key: value / count for key, value in sums.items()})
            record["lr"] = optimizer.param_groups[0]["lr"]
            record["seconds"] = time.perf_counter() - started
            record["val"] = None
            if val is not None:
                # evaluate() enters inference mode around its forward passes itself (see
                # selmix.pretrain: a model moved inside inference mode cannot train on)
                evaluation = evaluate(
                    model, val, device, config.eval_batch_size, precision=precision
                )
                record["val"] = evaluation.metrics()
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", mask=f"{record['mask_rate']:.2f}",
                    val_min=f"{record['val']['min_recall']:.3f}",
                )  # fmt: skip
            history.append(record)
            sums = dict.fromkeys(sums, 0.0)
            count = 0
            if callback is not None:
                callback(record)
            if config.checkpoint_path:
                save_model(config.checkpoint_path, model, {"fixmatch_config": config.to_dict(),
                                                           "step": step + 1})  # fmt: skip
    bar.close()
    model.eval()
    return FixMatchResult(model, config, history)


def _check_image_set(name: str, dataset: Any) -> None:
    needed = ("images", "batch", "padding", "flip", "mean", "std")
    missing = [attribute for attribute in needed if not hasattr(dataset, attribute)]
    if missing:
        raise TypeError(
            f"`{name}` must be an UnlabelledDataset or ImageTensorDataset (uint8 images with "
            f"crop/flip settings); {type(dataset).__name__} lacks {missing}"
        )
    images = dataset.images
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"`{name}.images` must be a uint8 Tensor[N, C, H, W]")


def _num_outputs(model: nn.Module) -> int:

    return split_model(model).head.out_features


# ---------------------------------------------------------------------------------------
# Pseudo-labels for reporting


@torch.no_grad()
def predict_pseudo_labels(
    model: nn.Module,
    dataset: Any,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    adjustment: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The model's hard predictions on a (unlabelled) set, in eval mode, no augmentation.

    Args:
        model: the classifier.
        dataset: any set with ``.labels`` and ``.batch`` (labels are not read).
        device: where to run.
        batch_size: evaluation batch size.
        adjustment: optional Tensor[K] added to the logits before the argmax.

    Returns:
        ``(labels LongTensor[N], confidence Tensor[N])`` on the CPU.
    """

    logits = predict_logits(split_model(model), dataset, resolve_device(device), batch_size)
    if adjustment is not None:
        logits = logits + _checked_adjustment(adjustment, logits.shape[1]).to(logits.device)
    confidence, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    return to_host((labels, confidence))


def pseudo_label_report(
    model: nn.Module,
    unlabelled: Any,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    threshold: float = 0.95,
) -> dict[str, Any]:
    """Pseudo-label statistics of ``model`` on the unlabelled pool (reporting only).

    Returns:
        ``{"histogram": [K ints], "confident_rate": share with confidence >= threshold}``
        plus, when the pool has ``hidden_labels``: ``"accuracy"`` (all samples),
        ``"confident_accuracy"`` (the confident ones; None if there are none) and
        ``"per_class_recall"`` (per true class; None for a class absent from the pool).
    """
    labels, confidence = predict_pseudo_labels(model, unlabelled, device, batch_size)
    num_classes = _num_outputs(model)
    confident = confidence >= threshold
    report: dict[str, Any] = {
        "histogram": torch.bincount(labels, minlength=num_classes).tolist(),
        "confident_rate": float(confident.double().mean()) if labels.numel() else 0.0,
    }
    truth = getattr(unlabelled, "hidden_labels", None)
    if truth is not None and labels.numel():
        truth = torch.as_tensor(truth).long()
        correct = truth == labels
        report["accuracy"] = float(correct.double().mean())
        report["confident_accuracy"] = (
            float(correct[confident].double().mean()) if confident.any() else None
        )
        hits = torch.bincount(truth[correct], minlength=num_classes).double()
        sizes = torch.bincount(truth, minlength=num_classes).double()
        report["per_class_recall"] = [
            float(h / s) if s > 0 else None for h, s in zip(hits, sizes, strict=True)
        ]
    return report
