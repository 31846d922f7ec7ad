"""Selection: the best feedback step so far (:class:`_BestSoFar`), its weights, early
stopping on ``patience``, and the step a finished run returns (``config.select``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selmix.feedback import smoothed_confusion as smoothed_confusion  # re-exported (old name)
from selmix.selection import ObjectiveScore


class _BestSoFar:
    """The best feedback step so far by validation score, with a CPU copy of its weights."""

    def __init__(self) -> None:
        self.score: ObjectiveScore | None = None
        self.step = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.stale = 0  # feedback steps since the best

    def offer(self, score: ObjectiveScore, step: int, model: nn.Module) -> bool:
        """Keeps ``model``'s weights if ``score`` beats the best (ties keep the earlier)."""
        if self.score is not None and not score > self.score:
            self.stale += 1
            return False
        self.score, self.step, self.stale = score, step, 0
        self.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return True

    def exhausted(self, patience: int | None) -> bool:
        """Whether ``patience`` feedback steps in a row failed to beat the best."""
        return patience is not None and self.stale >= patience

    def state_dict(self) -> dict[str, Any]:
        score = None if self.score is None else self.score.to_dict()
        return {"score": score, "step": self.step, "weights": self.weights, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        score = state["score"]
        self.score = None if score is None else ObjectiveScore(
            score["metric"], score["coverage"], score["target"], score.get("tiebreak")
        )  # fmt: skip
        self.step, self.weights, self.stale = state["step"], state["weights"], state["stale"]
