"""SelMix's feedback step and pair sampling, for a training loop you own.

:func:`selmix.finetune` runs the whole SelMix loop. When the loop is yours (your optimiser,
your mixed precision, your logging, another framework), the two things SelMix adds are:

1. every few steps, a *feedback* step: evaluate the validation set (confusion matrix C and
   class-mean features), update the objective's multipliers, compute the gain matrix and
   from it the mixup distribution P over class pairs (docs/maths.md section 5);
2. every step, draw the batch as pairs ``(x1 of class i, x2 of class j)`` with
   ``(i, j) ~ P``, mix their *features* with ``lam ~ U[lam_min, 1]`` and take a step on the
   cross-entropy of ``head(lam g(x1) + (1 - lam) g(x2))`` with label i.

:class:`SelMixFeedback` holds the state between the two (objective and multipliers, P,
the random generator)::

    feedback = SelMixFeedback("min_recall", train.labels, seed=0)
    for step in range(steps):
        if step % 10 == 0:
            feedback.update(model, val)                  # evaluate -> objective -> gain -> P
        pairs = feedback.sample_pairs(128)               # indices into train, labels, lam
        x1, _ = train.batch(pairs.first, augment=True)
        x2, _ = train.batch(pairs.second, augment=True)
        mixed = pairs.lam[:, None] * features(x1) + (1 - pairs.lam[:, None]) * features(x2)
        loss = F.cross_entropy(head(mixed), pairs.labels)
        ...                                              # your backward and optimiser step

``examples/own_loop.py`` is a complete, runnable version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from selmix._validation import (
    check_bool,
    check_choice,
    check_in_range,
    check_int,
    check_positive,
)
from selmix.core.estimates import SHRINKAGE, pools_classes, shrunk_confusion
from selmix.core.gain import gain_matrix
from selmix.core.metrics import all_metrics
from selmix.core.objectives import Objective, as_objective, get_objective
from selmix.core.policy import (
    POLICIES,
    effective_pairs,
    min_recall_uniform_mix,
    mixup_distribution,
    policy_entropy,
)
from selmix.core.sampler import PairSampler
from selmix.devices import to_host
from selmix.engine.evaluate import Evaluation, evaluate
from selmix.models import split_model

__all__ = ["FeedbackResult", "MixupPairs", "SelMixFeedback", "feedback_step", "smoothed_confusion"]


def smoothed_confusion(
    counts: torch.Tensor, pseudo_count: float, pool: bool = False
) -> torch.Tensor:
    """The estimate of C from validation counts: Tensor[K, K] float64 summing to 1.

    ``(counts + pseudo_count) / total``, then, with ``pool``, every row pulled towards the
    pooled classes (:func:`selmix.core.estimates.shrunk_confusion`).
    """
    smoothed = counts.double() + pseudo_count
    if pool:
        return shrunk_confusion(smoothed)
    return smoothed / smoothed.sum()


class FeedbackResult(NamedTuple):
    """What one feedback computation gives (:func:`feedback_step`).

    Attributes:
        estimate: float64 Tensor[K, K], the estimate of C the objective saw (summing to 1).
        pooled: whether ``estimate`` pools the classes (``shrinkage``); the run then
            also selects its best step by it.
        value: the objective's value at ``estimate`` (after the multiplier update).
        gain: float Tensor[K, K] on the CPU, the gain matrix.
        distribution: Tensor[K, K] on the CPU, the new mixup distribution P.
    """

    estimate: torch.Tensor
    pooled: bool
    value: float
    gain: torch.Tensor
    distribution: torch.Tensor


def feedback_step(
    objective: Objective, evaluation: Evaluation, head: nn.Linear, settings: Any
) -> FeedbackResult:
    """The feedback computation of SelMix: counts -> estimate -> multipliers -> gain -> P.

    The one implementation that :class:`selmix.Trainer` and :class:`SelMixFeedback` both
    call (docs/maths.md section 5). Everything runs outside autocast, in float32 / float64.

    Args:
        objective: the objective; its multipliers are updated in place.
        evaluation: the validation set's confusion counts and class-mean features.
        head: the linear head ``nn.Linear(d, K)`` (the gain's logit directions).
        settings: anything with ``confusion_smoothing``, ``shrinkage``, ``mix`` (E[lam]),
            ``gain_scale``, ``policy``, ``normalize_gain``, ``soft_confusion``, ``uniform_mix`` and
            ``multiplier_step`` (a :class:`selmix.FinetuneConfig` or a
            :class:`SelMixFeedback`).

    Returns:
        A :class:`FeedbackResult`.
    """
    pool = pools_classes(settings.shrinkage, objective)
    estimate = smoothed_confusion(evaluation.counts, settings.confusion_smoothing, pool)
    objective.update(estimate, step_size=settings.multiplier_step)
    with torch.no_grad():
        value = float(objective(estimate))
    prototypes = evaluation.prototypes.to(head.weight.device)
    soft = evaluation.soft_counts if settings.soft_confusion else None
    gain = gain_matrix(objective, estimate, prototypes, head, settings.mix, soft_confusion=soft)
    distribution = mixup_distribution(
        gain, settings.gain_scale, settings.policy, settings.normalize_gain,
        uniform_mix=settings.uniform_mix,
    )  # fmt: skip
    # the host-side pair sampler and the logs take them (selmix.devices)
    gain, distribution = to_host((gain, distribution))
    return FeedbackResult(estimate, pool, value, gain, distribution)


class MixupPairs(NamedTuple):
    """A batch of mixup pairs drawn from the current policy.

    Attributes:
        first: LongTensor[B], indices (into the training set) of x1, of class ``labels``.
        second: LongTensor[B], indices of x2, of the class the policy paired with it.
        labels: LongTensor[B], the label i of each pair (the class of x1).
        lam: float Tensor[B], the weight of x1's features, drawn from U[lam_min, 1].
    """

    first: torch.Tensor
    second: torch.Tensor
    labels: torch.Tensor
    lam: torch.Tensor


class SelMixFeedback:
    """The objective, multipliers and mixup policy of SelMix, updated from validation.

    Args:
        objective: a registered name (see :func:`selmix.list_objectives`), an
            :class:`~selmix.Objective` or a differentiable function of C.
        train_labels: integer Tensor[N] of the training labels (the pairs index into it).
        num_classes: K; defaults to ``max(train_labels) + 1``.
        objective_params: hyper-parameters of a named objective, e.g. ``{"rate": 50}``.
        policy: ``"selmix"`` (``P ∝ exp(s G)`` on positive gains), ``"uniform"`` or
            ``"greedy"``.
        gain_scale: s.
        normalize_gain: divide the gain by ``max |G|`` before the policy.
        lam_min: mixing weights are drawn from U[lam_min, 1].
        confusion_smoothing: pseudo-count added to each validation confusion cell before
            the multipliers and the gain (0 is the paper).
        soft_confusion: use the validation softmax probabilities in the gain's derivative
            factor instead of the counts.
        uniform_mix: share eps of the uniform policy mixed into P; None: 0.5 for min recall
            and min head/tail recall, 0 otherwise (``selmix.finetune`` knows the validation
            set and sets it from its size: :func:`selmix.core.policy.min_recall_uniform_mix`).
        multiplier_step: step a of the multiplier update ``l <- (1 - a) l + a l_new``.
        shrinkage: ``"auto"`` pulls each class's row of the counts towards the pooled
            classes (:func:`selmix.core.estimates.shrunk_confusion`) for objectives of per-class
            recalls (min recall, H-mean, G-mean), ``"on"`` for every objective, ``"none"``
            never.

    The defaults are those of :class:`selmix.FinetuneConfig` (the robust defaults of
    docs/DESIGN.md); ``gain_scale=10, normalize_gain=False, confusion_smoothing=0`` is the
    paper.
        head_classes: head classes for the head/tail metrics in the records.
        seed: seeds the pair and lam draws (same seed, same pairs).

    Attributes:
        objective: the objective (its multipliers follow the updates).
        distribution: Tensor[K, K], the current P (uniform before the first update).
        history: the records of the updates so far.
    """

    def __init__(
        self,
        objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str,
        train_labels: torch.Tensor | Sequence[int],
        num_classes: int | None = None,
        *,
        objective_params: dict[str, Any] | None = None,
        policy: str = "selmix",
        gain_scale: float = 3.0,
        normalize_gain: bool = True,
        lam_min: float = 0.6,
        confusion_smoothing: float = 1.0,
        soft_confusion: bool = False,
        uniform_mix: float | None = None,
        multiplier_step: float = 1.0,
        shrinkage: str = "auto",
        head_classes: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        labels = torch.as_tensor(train_labels).long().cpu()
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(
                f"`train_labels` must be a non-empty Tensor[N], got {tuple(labels.shape)}"
            )
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        if isinstance(objective, str):
            objective = get_objective(objective, **(objective_params or {}))
        elif objective_params:
            raise ValueError("`objective_params` must be empty when `objective` is not a name")
        self.objective = as_objective(objective)
        self.policy = check_choice("policy", policy, POLICIES)
        self.gain_scale = check_positive("gain_scale", gain_scale)
        self.normalize_gain = check_bool("normalize_gain", normalize_gain)
        self.lam_min = check_in_range("lam_min", lam_min, 0.0, 1.0)
        self.confusion_smoothing = check_positive(
            "confusion_smoothing", confusion_smoothing, strict=False
        )
        self.soft_confusion = check_bool("soft_confusion", soft_confusion)
        if uniform_mix is None:
            worst_case = self.objective.worst_case
            uniform_mix = min_recall_uniform_mix(None) if worst_case else 0.0
        self.uniform_mix = check_in_range("uniform_mix", uniform_mix, 0.0, 1.0)
        self.multiplier_step = check_in_range("multiplier_step", multiplier_step, 0.0, 1.0)
        if self.multiplier_step == 0:
            raise ValueError("`multiplier_step` must be in (0, 1], got 0")
        self.shrinkage = check_choice("shrinkage", shrinkage, SHRINKAGE)
        self.head_classes = None if head_classes is None else list(head_classes)
        self.generator = torch.Generator().manual_seed(check_int("seed", seed))
        self.sampler = PairSampler(labels, None, self.num_classes, self.generator)
        self.distribution = torch.full((self.num_classes,) * 2, 1.0 / self.num_classes**2)
        self.history: list[dict[str, Any]] = []

    @property
    def mix(self) -> float:
        """m = E[lam] = (1 + lam_min) / 2, used by the gain."""
        return (1 + self.lam_min) / 2

    def update(
        self,
        model: nn.Module | None,
        val: Any,
        *,
        features: nn.Module | None = None,
        head: nn.Linear | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 512,
        step: int | None = None,
    ) -> dict[str, Any]:
        """The feedback step: evaluates ``val`` and updates the multipliers and P.

        The model is evaluated in eval mode (and put back in its previous mode).

        Args:
            model: the classifier (split with :func:`selmix.split_model`), or None with
                ``features=`` and ``head=``.
            val: the validation set (every class present).
            features, head: an explicit split of the model.
            device, batch_size: of the evaluation.
            step: the training step, stored in the record (default: the update's number).

        Returns:
            The record (see :meth:`update_from_evaluation`).
        """

        split = split_model(model, features=features, head=head)
        owner = model if model is not None else nn.ModuleList([split.features, split.head])
        evaluation = evaluate(
            owner, val, device, batch_size, features=split.features, head=split.head
        )
        return self.update_from_evaluation(evaluation, split.head, step=step)

    def update_from_evaluation(
        self, evaluation: Evaluation, head: nn.Linear, step: int | None = None
    ) -> dict[str, Any]:
        """The feedback step from an evaluation you made (e.g. all-reduced across processes).

        Args:
            evaluation: confusion counts and class-mean features of the validation set
                (:func:`selmix.evaluate`).
            head: the linear head, ``nn.Linear(d, K)``.
            step: stored in the record.

        Returns:
            ``{"step", "objective", "metrics", "multipliers", "max_gain", "policy_entropy",
            "effective_pairs", "gain"}``: the fields of ``finetune``'s log records and the
            gain matrix (Tensor[K, K], e.g. for :class:`selmix.engine.loggers.TensorBoardLogger`).
        """
        if evaluation.counts.shape != (self.num_classes, self.num_classes):
            raise ValueError(
                f"`evaluation` must be for {self.num_classes} classes, got counts of shape "
                f"{tuple(evaluation.counts.shape)}"
            )
        result = feedback_step(self.objective, evaluation, head, self)
        value, gain, self.distribution = result.value, result.gain, result.distribution
        multipliers = self.objective.multipliers
        record = {
            "step": len(self.history) if step is None else int(step),
            "objective": value,
            "metrics": all_metrics(evaluation.confusion, self.head_classes),
            "multipliers": None if multipliers is None else multipliers.tolist(),
            "max_gain": float(gain.max()),
            "policy_entropy": policy_entropy(self.distribution),
            "effective_pairs": effective_pairs(self.distribution),
            "gain": gain,
        }
        self.history.append(record)
        return record

    def sample_pairs(self, batch_size: int) -> MixupPairs:
        """Draws B pairs ``(i, j) ~ P``, a sample of each class, and the mixing weights."""
        batch_size = check_int("batch_size", batch_size, minimum=1)
        first, second, _, labels = self.sampler.sample(self.distribution, batch_size)
        lam = self.lam_min + (1 - self.lam_min) * torch.rand(batch_size, generator=self.generator)
        return MixupPairs(first, second, labels, lam)

    def state_dict(self) -> dict[str, Any]:
        """Objective state, P and the generator, as ``weights_only``-loadable data."""
        return {
            "objective": self.objective.state_dict(),
            "distribution": self.distribution.clone(),
            "generator": self.generator.get_state(),
            "updates": len(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved."""
        self.objective.load_state_dict(state["objective"])
        self.distribution = state["distribution"].clone()
        self.generator.set_state(state["generator"])
