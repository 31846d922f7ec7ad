"""The SelMix fine-tuning loop: :class:`Trainer` and :func:`finetune` (docs/maths.md section 5,
paper Alg. 1; the package docstring of :mod:`selmix.finetune` describes the loop)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selmix._progress import progress_bar
from selmix.core.metrics import all_metrics
from selmix.core.mixing import get_mixup, mixed_cross_entropy, second_labels
from selmix.core.objectives import Objective
from selmix.core.policy import effective_pairs, policy_entropy
from selmix.core.sampler import PairSampler
from selmix.core.selection import ObjectiveScore, objective_score, selection_tolerance
from selmix.devices import state_to_host, to_host
from selmix.engine.collective import Collective
from selmix.engine.config import FinetuneConfig, plain_data
from selmix.engine.evaluate import Evaluation
from selmix.engine.feedback import feedback_step
from selmix.engine.loggers import TensorBoardLogger
from selmix.engine.optim import split_sgd_cosine
from selmix.engine.precision import grad_scaler
from selmix.engine.timing import PhaseTimings, backbone_feedback_every, parse_duration
from selmix.engine.views import ModelView
from selmix.finetune.best import _BestSoFar
from selmix.finetune.build import RunParts, build_run
from selmix.finetune.head_step import _closed_form_head_step, _scaled_step
from selmix.finetune.monitor import (
    _append_json_line,
    _batch_must_fit,
    _check_finite,
    _LossMonitor,
    _pseudo_label_report,
    _rewrite_log,
)
from selmix.finetune.result import FinetuneResult
from selmix.finetune.run_state import _weights_are_finite, check_resume
from selmix.models import ModelSplit
from selmix.models.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _phase_schedule(config: FinetuneConfig, head_phase: bool) -> tuple[int, float]:
    """The length and head learning rate of a phase's cosine schedule
    (:meth:`Trainer._start_phase`)."""
    if config.frozen_backbone or head_phase:
        return (config.head_first if head_phase else config.steps), config.lr_head
    return config.steps - config.head_first, config.backbone_phase_lr_head


class Trainer:
    """One SelMix fine-tuning run; :func:`finetune` is the usual entry point.

    The Trainer trains, feeds back and selects; :func:`build_run` prepares the run, and
    ``Trainer(model, train, val, objective, config, ...)`` is
    ``Trainer.from_parts(build_run(model, train, val, objective, config, ...), callback)``.

    Args:
        model: the classifier to fine-tune (changed in place).
        train: labelled training set.
        val: validation set with every class present.
        objective: objective name, :class:`Objective` or differentiable callable of C
            (None: ``config.objective``); resolved with :func:`resolve_objective`.
        config: the run's settings.
        unlabelled: optional unlabelled set (semi-supervised); its labels are never read.
        features, head: an explicit split of ``model``.
        callback: called with each feedback record, plus the gain matrix under ``"gain"``
            (Tensor[K, K]; the logged record has no gain).
        distributed: the run's :class:`selmix.engine.collective.Collective` (default: one process).
        identity: plain data naming what the run was made from beyond its settings and
            data (e.g. the data source and the starting checkpoint); stored in the
            checkpoints, and a resume must match it (:func:`check_resume`).
        initialise_head_weights: fit the start head of ``config.head_init``; False when a
            resume brings the head in its weights.
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
        distributed: Collective | None = None,
        identity: dict[str, Any] | None = None,
        initialise_head_weights: bool = True,
    ) -> None:
        parts = build_run(
            model, train, val, objective, config, unlabelled=unlabelled, features=features,
            head=head, distributed=distributed, identity=identity,
            initialise_head_weights=initialise_head_weights,
        )  # fmt: skip
        self._adopt(parts, callback)

    @classmethod
    def from_parts(
        cls, parts: RunParts, callback: Callable[[dict[str, Any]], None] | None = None
    ) -> Trainer:
        """The Trainer of a run :func:`build_run` prepared (``callback`` as above)."""
        trainer = cls.__new__(cls)
        trainer._adopt(parts, callback)
        return trainer

    def _adopt(self, parts: RunParts, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Takes the built parts and sets up the training state at step 0."""
        self.parts = parts
        self.callback = callback
        # None: feature mixup, done by the views (selmix.core.mixing)
        self.mixup_operation = get_mixup(parts.config.mixup)
        self.pseudo_labels: torch.Tensor | None = None
        num_classes = parts.num_classes
        self.distribution = torch.full((num_classes,) * 2, 1.0 / num_classes**2)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.gains: list[tuple[int, torch.Tensor]] = []
        # steps tied on the metric within its noise: the one with the highest mean recall
        self.best = _BestSoFar(
            selection_tolerance(parts.objective, parts.val_counts, parts.config.select_tolerance)
        )
        self.losses = _LossMonitor(num_classes, parts.collective.is_main)
        # (path, step) of the last checkpoint this run wrote with finite weights
        self.good_checkpoint: tuple[str, int] | None = None
        self.timings = PhaseTimings()
        self._start_phase(head_phase=parts.config.head_first > 0)

    # -- the built parts (RunParts), read-only --------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.parts.model

    @property
    def split(self) -> ModelSplit:
        return self.parts.split

    @property
    def config(self) -> FinetuneConfig:
        return self.parts.config

    @property
    def objective(self) -> Objective:
        return self.parts.objective

    @property
    def train(self) -> Any:
        return self.parts.train

    @property
    def val(self) -> Any:
        return self.parts.val

    @property
    def unlabelled(self) -> Any:
        return self.parts.unlabelled

    @property
    def collective(self) -> Collective:
        return self.parts.collective

    @property
    def device(self) -> torch.device:
        return self.parts.device

    @property
    def generator(self) -> torch.Generator:
        return self.parts.generator

    @property
    def sampler(self) -> PairSampler:
        return self.parts.sampler

    @property
    def data(self) -> dict[str, Any]:
        return self.parts.data

    @property
    def num_classes(self) -> int:
        return self.parts.num_classes

    @property
    def backbone_feedback_every(self) -> int:
        """Steps between feedback steps in the whole-model phase."""
        config = self.config
        return config.backbone_feedback_every or backbone_feedback_every(
            config.feedback_every, len(self.val), config.batch_size
        )

    def _start_phase(self, head_phase: bool) -> None:
        """The view, optimiser and schedule of a phase of the run.

        Frozen backbone: one phase, the head on cached features. Backbone fine-tuned: a
        head phase (``config.head_first`` steps on cached features, when > 0), then the
        whole model for the remaining steps from where the head phase ended, with the head
        at :attr:`FinetuneConfig.backbone_phase_lr_head`; each phase has its own cosine
        schedule. The step counter, the feedback steps and the best-step selection run
        across the phases.
        """
        config = self.config
        frozen = config.frozen_backbone or head_phase
        self.head_phase = head_phase
        self.view: ModelView = self.parts.view(frozen)
        steps, lr_head = _phase_schedule(config, head_phase)
        self.optimizer, self.scheduler = split_sgd_cosine(
            self.split, steps, lr_head, config.backbone_lr if self.view.trains_backbone else None,
            config.momentum, config.weight_decay,
        )  # fmt: skip
        self.view.attach(self.optimizer)
        # loss scaling for fp16 (a pass-through otherwise); its state is checkpointed
        self.scaler = grad_scaler(config.precision, self.device)
        self._head_step = _closed_form_head_step(self.view, self.collective)

    # -- feedback -----------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """``"frozen"``, ``"head"`` (the head-first phase) or ``"backbone"``."""
        if self.config.frozen_backbone:
            return "frozen"
        return "head" if self.head_phase else "backbone"

    def feedback_due(self) -> bool:
        """Whether the current step is a feedback step: every ``feedback_every`` steps on
        cached features, every :attr:`backbone_feedback_every` steps from the start of the
        whole-model phase."""
        if self.config.frozen_backbone or self.step <= self.config.head_first:
            return self.step % self.config.feedback_every == 0
        return (self.step - self.config.head_first) % self.backbone_feedback_every == 0

    def _evaluate_val(self) -> Evaluation:
        return self.view.evaluate(self.val, soft=self.config.soft_confusion)

    def feedback(self) -> dict[str, Any]:
        """Evaluates, scores the model, updates multipliers, gain and policy; returns the
        logged record."""
        config = self.config
        started = time.perf_counter()
        evaluation = self._evaluate_val()
        # the objective, multipliers and gain see the (optionally smoothed or shrunk)
        # estimate of C; the logged metrics are those of the raw counts
        result = feedback_step(self.objective, evaluation, self.split.head, config)
        # the score (which step is best) is the objective's metric of the raw counts, or of
        # the pooled estimate when the run pools the classes (shrinkage): with a few
        # samples per class the best raw score is mostly the luckiest; the same on every
        # rank either way (the counts are summed over ranks)
        scored = result.estimate if result.pooled else evaluation.counts
        score = objective_score(self.objective, scored)
        self.best.offer(score, self.step, self.model)
        value, gain, self.distribution = result.value, result.gain, result.distribution
        record = self._feedback_record(evaluation, score, value, gain)
        if self.parts.head_init is not None and not self.history:
            record["head_init"] = self.parts.head_init
        if self.unlabelled is not None:
            record.update(self._refresh_pseudo_labels())
        record["feedback_seconds"] = time.perf_counter() - started
        if self.num_classes <= 200 or not self.gains or self.step == config.steps:
            self.gains.append((self.step, gain))
        self.losses.warn_if_diverging(record["train_loss"], self.step)
        self.history.append(record)
        if config.log_path and self.collective.is_main:
            _append_json_line(config.log_path, record)
        if self.callback is not None:
            # the gain matrix goes to the callback (e.g. TensorBoardLogger draws it) but
            # not to the log: it is K x K numbers per feedback step
            self.callback({**record, "gain": gain})
        return record

    def _refresh_pseudo_labels(self) -> dict[str, Any]:
        self.model.eval()
        self.pseudo_labels = self.view.predict(self.unlabelled)
        self.sampler.set_second_labels(self.pseudo_labels)
        return _pseudo_label_report(self.pseudo_labels, self.unlabelled, self.num_classes)

    def _feedback_record(
        self, evaluation: Evaluation, score: ObjectiveScore, value: float, gain: torch.Tensor
    ) -> dict[str, Any]:
        """What a feedback step logs (before the pseudo-label report and its duration); takes
        the mean training loss since the last feedback step."""
        groups = self.optimizer.param_groups
        return {
            "step": self.step,
            "objective": value,
            "score": score.to_dict(),
            "best_step": self.best.step,
            "metrics": all_metrics(evaluation.confusion, self.config.head_classes),
            "multipliers": plain_data(self.objective.multipliers),
            "max_gain": float(gain.max()),
            "policy_entropy": policy_entropy(self.distribution),
            "effective_pairs": effective_pairs(self.distribution),
            "lr_head": groups[0]["lr"],
            "lr_backbone": groups[1]["lr"] if len(groups) > 1 else 0.0,
            "train_loss": self.losses.take_mean(),
        }

    # -- training -----------------------------------------------------------------------
    def train_step(self) -> float:
        """One SGD step on a batch of mixups drawn from the current distribution."""
        config = self.config
        batch_size = self.collective.local_batch_size(config.batch_size)
        first, second, from_second, labels = self.sampler.sample(self.distribution, batch_size)
        lam = config.lam_min + (1 - config.lam_min) * torch.rand(
            batch_size, generator=self.generator
        )
        if self._head_step is None:
            # batch norm frozen: running statistics, no updates (the closed-form head step
            # calls no module, and eval() walking every module costs more than its maths)
            self.model.eval()
        lam = lam.to(self.device)[:, None]
        labels = labels.to(self.device)
        if self._head_step is not None:
            mixed = self.view.mixed_features(first, second, from_second, lam)
            loss_value = self._head_step.loss_and_gradients(mixed, labels)
            _check_finite(loss_value, self.step, self.good_checkpoint)
            self.optimizer.step()
        elif self.mixup_operation is not None and self.view.trains_backbone:
            # an input-space mix (selmix.core.mixing); the head-first phase mixes features
            logits, weight = self.view.mixed_input_logits(
                first, second, from_second, lam, self.generator, self.mixup_operation
            )
            loss = mixed_cross_entropy(
                logits, labels, lambda: second_labels(
                    self.train.labels, self.pseudo_labels, second, from_second
                ), weight,
            )  # fmt: skip
            loss_value = float(loss.detach())
            _check_finite(loss_value, self.step, self.good_checkpoint)
            _scaled_step(loss, self.optimizer, self.scaler)
        else:
            logits = self.view.mixed_logits(first, second, from_second, lam, self.generator)
            # the loss in float32 whatever the precision of the forward pass
            loss = F.cross_entropy(logits.float(), labels)
            loss_value = float(loss.detach())
            _check_finite(loss_value, self.step, self.good_checkpoint)
            _scaled_step(loss, self.optimizer, self.scaler)
        self.scheduler.step()
        self.losses.add(loss_value)
        return loss_value

    def run(self) -> FinetuneResult:
        """Runs from the current step to ``config.steps`` (with a last feedback at the end,
        or until ``patience`` feedback steps bring no better score), then selects."""
        config = self.config
        if config.log_path and self.collective.is_main:
            _rewrite_log(config.log_path, self.history)
        progress = progress_bar(
            config.steps, f"selmix {self.objective.name}",
            config.progress and self.collective.is_main, initial=self.step, leave=False,
        )  # fmt: skip
        first_step = True
        budget = None if config.max_time is None else parse_duration("max_time", config.max_time)
        deadline = None if budget is None else time.monotonic() + budget
        self.stop_reason = None
        try:
            while self.step < config.steps and not self.best.exhausted(config.patience):
                if deadline is not None and self._out_of_time(deadline):
                    self.stop_reason = "max_time"
                    break
                done = bool(self.history) and self.history[-1]["step"] == self.step
                if self.feedback_due() and not done:
                    started = time.perf_counter()
                    progress.set_postfix(objective=f"{self.feedback()['objective']:.4f}")
                    self.timings.record(self.phase, "feedback", time.perf_counter() - started)
                    if self.best.exhausted(config.patience):
                        break
                if self.head_phase and self.step >= config.head_first:
                    self._start_phase(head_phase=False)
                    first_step = True  # the backbone's first step is where memory runs out
                started = time.perf_counter()
                if first_step:
                    self._first_train_step()
                    first_step = False
                else:
                    self.train_step()
                self.timings.record(self.phase, "train", time.perf_counter() - started)
                self.step += 1
                progress.update(1)
                every = config.checkpoint_every
                if every and self.step % every == 0 and self.step < config.steps:
                    self.save_checkpoint()
            if not self.history or self.history[-1]["step"] != self.step:
                started = time.perf_counter()
                self.feedback()
                self.timings.record(self.phase, "feedback", time.perf_counter() - started)
        finally:
            progress.close()
        self.save_checkpoint()
        return self._select()

    def _out_of_time(self, deadline: float) -> bool:
        """Whether ``max_time`` ran out; under torchrun every rank stops at the same step."""
        late = time.monotonic() >= deadline
        if self.collective.world_size > 1:
            flag = torch.tensor([float(late)], device=self.device)
            late = bool(self.collective.all_reduce(flag).item() > 0)
        return late

    def _select(self) -> FinetuneResult:
        """The finished run's result, with the weights of the step ``config.select`` picks
        (the best by validation score, or the last) loaded into the model."""
        last = state_to_host(self.model)
        best = self.best
        selected = best.step if self.config.select == "best" else self.step
        if self.config.select == "best":
            self.model.load_state_dict(best.weights)
        return FinetuneResult(
            self.model, self.split, self.objective, self.config, self.history,
            self.gains, selected_step=selected, best_step=best.step, last_step=self.step,
            best_state=best.weights, last_state=last,
            head_init=self.history[0].get("head_init") if self.history else None,
            timings=self.timings.to_dict(), hardware=self.parts.hardware.to_dict(),
            stop_reason=getattr(self, "stop_reason", None),
        )  # fmt: skip

    def _first_train_step(self) -> None:
        """The first step, where a batch too large for the memory shows: one clear error."""
        with _batch_must_fit(self.config.batch_size, self.device):
            self.train_step()

    # -- state ----------------------------------------------------------------------------
    @property
    def start_loss(self) -> float | None:
        """The first training step's loss (the divergence warning's reference)."""
        return self.losses.start_loss

    @property
    def diverged_step(self) -> int | None:
        """The feedback step at which the divergence warning was raised, if it was."""
        return self.losses.diverged_step

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as ``weights_only``-loadable data (the keys of the
        ``selmix-finetune-v1`` format)."""
        return {
            "format": "selmix-finetune-v1",
            "step": self.step,
            "head_phase": self.head_phase,
            "config": self.config.to_dict(),
            "model": to_host(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "distribution": self.distribution.clone(),
            "pseudo_labels": self.pseudo_labels,
            "history": self.history,
            "gains": [(step, gain.clone()) for step, gain in self.gains],
            "best": self.best.state_dict(),
            "rng": capture_rng_state(self.generator),
            "world_size": self.collective.world_size,
            "data": self.data,
            "identity": self.parts.identity,
            **self.losses.state_dict(),  # "loss", "start_loss", "diverged_step"
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved (the run settings, the data and the
        identity must agree: :func:`check_resume`)."""
        check_resume(
            state, self.config, world_size=self.collective.world_size, data=self.data,
            identity=self.parts.identity,
        )  # fmt: skip
        if self.head_phase and not state.get("head_phase", False):
            self._start_phase(head_phase=False)  # the optimiser state is the backbone phase's
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(
                f"`resume` checkpoint does not match the model: {str(error).splitlines()[0]}"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # checkpoints of selmix <= 0.2 have none (fp32 only)
            self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state["objective"])
        self.distribution = state["distribution"]
        self.pseudo_labels = state["pseudo_labels"]
        if self.pseudo_labels is not None:
            self.sampler.set_second_labels(self.pseudo_labels)
        self.history = list(state["history"])
        self.gains = [(int(step), gain) for step, gain in state["gains"]]
        if "best" in state:
            self.best.load_state_dict(state["best"])
        self.step = int(state["step"])
        self.losses.load_state_dict(state)
        rank_rng = state.get("rank_rng") or [state["rng"]]
        restore_rng_state(rank_rng[self.collective.rank], self.generator)

    def save_checkpoint(self) -> None:
        """Writes the resume state to ``config.checkpoint_path`` (main process only).

        Weights that are no longer finite are not written: the previous checkpoint stays,
        so the one a failed run names can always be resumed from.
        """
        path = self.config.checkpoint_path
        if not path:
            return
        rank_rng = self.collective.gather_rng_states(self.generator)  # every rank takes part
        if self.collective.is_main and _weights_are_finite(self.model):
            save_checkpoint(path, {**self.state_dict(), "rank_rng": rank_rng})
            self.good_checkpoint = (path, self.step)
        self.collective.barrier()  # the file is complete when any rank returns


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
    resume: str | Path | dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    distributed: Collective | None = None,
    identity: dict[str, Any] | None = None,
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
        resume: a checkpoint written by a previous run with the same settings and data
            (its path, or the dict :func:`selmix.models.checkpoint.load_checkpoint` returned).
        callback: called with each feedback record and its gain matrix (``"gain"``).
        distributed: a :class:`selmix.engine.collective.Collective`, e.g. the
            :class:`selmix.engine.distributed.DistributedContext` of a torchrun process.
        identity: what the run was made from beyond its settings and data, checked on
            resume (see :class:`Trainer`).
        **overrides: any :class:`FinetuneConfig` field, e.g. ``steps=2000, device="cuda"``.

    Returns:
        A :class:`FinetuneResult`; the model holds the selected step's weights.
    """
    if isinstance(objective, str):
        overrides = {"objective": objective, **overrides}
        objective = None
    config = FinetuneConfig.resolve(config, overrides)
    logger = None
    if config.tensorboard_dir and (distributed is None or distributed.is_main):
        logger = TensorBoardLogger(config.tensorboard_dir)
        callback = _both(callback, logger)
    try:
        trainer = Trainer(
            model, train, val, objective, config, unlabelled=unlabelled, features=features,
            head=head, callback=callback, distributed=distributed, identity=identity,
            initialise_head_weights=resume is None,
        )  # fmt: skip
        if resume is not None:
            state = resume if isinstance(resume, dict) else load_checkpoint(resume)
            trainer.load_state_dict(state)
            if not isinstance(resume, dict) and _weights_are_finite(trainer.model):
                trainer.good_checkpoint = (str(resume), trainer.step)
        return trainer.run()
    finally:
        if logger is not None:
            logger.close()


def _both(
    first: Callable[[dict[str, Any]], None] | None, second: Callable[[dict[str, Any]], None]
) -> Callable[[dict[str, Any]], None]:
    if first is None:
        return second

    def call(record: dict[str, Any]) -> None:
        first(record)
        second(record)

    return call
