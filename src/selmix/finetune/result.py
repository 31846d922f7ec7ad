"""What a fine-tuning run returns: :class:`FinetuneResult`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix.core.objectives import Objective
from selmix.engine.config import SELECT, FinetuneConfig
from selmix.engine.evaluate import Evaluation, evaluate
from selmix.models.checkpoint import (
    save_model,
)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the fine-tuned model (the object that was passed in), holding the weights
            of the selected step (``config.select``).
        split: its (features, head) split.
        objective: the objective, with its last multipliers.
        config: the resolved configuration (head classes and objective parameters
            filled in).
        history: one record per feedback step (validation metrics, objective value and
            score, multipliers, largest gain, policy entropy, learning rates, mean loss).
        gains: ``(step, Tensor[K, K])`` gain matrices of the feedback steps (all of them for
            K <= 200, else the first and the last).
        selected_step: the step whose weights :attr:`model` holds.
        best_step: the feedback step with the best validation score (0: the start).
        last_step: the step the run ended at (before ``config.steps`` if it stopped early).
        best_state, last_state: CPU ``state_dict`` copies of the best and the last weights.
        head_init: the head the run started from and the validation scores of the
            candidates (:func:`selmix.finetune.head_init.initialise_head`); None when the
            model's own head was kept without a comparison.
        timings: wall time of training and feedback per phase
            (:class:`selmix.engine.timing.PhaseTimings`).
        hardware: what ``auto`` precision and layout resolved to
            (:class:`selmix.engine.hardware.HardwareChoice`).
        stop_reason: ``"max_time"`` when the wall-clock budget ended the run before
            ``config.steps`` (the model is then the best, or last, step so far); else None.
    """

    model: nn.Module
    split: Any
    objective: Objective
    config: FinetuneConfig
    history: list[dict[str, Any]]
    gains: list[tuple[int, torch.Tensor]]
    selected_step: int = 0
    best_step: int = 0
    last_step: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    last_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    head_init: dict[str, Any] | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None

    def model_at(self, which: str) -> nn.Module:
        """A copy of the model with the ``"best"`` or the ``"last"`` weights."""
        if which not in SELECT:
            raise ValueError(f"`which` must be 'best' or 'last', got {which!r}")
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.best_state if which == "best" else self.last_state)
        return model

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
