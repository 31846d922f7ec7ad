"""The baselines SelMix is compared against, for any model :func:`selmix.split_model` splits.

* :func:`posthoc_logit_adjustment` (Menon et al. 2020): predict with
  ``logits - tau * log(prior)``, tau tuned on the validation set for the objective. The
  result is an ordinary classifier: the shift lives in its head's bias.
* :func:`classifier_retraining` (cRT, Kang et al. 2020): freeze the backbone, re-initialise
  the linear head and retrain it on features computed once, with class-balanced sampling;
  optionally with label-aware smoothing (:func:`label_aware_smoothing`).
* :func:`mislas_stage2`: MiSLAS's stage 2 (Zhong et al. 2021) on a frozen backbone: cRT that
  fine-tunes the model's own head with label-aware smoothing.
* :func:`logit_adjusted_finetune`: fine-tune with the logit-adjusted cross-entropy and
  instance-balanced sampling under SelMix fine-tuning's optimiser (SGD with momentum, weight
  decay, cosine decay, batch norm frozen), i.e. SelMix's fine-tuning without the mixup.

:func:`objective_score` (from :mod:`selmix.selection`, re-exported here) is the post-hoc
baseline's rule for tau, the same rule that picks fine-tuning's best step.
:func:`baseline` runs one by name with a :class:`BaselineConfig` (as :func:`selmix.finetune`
runs SelMix with a :class:`selmix.FinetuneConfig`); :func:`run_baseline` runs one by name
with its function's keyword arguments (:func:`list_baselines`; ``"start"`` is an unchanged
copy of the model).

Uniform and greedy mixup, and SelMix itself, are not in this registry: they are
:func:`selmix.finetune` with ``policy="uniform"``, ``"greedy"`` or ``"selmix"``.

Every function returns a new model and leaves the one it is given untouched.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selmix._config import (
    ClassIndices,
    ConfigMixin,
    Dict,
    Flag,
    Int,
    Optional,
    Real,
    Seed,
    setting,
    settings_of,
)
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
from selmix.evaluate import DEVICE_HELP, as_batch_dataset, resolve_device
from selmix.finetune import FinetuneConfig
from selmix.metrics import all_metrics, confusion_matrix
from selmix.models import ModelSplit, split_model
from selmix.objectives import Objective, as_objective
from selmix.optim import split_sgd_cosine as sgd_cosine
from selmix.precision import (
    autocast,
    channels_last_setting,
    configure_threads,
    grad_scaler,
    precision_setting,
    resolve_precision,
    threads_setting,
    to_channels_last,
)
from selmix.pretrain import logit_adjustment
from selmix.sampler import ClassPools
from selmix.selection import ObjectiveScore, best_index, objective_score
from selmix.views import FrozenFeatures

__all__ = [
    "BASELINES",
    "DEFAULT_TAUS",
    "BaselineConfig",
    "BaselineResult",
    "ClassBalancedSampler",
    "ObjectiveScore",
    "PosthocResult",
    "baseline",
    "best_index",
    "class_log_prior",
    "classifier_retraining",
    "label_aware_smoothing",
    "list_baselines",
    "logit_adjusted_finetune",
    "mislas_stage2",
    "objective_score",
    "posthoc_logit_adjustment",
    "run_baseline",
    "smoothed_cross_entropy",
]

ObjectiveLike = Objective | Callable[[torch.Tensor], torch.Tensor] | str
# one smoothing for every class, or (head, tail) of label-aware smoothing
LabelSmoothing = float | tuple[float, float]

# The post-hoc tau grid: 0 (the model as it is) to 3 in steps of 0.25.
DEFAULT_TAUS: tuple[float, ...] = tuple(0.25 * i for i in range(13))

_DEFAULTS = FinetuneConfig()


# -- shared helpers -----------------------------------------------------------------------
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


def _copy_for_training(
    model: nn.Module,
    train: Any,
    features: nn.Module | None,
    head: nn.Linear | None,
    device: torch.device,
) -> tuple[nn.Module, ModelSplit, Any, torch.Tensor]:
    """The copied model and split (:func:`_copied_split`), the training set and its checked
    labels (every class present)."""
    copied, split = _copied_split(model, features, head, device)
    train = as_batch_dataset(train, "train")
    labels = check_labels("train", train.labels, split.head.out_features, every_class=True)
    return copied, split, train, labels


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


def class_log_prior(prior: Any, num_classes: int) -> torch.Tensor:
    """``log(prior)`` of K classes from counts, a prior or the labelled training set.

    Args:
        prior: Tensor[K] or sequence of K class counts or probabilities (normalised here),
            or a labelled data set (its labels are counted).
        num_classes: K.

    Returns:
        float64 Tensor[K] on the CPU.

    Raises:
        ValueError: if the length is not K, or an entry is negative, not finite or 0 (the
            log prior of a class with no training sample is -inf).
    """
    if isinstance(prior, (torch.Tensor, list, tuple)) or hasattr(prior, "__array__"):
        values = torch.as_tensor(prior, dtype=torch.float64).cpu()
        if values.dim() != 1 or values.numel() != num_classes:
            raise ValueError(
                f"`prior` must be a vector of one count or probability per class "
                f"({num_classes}), got shape {tuple(values.shape)}"
            )
        if not torch.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"`prior` must be finite and >= 0, got {values.tolist()}")
    else:
        dataset = as_batch_dataset(prior, "prior")
        labels = check_labels("prior", dataset.labels, num_classes)
        values = torch.bincount(labels, minlength=num_classes).double()
    empty = (values == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"`prior` is 0 for class(es) {empty}: their log prior is -inf; every class "
            "needs a positive prior (at least one training sample)"
        )
    return (values / values.sum()).log()


def _check_taus(taus: Any) -> list[float]:
    if taus is None:
        return list(DEFAULT_TAUS)
    if isinstance(taus, torch.Tensor):
        taus = taus.flatten().tolist()
    if isinstance(taus, (str, bytes)) or not isinstance(taus, Sequence):
        raise TypeError(f"`taus` must be a sequence of numbers, got {type(taus).__name__}")
    if len(taus) == 0:
        raise ValueError("`taus` must hold at least one value, got an empty sequence")
    # check_positive rejects inf and nan as well
    return [check_positive(f"taus[{i}]", tau, strict=False) for i, tau in enumerate(taus)]


# -- post-hoc logit adjustment ------------------------------------------------------------
@dataclass
class PosthocResult:
    """What :func:`posthoc_logit_adjustment` returns.

    Attributes:
        model: the adjusted copy of the model (head bias shifted by ``-tau * log_prior``).
        tau: the chosen tau.
        taus: the grid that was searched.
        scores: the validation :class:`ObjectiveScore` of each tau of the grid.
        val_metrics: :func:`selmix.all_metrics` of the validation set for each tau.
        log_prior: float64 Tensor[K], the log class prior that was used.
    """

    model: nn.Module
    tau: float
    taus: list[float]
    scores: list[ObjectiveScore]
    val_metrics: list[dict[str, Any]]
    log_prior: torch.Tensor


def posthoc_logit_adjustment(
    model: nn.Module,
    prior: Any,
    val: Any,
    objective: ObjectiveLike,
    taus: Sequence[float] | torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    precision: str = "fp32",
) -> PosthocResult:
    """Post-hoc logit adjustment (Menon et al. 2020) with tau tuned for ``objective``.

    The adjusted classifier predicts ``argmax_y f_y(x) - tau * log(prior_y)``. Validation
    logits are computed once; every tau of the grid is scored with :func:`objective_score`
    and the best one (the first on ties) is kept. The returned model is a deep copy whose
    head bias is shifted by ``-tau * log(prior)``, so it is an ordinary classifier that
    :func:`selmix.evaluate` and :func:`selmix.finetune` accept.

    Args:
        model: the trained classifier (not modified).
        prior: the training class counts or class prior, Tensor[K] or a sequence, or the
            training set itself (its labels are counted).
        val: the validation set; every class must be present.
        objective: name, :class:`~selmix.objectives.Objective` or callable of C that tau is
            tuned for (see :func:`objective_score` for the rule).
        taus: the grid of taus (>= 0); default :data:`DEFAULT_TAUS` (0 to 3 by 0.25).
        device: where to compute; the returned model is left there.
        batch_size: batch size of the feature extraction.
        features, head: an explicit split of ``model`` (see :func:`selmix.split_model`).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"``: the feature
            extraction's autocast (:mod:`selmix.precision`); the logits are float32.

    Returns:
        A :class:`PosthocResult` with the adjusted model, the chosen tau and the
        validation score and metrics of every tau.
    """
    grid = _check_taus(taus)
    check_int("batch_size", batch_size, minimum=1)
    objective = as_objective(objective)
    device = resolve_device(device)
    adjusted, split = _copied_split(model, features, head, device)
    num_classes = split.head.out_features
    log_prior = class_log_prior(prior, num_classes)
    val = as_batch_dataset(val, "val")
    labels = check_labels("val", val.labels, num_classes, every_class=True)
    precision = resolve_precision(precision, device)
    view = FrozenFeatures(split, device, batch_size=batch_size, precision=precision)
    logits = view.logits(val).double().cpu()
    head_classes = getattr(objective, "head_classes", None)
    scores, metrics = [], []
    for tau in grid:
        preds = (logits - tau * log_prior).argmax(dim=1)
        counts = confusion_matrix(labels, preds, num_classes, normalize=False)
        scores.append(objective_score(objective, counts))
        metrics.append(all_metrics(counts, head_classes))
    tau = grid[best_index(scores)]
    layer = split.head
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(layer.weight[:, 0]))
        layer.bias.sub_((tau * log_prior).to(layer.bias))
    return PosthocResult(adjusted, tau, grid, scores, metrics, log_prior)


# -- classifier re-training (cRT) -----------------------------------------------------------
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
        precision: the feature extraction's autocast (:mod:`selmix.precision`); the head
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
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    retrained, split, train, labels = _copy_for_training(model, train, features, head, device)
    if check_bool("channels_last", channels_last):
        to_channels_last(retrained)
    num_classes = split.head.out_features
    if val is not None:
        val = as_batch_dataset(val, "val")
        check_labels("val", val.labels, num_classes, every_class=True)
    view = FrozenFeatures(split, device, batch_size=eval_batch_size, precision=precision)
    train_features = view.features(train)
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        val_metrics = None if val is None else view.evaluate(val).metrics()
        record = {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "val": val_metrics}
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if callback is not None:
            callback(record)
    bar.close()
    retrained.eval()
    return retrained


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


# -- logit-adjusted fine-tuning -------------------------------------------------------------
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
    :func:`selmix.pretrain.logit_adjustment`); batches are drawn uniformly from the
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
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    tuned, split, train, labels = _copy_for_training(model, train, features, head, device)
    if check_bool("channels_last", channels_last):
        to_channels_last(tuned)
    scaler = grad_scaler(precision, device)
    num_classes = split.head.out_features
    adjustment = logit_adjustment(labels, num_classes, tau).to(device)
    backbone_lr = lr_head / 10 if lr_backbone is None else lr_backbone
    optimizer, scheduler = sgd_cosine(
        split, steps, lr_head, None if frozen_backbone else backbone_lr, momentum, weight_decay
    )
    cached = None
    if frozen_backbone:
        cached = FrozenFeatures(
            split, device, batch_size=eval_batch_size, precision=precision
        ).features(train)
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
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        bar.update(1)
    bar.close()
    tuned.eval()
    return tuned


# -- registry -------------------------------------------------------------------------------
@dataclass
class BaselineResult:
    """What :func:`run_baseline` returns.

    Attributes:
        name: the baseline's name.
        model: the new model (the input model is untouched).
        details: plain data about the run: for ``"posthoc_la"`` the chosen ``tau``, the
            grid ``taus``, the per-tau ``scores`` (:meth:`ObjectiveScore.to_dict`) and
            ``val_metrics``; for ``"crt"`` and ``"mislas_stage2"`` the per-epoch
            ``history``; empty otherwise.
        config: the resolved :class:`BaselineConfig` (from :func:`baseline`; None from
            :func:`run_baseline`).
    """

    name: str
    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    config: BaselineConfig | None = None


def _start(model: nn.Module, *, device: str | torch.device = "cpu") -> nn.Module:
    """An unchanged copy of the model (the starting point), on ``device`` in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    return copy.deepcopy(model).to(resolve_device(device)).eval()


BASELINES: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "start": _start,
        "posthoc_la": posthoc_logit_adjustment,
        "crt": classifier_retraining,
        "la_finetune": logit_adjusted_finetune,
        "mislas_stage2": mislas_stage2,
    }
)

# The arguments run_baseline fills in itself, by baseline.
_SUPPLIED = {
    "start": ("model",),
    "posthoc_la": ("model", "prior", "val", "objective"),
    "crt": ("model", "train", "val"),
    "la_finetune": ("model", "train"),
    "mislas_stage2": ("model", "train", "val"),
}


def list_baselines() -> list[str]:
    """Names accepted by :func:`run_baseline`."""
    return sorted(BASELINES)


def run_baseline(
    name: str,
    model: nn.Module,
    train: Any,
    val: Any,
    objective: ObjectiveLike,
    **options: Any,
) -> BaselineResult:
    """Runs a baseline by name with one call signature, for benchmark scripts.

    ``"start"``: a copy of ``model``; ``"posthoc_la"``: :func:`posthoc_logit_adjustment`
    with the prior counted from ``train`` and tau tuned on ``val`` for ``objective``;
    ``"crt"``: :func:`classifier_retraining` (``val`` metrics per epoch in the details);
    ``"mislas_stage2"``: :func:`mislas_stage2` (the same details); ``"la_finetune"``:
    :func:`logit_adjusted_finetune`. Baselines that have no use for
    ``val`` or ``objective`` ignore them.

    Args:
        name: one of :func:`list_baselines`.
        model: the trained classifier (not modified).
        train: the labelled training set.
        val: the validation set.
        objective: the objective (name, Objective or callable).
        **options: keyword arguments of the baseline's function, e.g. ``device="cuda"``,
            ``taus=[0, 1]``, ``epochs=5`` or ``steps=500``.

    Returns:
        A :class:`BaselineResult`.
    """
    check_choice("name", name, list_baselines())
    function = BASELINES[name]
    parameters = inspect.signature(function).parameters
    valid = [key for key in parameters if key not in _SUPPLIED[name]]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for baseline {name!r}; valid: {valid}")
    if name == "start":
        return BaselineResult(name, function(model, **options))
    if name == "posthoc_la":
        result = function(model, train, val, objective, **options)
        details = {
            "tau": result.tau,
            "taus": result.taus,
            "scores": [score.to_dict() for score in result.scores],
            "val_metrics": result.val_metrics,
        }
        return BaselineResult(name, result.model, details)
    if name in ("crt", "mislas_stage2"):
        history: list[dict[str, Any]] = []
        user_callback = options.pop("callback", None)

        def record(entry: dict[str, Any]) -> None:
            history.append(entry)
            if user_callback is not None:
                user_callback(entry)

        new = function(model, train, val, callback=record, **options)
        return BaselineResult(name, new, {"history": history})
    return BaselineResult(name, function(model, train, **options))


# -- one configuration for every baseline -----------------------------------------------------
_ALL = ("posthoc_la", "crt", "la_finetune", "mislas_stage2")
_LA, _CRT, _POSTHOC, _MISLAS = (
    {"methods": ("la_finetune",)},
    {"methods": ("crt", "mislas_stage2")},
    {"methods": ("posthoc_la",)},
    {"methods": ("mislas_stage2",)},
)
_TRAINED = {"methods": ("crt", "la_finetune", "mislas_stage2")}


class _Smoothing:
    """A label-smoothing eps: a finite number in [0, 1)."""

    def __call__(self, name: str, value: Any) -> Any:
        if check_in_range(name, value, 0.0, 1.0) == 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {value}")
        return value


class _Taus:
    """None (the default grid) or a non-empty sequence of finite taus >= 0."""

    def __call__(self, name: str, value: Any) -> Any:
        return value if value is None else _check_taus(value)


@dataclass
class BaselineConfig(ConfigMixin):
    """Settings of the baselines, like :class:`selmix.FinetuneConfig` for SelMix.

    Each field declares which baselines use it (``extra={"methods": ...}``; the others
    ignore it) next to its help text and constraint; :meth:`options` turns the config into
    the keyword arguments of one baseline's function.
    """

    settings_name = "baseline"

    objective: str = setting(
        _DEFAULTS.objective, flag=True, metavar="NAME", extra=_POSTHOC,
        help="objective tau is tuned for (posthoc_la; ignored by the other methods, see the "
        "list below)",
    )  # fmt: skip
    objective_params: dict[str, Any] = setting(
        default_factory=dict, check=Dict(), extra=_POSTHOC,
        help="objective hyper-parameters, e.g. {rate: 20} (posthoc_la)",
    )  # fmt: skip
    taus: list[float] | None = setting(
        None, check=_Taus(), extra=_POSTHOC,
        help="the tau grid of posthoc_la, e.g. [0, 0.5, 1]; unset: 0 to 3 by 0.25",
    )  # fmt: skip
    epochs: int = setting(
        10, help="training epochs of the head (crt and mislas_stage2)", check=Int(1),
        flag=True, extra=_CRT,
    )  # fmt: skip
    lr: float = setting(
        0.1, help="learning rate of the head (crt and mislas_stage2)", check=Real(), flag=True,
        extra=_CRT,
    )  # fmt: skip
    smooth_head: float = setting(
        0.3, help="label smoothing of the most frequent class, in [0, 1) (mislas_stage2 only)",
        check=_Smoothing(), flag=True, metavar="EPS", extra=_MISLAS,
    )  # fmt: skip
    smooth_tail: float = setting(
        0.0, help="label smoothing of the rarest class, in [0, 1); the others' is linear in "
        "the class count (mislas_stage2 only)", check=_Smoothing(), flag=True, metavar="EPS",
        extra=_MISLAS,
    )  # fmt: skip
    steps: int = setting(
        _DEFAULTS.steps, help="SGD steps (la_finetune only)", check=Int(1), flag=True, extra=_LA
    )
    lr_head: float = setting(
        _DEFAULTS.lr_head, help="learning rate of the linear head (la_finetune only)",
        check=Real(), flag=True, extra=_LA,
    )  # fmt: skip
    lr_backbone: float | None = setting(
        None, help="backbone learning rate (la_finetune); unset: lr_head / 10",
        check=Optional(Real(strict=False)), extra=_LA,
    )  # fmt: skip
    frozen_backbone: bool = setting(
        False, help="train the linear head only (la_finetune only)", check=Flag(), flag=True,
        extra=_LA,
    )  # fmt: skip
    la_tau: float = setting(
        1.0, help="logit-adjustment temperature of the loss (la_finetune only)",
        check=Real(strict=False), flag=True, metavar="TAU", extra=_LA,
    )  # fmt: skip
    batch_size: int = setting(
        _DEFAULTS.batch_size, help="samples per step (crt, mislas_stage2 and la_finetune)",
        check=Int(1),
        flag=True, extra=_TRAINED,
    )  # fmt: skip
    momentum: float = setting(
        _DEFAULTS.momentum, help="SGD momentum (crt, mislas_stage2 and la_finetune)",
        check=Real(high=1.0),
        extra=_TRAINED,
    )  # fmt: skip
    weight_decay: float = setting(
        _DEFAULTS.weight_decay, help="SGD weight decay (crt, mislas_stage2 and la_finetune)",
        check=Real(strict=False), extra=_TRAINED,
    )  # fmt: skip
    augment: bool = setting(
        _DEFAULTS.augment, help="random crop and flip (la_finetune, full backbone)",
        check=Flag(), extra=_LA,
    )  # fmt: skip
    eval_batch_size: int = setting(
        512, help="batch size of feature extraction and evaluation",
        check=Int(1),
    )  # fmt: skip
    head_classes: list[int] | None = setting(
        None, help="head classes for head/tail metrics and objectives; unset: the 90% most "
        "frequent training classes", check=Optional(ClassIndices()),
    )  # fmt: skip
    seed: int = setting(
        0, help="random seed (model initialisation, data split, sampling)", check=Seed(),
        flag=True,
    )  # fmt: skip
    device: str = setting(
        "cpu", help=f"where to run: {DEVICE_HELP}", cli_default="auto", flag=True,
        metavar="DEVICE",
    )  # fmt: skip
    precision: str = precision_setting(_DEFAULTS.precision, flag=True)
    threads: int | None = threads_setting(flag=True)
    channels_last: bool = channels_last_setting(False, flag=True, extra=_TRAINED)
    progress: bool = setting(
        True, help="show progress bars (crt, mislas_stage2 and la_finetune; plain lines when "
        "not a terminal)",
        check=Flag(), flag=True, extra=_TRAINED,
    )  # fmt: skip

    @classmethod
    def used_by(cls, method: str) -> list[str]:
        """The fields ``method`` uses (the others are ignored by it)."""
        return [item.name for item in settings_of(cls) if method in item.extra.get("methods", _ALL)]

    def options(self, method: str) -> dict[str, Any]:
        """The keyword arguments of :data:`BASELINES` ``[method]`` (for :func:`run_baseline`)."""
        check_choice("method", method, list_baselines())
        values = self.to_dict()
        if method == "start":
            return {"device": self.device}
        if method == "posthoc_la":
            return {"taus": self.taus, "batch_size": self.eval_batch_size, "device": self.device,
                    "precision": self.precision}  # fmt: skip
        renamed = {"la_tau": "tau"}
        # threads are set once for the process by `baseline`
        skipped = {"objective", "objective_params", "taus", "head_classes", "threads",
                   "smooth_head", "smooth_tail"}  # fmt: skip
        options = {
            renamed.get(name, name): values[name]
            for name in self.used_by(method)
            if name not in skipped
        }
        if method == "mislas_stage2":
            options["label_smoothing"] = (self.smooth_head, self.smooth_tail)
        return options


def baseline(
    method: str,
    model: nn.Module,
    train: Any,
    val: Any,
    config: BaselineConfig | dict[str, Any] | None = None,
    *,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    **overrides: Any,
) -> BaselineResult:
    """Runs a baseline with a :class:`BaselineConfig`, as :func:`selmix.finetune` runs SelMix.

    The objective and the head classes are resolved as for fine-tuning
    (:func:`selmix.finetune.resolve_objective`: head classes inferred from the training
    labels when unset, and given to head/tail objectives), so a baseline and a SelMix run
    with the same settings tune for the same objective.

    Args:
        method: one of :func:`list_baselines`.
        model: the trained classifier (not modified).
        train: the labelled training set.
        val: the validation set.
        config: a :class:`BaselineConfig` or a dict of its fields.
        features, head: an explicit split of ``model``.
        **overrides: any :class:`BaselineConfig` field.

    Returns:
        A :class:`BaselineResult` whose ``config`` is the resolved configuration.
    """
    from selmix.finetune import resolve_objective

    check_choice("method", method, list_baselines())
    config = BaselineConfig.resolve(config, overrides)
    configure_threads(config.threads)
    num_classes = split_model(model, features=features, head=head).head.out_features
    labels = as_batch_dataset(train, "train").labels
    config, objective = resolve_objective(config, None, labels, num_classes)
    options = config.options(method)
    if method != "start" and (features is not None or head is not None):
        options.update(features=features, head=head)
    result = run_baseline(method, model, train, val, objective, **options)
    result.config = config
    return result
