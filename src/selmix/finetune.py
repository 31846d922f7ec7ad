"""The SelMix fine-tuning loop (MATH.md section 5, paper Alg. 1).

Every ``feedback_every`` steps: evaluate the validation set (confusion matrix C and class
means mu), update the objective's multipliers, compute the gain matrix and the mixup
distribution P (and, semi-supervised, refresh the pseudo-labels). Every step: draw B pairs
(i, j) ~ P, x1 from class i and x2 from class j, mix their features with lam ~ U[lam_min, 1]
and take an SGD step on the cross-entropy with label i. Batch norm stays in eval mode.

The loop is a :class:`Trainer` composed of small parts that are tested alone: the
objective (:mod:`selmix.objectives`), :func:`selmix.gain_matrix`,
:func:`selmix.mixup_distribution`, :class:`selmix.sampler.PairSampler` and
:func:`selmix.evaluate`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from selmix._config import ConfigMixin
from selmix._validation import (
    check_choice,
    check_in_range,
    check_int,
    check_labels,
    check_positive,
)
from selmix.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_model,
)
from selmix.evaluate import Evaluation, as_batch_dataset, evaluate, extract_features, resolve_device
from selmix.gain import gain_matrix
from selmix.metrics import all_metrics
from selmix.objectives import Objective, as_objective, get_objective
from selmix.policy import POLICIES, effective_pairs, mixup_distribution, policy_entropy
from selmix.sampler import PairSampler

if TYPE_CHECKING:
    from selmix.models import ModelSplit

__all__ = ["FinetuneConfig", "FinetuneResult", "Trainer", "finetune"]

# Fields that change what is computed; a resumed run must agree on them.
_RUN_FIELDS = (
    "objective", "objective_params", "policy", "gain_scale", "normalize_gain", "steps",
    "batch_size", "lr_head", "lr_backbone", "frozen_backbone", "momentum", "weight_decay",
    "feedback_every", "lam_min", "confusion_smoothing", "augment", "seed",
    "soft_confusion", "uniform_mix", "multiplier_step",
)  # fmt: skip


@dataclass
class FinetuneConfig(ConfigMixin):
    """Settings of a SelMix fine-tuning run; defaults follow MATH.md (supervised CIFAR).

    Attributes:
        objective: registered objective name (see :func:`selmix.list_objectives`).
        objective_params: its hyper-parameters, e.g. ``{"rate": 50}`` for min recall.
        policy: ``"selmix"``, ``"uniform"`` or ``"greedy"``.
        gain_scale: s in ``P ∝ exp(s G)``.
        normalize_gain: the scale-free policy ``exp(s G / max|G|)``.
        steps: SGD steps.
        batch_size: mixup pairs per step (the global batch).
        lr_head: learning rate of the linear head.
        lr_backbone: learning rate of the feature extractor; None means ``lr_head / 10``.
        frozen_backbone: train the head only, on features computed once.
        momentum, weight_decay: SGD settings.
        feedback_every: E, steps between feedback (validation) steps.
        lam_min: mixing weights are drawn from U[lam_min, 1].
        confusion_smoothing: a pseudo-count added to every cell of the validation
            confusion counts before the multipliers and the gain are computed. 0 is the
            paper. A class with no correct validation prediction has zero gain under the
            softmax parametrisation (its C[y, y] is 0), so SelMix cannot see it; a
            pseudo-count of about 1 makes it visible (see docs/RESULTS.md).
        augment: random crop and flip of the images (full-backbone mode only).
        eval_batch_size: batch size of evaluation and feature extraction.
        seed: seeds every random draw of the run.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        head_classes: head classes for head/tail metrics and objectives.
        log_path: JSON-lines file that receives one record per feedback step.
        checkpoint_path: where checkpoints go (written atomically).
        checkpoint_every: steps between checkpoints (None: only at the end, if a path is set).
        progress: show a progress bar.
    """

    settings_name = "fine-tuning"

    objective: str = "min_recall"
    objective_params: dict[str, Any] = field(default_factory=dict)
    policy: str = "selmix"
    gain_scale: float = 10.0
    normalize_gain: bool = False
    steps: int = 1000
    batch_size: int = 128
    lr_head: float = 3e-3
    lr_backbone: float | None = None
    frozen_backbone: bool = False
    momentum: float = 0.9
    weight_decay: float = 5e-4
    feedback_every: int = 50
    lam_min: float = 0.6
    confusion_smoothing: float = 0.0
    # ROBUST-HOOK (issue 13, branch robust): stabilisers measured by benchmarks/robustness.py
    soft_confusion: bool = False
    uniform_mix: float = 0.0
    multiplier_step: float = 1.0
    augment: bool = True
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "cpu"
    head_classes: list[int] | None = None
    log_path: str | None = None
    checkpoint_path: str | None = None
    checkpoint_every: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, POLICIES)
        check_positive("gain_scale", self.gain_scale)
        check_int("steps", self.steps, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_positive("lr_head", self.lr_head)
        if self.lr_backbone is not None:
            check_positive("lr_backbone", self.lr_backbone, strict=False)
        check_in_range("momentum", self.momentum, 0.0, 1.0)
        check_positive("weight_decay", self.weight_decay, strict=False)
        check_int("feedback_every", self.feedback_every, minimum=1)
        check_in_range("lam_min", self.lam_min, 0.0, 1.0)
        check_positive("confusion_smoothing", self.confusion_smoothing, strict=False)
        check_in_range("uniform_mix", self.uniform_mix, 0.0, 1.0)
        check_positive("multiplier_step", self.multiplier_step)
        check_in_range("multiplier_step", self.multiplier_step, 0.0, 1.0)
        check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        check_int("seed", self.seed)
        if self.checkpoint_every is not None:
            check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        if not isinstance(self.objective_params, dict):
            raise TypeError(
                f"`objective_params` must be a dict, got {type(self.objective_params).__name__}"
            )

    @property
    def backbone_lr(self) -> float:
        """The feature extractor's learning rate (``lr_head / 10`` unless set)."""
        return self.lr_head / 10 if self.lr_backbone is None else self.lr_backbone

    @property
    def mix(self) -> float:
        """m = E[lam] = (1 + lam_min) / 2, the weight of x1 in the expected mixed feature."""
        return (1 + self.lam_min) / 2


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the fine-tuned model (the same object that was passed in).
        split: its (features, head) split.
        objective: the objective, with its last multipliers.
        config: the resolved configuration.
        history: one record per feedback step (validation metrics, objective value,
            multipliers, largest gain, policy entropy, learning rates, mean loss).
        gains: ``(step, Tensor[K, K])`` gain matrices of the feedback steps (all of them for
            K <= 200, else the first and the last).
    """

    model: nn.Module
    split: Any
    objective: Objective
    config: FinetuneConfig
    history: list[dict[str, Any]]
    gains: list[tuple[int, torch.Tensor]]

    def evaluate(self, dataset: Any) -> Evaluation:
        """Confusion counts and prototypes of the fine-tuned model on ``dataset``."""
        return evaluate(
            self.model, dataset, self.config.device, self.config.eval_batch_size,
            features=self.split.features, head=self.split.head,
        )  # fmt: skip

    def metrics(self, dataset: Any) -> dict[str, Any]:
        """Every metric of :func:`selmix.all_metrics` on ``dataset``."""
        return self.evaluate(dataset).metrics(self.config.head_classes)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Saves the model (rebuildable with :func:`selmix.load_model` for registry models)."""
        meta = {"finetune_config": self.config.to_dict(), **(meta or {})}
        return save_model(path, self.model, meta)


def smoothed_confusion(counts: torch.Tensor, pseudo_count: float) -> torch.Tensor:
    """``(counts + pseudo_count) / total``: Tensor[K, K] float64 summing to 1."""
    smoothed = counts.double() + pseudo_count
    return smoothed / smoothed.sum()


def sgd_cosine(
    split: ModelSplit,
    steps: int,
    lr_head: float,
    lr_backbone: float | None,
    momentum: float,
    weight_decay: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over the head and (optionally) the backbone with a cosine decay to 0 over ``steps``.

    The optimiser of SelMix fine-tuning, shared with the baselines of
    :mod:`selmix.baselines`.

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
    optimizer = torch.optim.SGD(groups, lr=lr_head, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    return optimizer, scheduler


class _FeatureCache:
    """Features of a whole data set computed once (frozen-backbone mode)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels


class Trainer:
    """One SelMix fine-tuning run; :func:`finetune` is the usual entry point.

    Args:
        model: the classifier to fine-tune (changed in place).
        train: labelled training set.
        val: validation set with every class present.
        objective: objective name, :class:`Objective` or differentiable callable of C.
        config: the run's settings.
        unlabelled: optional unlabelled set for the semi-supervised variant (its labels
            are never read).
        features, head: an explicit split of ``model``.
        callback: called with each feedback record.
        distributed: optional :class:`selmix.distributed.DistributedContext`.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Any,
        val: Any,
        objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str | None,
        config: FinetuneConfig,
        unlabelled: Any = None,
        features: nn.Module | None = None,
        head: nn.Linear | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        distributed: Any = None,
    ) -> None:
        from selmix.models import split_model

        if distributed is not None:  # each process computes on its own device (cuda:LOCAL_RANK)
            config = config.replace(device=str(distributed.device))
        self.config = config
        self.device = resolve_device(config.device)
        self.distributed = distributed
        self.split = split_model(model, features=features, head=head)
        self.model = model.to(self.device)
        self.num_classes = self.split.head.out_features
        if objective is None:
            objective = get_objective(config.objective, **config.objective_params)
        self.objective = as_objective(objective)
        self.callback = callback
        self.train = as_batch_dataset(train, "train")
        self.val = as_batch_dataset(val, "val")
        self.unlabelled = None if unlabelled is None else as_batch_dataset(unlabelled, "unlabelled")
        self._check_labels()

        self.generator = torch.Generator().manual_seed(self._rank_seed())
        self.sampler = PairSampler(self._train_labels, None, self.num_classes, self.generator)
        self.pseudo_labels: torch.Tensor | None = None
        self.distribution = torch.full((self.num_classes,) * 2, 1.0 / self.num_classes**2)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.gains: list[tuple[int, torch.Tensor]] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._train_model = self._wrap_for_training()
        self.optimizer, self.scheduler = self._build_optimizer()
        if distributed is not None and config.frozen_backbone:
            # the head trains outside DDP: same start everywhere, gradients averaged per step
            distributed.broadcast_module(self.model)
            distributed.average_gradients(self.optimizer)
        self._caches: dict[str, _FeatureCache] = {}

    # -- set-up -------------------------------------------------------------------------
    @property
    def _train_labels(self) -> torch.Tensor:
        return torch.as_tensor(self.train.labels).long().cpu()

    def _rank_seed(self) -> int:
        rank = 0 if self.distributed is None else self.distributed.rank
        # distinct, reproducible streams per rank; rank 0 matches a single-process run
        return self.config.seed + 1_000_003 * rank

    def _check_labels(self) -> None:
        num_classes = self.num_classes
        for name, dataset in (("train", self.train), ("val", self.val)):
            check_labels(name, dataset.labels, num_classes)
            declared = getattr(dataset, "num_classes", None)
            if declared is not None and declared != num_classes:
                raise ValueError(
                    f"`{name}` has num_classes = {declared} but the model's head has "
                    f"{num_classes} outputs"
                )
        present = torch.bincount(torch.as_tensor(self.val.labels).long(), minlength=num_classes)
        missing = (present == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"`val` has no samples of class(es) {missing}: their recall is undefined; "
                "the validation set needs every class"
            )

    def _wrap_for_training(self) -> nn.Module:
        if self.distributed is not None and not self.config.frozen_backbone:
            return self.distributed.wrap(self._mixup_module())
        return self._mixup_module()

    def _mixup_module(self) -> nn.Module:
        return _MixupForward(self.split.features, self.split.head)

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        config = self.config
        return sgd_cosine(
            self.split, config.steps, config.lr_head,
            None if config.frozen_backbone else config.backbone_lr,
            config.momentum, config.weight_decay,
        )  # fmt: skip

    # -- feature caches (frozen backbone) -----------------------------------------------
    def _cache(self, name: str, dataset: Any) -> _FeatureCache:
        if name not in self._caches:
            self.model.eval()
            if self.distributed is not None:
                features = self.distributed.extract_sharded(self, dataset)
            else:
                features = extract_features(
                    self.split.features, dataset, self.device, self.config.eval_batch_size
                )
            labels = torch.as_tensor(dataset.labels).long()
            self._caches[name] = _FeatureCache(features, labels)
        return self._caches[name]

    # -- feedback -----------------------------------------------------------------------
    def _evaluate_val(self) -> Evaluation:
        reduce = None if self.distributed is None else self.distributed.all_reduce
        if not self.config.frozen_backbone:
            val = self.val if self.distributed is None else self.distributed.shard(self.val)
            return evaluate(
                self.model, val, self.device, self.config.eval_batch_size,
                features=self.split.features, head=self.split.head, reduce=reduce,
            )  # fmt: skip
        from selmix.evaluate import summarize

        cache = self._cache("val", self.val)
        with torch.no_grad():
            logits = self.split.head(cache.features)
            counts, sums, class_counts = summarize(
                cache.features, logits, cache.labels, self.num_classes
            )
        prototypes = sums / class_counts.clamp_min(1)[:, None].double()
        return Evaluation(counts.cpu(), prototypes.float().cpu(), class_counts.cpu())

    @torch.no_grad()
    def _soft_counts(self) -> torch.Tensor:
        """ROBUST-HOOK: per true class, the summed validation softmax probabilities (K x K).

        Single-process only; the redesigned Trainer takes it from ``Evaluation.soft_counts``.
        """
        self.model.eval()
        if self.config.frozen_backbone:
            cache = self._cache("val", self.val)
            feats, labels = cache.features, cache.labels
        else:
            feats = extract_features(
                self.split.features, self.val, self.device, self.config.eval_batch_size
            )
            labels = torch.as_tensor(self.val.labels).long()
        probs = torch.softmax(self.split.head(feats).double(), dim=1)
        soft = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
        soft.index_add_(0, labels.cpu(), probs.cpu())
        return soft

    @torch.no_grad()
    def _predict_unlabelled(self) -> torch.Tensor:
        self.model.eval()
        if self.config.frozen_backbone:
            cache = self._cache("unlabelled", self.unlabelled)
            return self.split.head(cache.features).argmax(dim=1).cpu()
        if self.distributed is not None:
            return self.distributed.predict_sharded(self, self.unlabelled)
        feats = extract_features(
            self.split.features, self.unlabelled, self.device, self.config.eval_batch_size
        )
        return self.split.head(feats).argmax(dim=1).cpu()

    def feedback(self) -> dict[str, Any]:
        """Evaluates, updates multipliers, gain and policy; returns the logged record."""
        config = self.config
        started = time.perf_counter()
        evaluation = self._evaluate_val()
        confusion = evaluation.confusion
        # the objective, multipliers and gain see the (optionally smoothed) estimate of C;
        # the logged metrics are those of the raw counts
        estimate = smoothed_confusion(evaluation.counts, config.confusion_smoothing)
        self.objective.update(estimate, step_size=config.multiplier_step)
        with torch.no_grad():
            value = float(self.objective(estimate))
        head = self.split.head
        soft = self._soft_counts() if config.soft_confusion else None  # ROBUST-HOOK
        gain = gain_matrix(
            self.objective, estimate, evaluation.prototypes.to(self.device), head, config.mix,
            soft_confusion=soft,
        ).cpu()  # fmt: skip
        self.distribution = mixup_distribution(
            gain, config.gain_scale, config.policy, config.normalize_gain,
            uniform_mix=config.uniform_mix,
        ).cpu()  # fmt: skip
        record: dict[str, Any] = {
            "step": self.step,
            "objective": value,
            "metrics": all_metrics(confusion, config.head_classes),
            "multipliers": None
            if self.objective.multipliers is None
            else self.objective.multipliers.tolist(),
            "max_gain": float(gain.max()),
            "policy_entropy": policy_entropy(self.distribution),
            "effective_pairs": effective_pairs(self.distribution),
            "lr_head": self.optimizer.param_groups[0]["lr"],
            "lr_backbone": (
                self.optimizer.param_groups[1]["lr"]
                if len(self.optimizer.param_groups) > 1
                else 0.0
            ),
            "train_loss": self._loss_sum / self._loss_count if self._loss_count else None,
        }
        self._loss_sum, self._loss_count = 0.0, 0
        if self.unlabelled is not None:
            self.pseudo_labels = self._predict_unlabelled()
            self.sampler.set_second_labels(self.pseudo_labels)
            histogram = torch.bincount(self.pseudo_labels, minlength=self.num_classes)
            record["pseudo_label_histogram"] = histogram.tolist()
            true_labels = getattr(self.unlabelled, "hidden_labels", None)
            if true_labels is not None:
                # reporting only: the hidden labels never reach the sampler or the loss
                agree = torch.as_tensor(true_labels).long() == self.pseudo_labels
                record["pseudo_label_accuracy"] = float(agree.double().mean())
        record["feedback_seconds"] = time.perf_counter() - started
        if self.num_classes <= 200 or not self.gains:
            self.gains.append((self.step, gain))
        elif self.step == config.steps:
            self.gains.append((self.step, gain))
        self.history.append(record)
        self._log(record)
        if self.callback is not None:
            self.callback(record)
        return record

    def _is_main(self) -> bool:
        return self.distributed is None or self.distributed.rank == 0

    def _log(self, record: dict[str, Any]) -> None:
        if self.config.log_path and self._is_main():
            path = Path(self.config.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as file:
                file.write(json.dumps(record) + "\n")

    # -- training -----------------------------------------------------------------------
    def _images(self, dataset: Any, indices: torch.Tensor) -> torch.Tensor:
        images, _ = dataset.batch(
            indices, augment=self.config.augment, generator=self.generator, device=self.device
        )
        return images

    def _second_images(self, indices: torch.Tensor, from_second: torch.Tensor) -> torch.Tensor:
        return self._merge(
            from_second, indices,
            lambda index: self._images(self.unlabelled, index),
            lambda index: self._images(self.train, index),
        )  # fmt: skip

    def _second_features(self, indices: torch.Tensor, from_second: torch.Tensor) -> torch.Tensor:
        train = self._cache("train", self.train).features
        if self.unlabelled is None:
            return train[indices.to(self.device)]
        unlabelled = self._cache("unlabelled", self.unlabelled).features
        return self._merge(
            from_second, indices,
            lambda index: unlabelled[index.to(self.device)],
            lambda index: train[index.to(self.device)],
        )  # fmt: skip

    def _merge(
        self,
        from_second: torch.Tensor,
        indices: torch.Tensor,
        second_pool: Callable[[torch.Tensor], torch.Tensor],
        first_pool: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Rows from the second pool where ``from_second``, from the first pool elsewhere."""
        if not from_second.any():
            return first_pool(indices)
        if from_second.all():
            return second_pool(indices)
        from_unlabelled = second_pool(indices[from_second])
        from_train = first_pool(indices[~from_second])
        merged = from_unlabelled.new_empty((indices.numel(), *from_unlabelled.shape[1:]))
        mask = from_second.to(merged.device)
        merged[mask] = from_unlabelled
        merged[~mask] = from_train
        return merged

    def _batch_size(self) -> int:
        if self.distributed is None:
            return self.config.batch_size
        return self.distributed.local_batch_size(self.config.batch_size)

    def train_step(self) -> float:
        """One SGD step on a batch of mixups drawn from the current distribution."""
        config = self.config
        batch_size = self._batch_size()
        first, second, from_second, labels = self.sampler.sample(self.distribution, batch_size)
        lam = config.lam_min + (1 - config.lam_min) * torch.rand(
            batch_size, generator=self.generator
        )
        lam = lam.to(self.device)[:, None]
        labels = labels.to(self.device)
        self.model.eval()  # batch norm frozen: running statistics, no updates
        if config.frozen_backbone:
            first_features = self._cache("train", self.train).features[first.to(self.device)]
            second_features = self._second_features(second, from_second)
            mixed = lam * first_features + (1 - lam) * second_features
            logits = self.split.head(mixed)
        else:
            first_images = self._images(self.train, first)
            second_images = self._second_images(second, from_second)
            logits = self._train_model(first_images, second_images, lam)
        loss = F.cross_entropy(logits, labels)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            where = (
                f"; the last good checkpoint is {self.config.checkpoint_path!r}"
                if self.config.checkpoint_path
                else ""
            )
            raise FloatingPointError(
                f"non-finite loss ({loss_value}) at step {self.step}: lower `lr_head` / "
                f"`lr_backbone` or use `frozen_backbone`{where}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self._loss_sum += loss_value
        self._loss_count += 1
        return loss_value

    def run(self) -> FinetuneResult:
        """Runs from the current step to ``config.steps`` (with a last feedback at the end)."""
        from tqdm.auto import tqdm

        config = self.config
        progress = tqdm(
            total=config.steps, initial=self.step, desc=f"selmix {self.objective.name}",
            disable=not (config.progress and self._is_main()), leave=False,
        )  # fmt: skip
        try:
            while self.step < config.steps:
                if self.step % config.feedback_every == 0:
                    record = self.feedback()
                    progress.set_postfix(objective=f"{record['objective']:.4f}")
                self.train_step()
                self.step += 1
                progress.update(1)
                every = config.checkpoint_every
                if every and self.step % every == 0 and self.step < config.steps:
                    self.save_checkpoint()
            if not self.history or self.history[-1]["step"] != self.step:
                self.feedback()
        finally:
            progress.close()
        if config.checkpoint_path:
            self.save_checkpoint()
        return FinetuneResult(
            self.model, self.split, self.objective, config, self.history, self.gains
        )

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as ``weights_only``-loadable data."""
        return {
            "format": "selmix-finetune-v1",
            "step": self.step,
            "config": self.config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "distribution": self.distribution.clone(),
            "pseudo_labels": self.pseudo_labels,
            "history": self.history,
            "gains": [(step, gain.clone()) for step, gain in self.gains],
            "rng": capture_rng_state(self.generator),
            "loss": [self._loss_sum, self._loss_count],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved (the run settings must agree)."""
        if state.get("format") != "selmix-finetune-v1":
            raise ValueError("`resume` is not a selmix fine-tuning checkpoint")
        saved = state["config"]
        current = self.config.to_dict()
        changed = [k for k in _RUN_FIELDS if saved.get(k) != current.get(k)]
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ValueError(f"`resume` checkpoint was made with other settings ({details})")
        world_size = 1 if self.distributed is None else self.distributed.world_size
        if int(state.get("world_size", 1)) != world_size:
            raise ValueError(
                f"`resume` checkpoint was written by {state.get('world_size', 1)} process(es) "
                f"but this run has {world_size} (world size): resume on as many processes"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(
                f"`resume` checkpoint does not match the model: {str(error).splitlines()[0]}"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.distribution = state["distribution"]
        self.pseudo_labels = state["pseudo_labels"]
        if self.pseudo_labels is not None:
            self.sampler.set_second_labels(self.pseudo_labels)
        self.history = list(state["history"])
        self.gains = [(int(step), gain) for step, gain in state["gains"]]
        self.step = int(state["step"])
        self._loss_sum, self._loss_count = state["loss"]
        if self.distributed is None:
            restore_rng_state(state["rng"], self.generator)
        else:
            restore_rng_state(state["rank_rng"][self.distributed.rank], self.generator)

    def save_checkpoint(self) -> None:
        """Writes the resume state to ``config.checkpoint_path`` (main process only)."""
        if not self.config.checkpoint_path:
            return
        if self.distributed is None:
            save_checkpoint(self.config.checkpoint_path, self.state_dict())
            return
        rank_rng = self.distributed.gather_rng_states(self.generator)  # every rank takes part
        if self._is_main():
            state = self.state_dict()
            state.update(world_size=self.distributed.world_size, rank_rng=rank_rng)
            save_checkpoint(self.config.checkpoint_path, state)
        self.distributed.barrier()  # the file is complete when any rank returns


class _MixupForward(nn.Module):
    """Features of both images in one pass, mixed, then the head (one module for DDP)."""

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        both = self.features(torch.cat([first, second]))
        first_features, second_features = both[: first.shape[0]], both[first.shape[0] :]
        return self.head(lam * first_features + (1 - lam) * second_features)


def finetune(
    model: nn.Module,
    train: Any,
    val: Any,
    objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str | None = None,
    config: FinetuneConfig | dict[str, Any] | None = None,
    *,
    unlabelled: Any = None,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    resume: str | Path | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    distributed: Any = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tunes ``model`` with SelMix for ``objective``.

    Args:
        model: any classifier that splits into a feature extractor and a linear head
            (see :func:`selmix.split_model`); trained in place.
        train: the labelled training set (a selmix dataset or any map-style (x, y) dataset).
        val: the validation set; every class must be present.
        objective: a name from :func:`selmix.list_objectives`, an :class:`Objective`, or a
            differentiable function of the confusion matrix. Default: ``config.objective``.
        config: a :class:`FinetuneConfig` or a dict of its fields.
        unlabelled: unlabelled samples for semi-supervised SelMix (x2 is drawn from those
            whose current pseudo-label is j).
        features, head: an explicit split of the model.
        resume: a checkpoint written by a previous run with the same settings.
        callback: called with each feedback record.
        distributed: a :class:`selmix.distributed.DistributedContext` (under torchrun).
        **overrides: any :class:`FinetuneConfig` field, e.g. ``steps=2000, device="cuda"``.

    Returns:
        A :class:`FinetuneResult`.
    """
    if isinstance(objective, str):
        overrides = {"objective": objective, **overrides}
        objective = None
    elif objective is not None:
        objective = as_objective(objective)
        overrides = {"objective": objective.name, **overrides}
    config = FinetuneConfig.resolve(config, overrides)
    trainer = Trainer(
        model, train, val, objective, config, unlabelled=unlabelled, features=features,
        head=head, callback=callback, distributed=distributed,
    )  # fmt: skip
    if resume is not None:
        trainer.load_state_dict(load_checkpoint(resume))
    return trainer.run()
