"""Selection: the best feedback step so far (:class:`_BestSoFar`), its weights, early
stopping on ``patience``, and the step a finished run returns (``config.select``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selmix.core.selection import ObjectiveScore, undominated_index
from selmix.devices import state_to_host


def _score_of(state: dict[str, Any]) -> ObjectiveScore:
    return ObjectiveScore(
        state["metric"], state["coverage"], state["target"], state.get("tiebreak")
    )


class _BestSoFar:
    """The best feedback step so far by validation score, with a CPU copy of its weights.

    With a ``tolerance`` (:func:`selmix.core.selection.selection_tolerance`) and scores with a
    tie-break, the best is :func:`selmix.core.selection.undominated_index` over the steps so far:
    among the steps whose metric is within ``tolerance`` of the highest, the highest
    tie-break. It keeps the weights of the steps that can still be that step: those within
    ``tolerance`` of the highest metric and not dominated by another (a step with both a
    metric and a tie-break at least as high); the highest metric only grows, so a step
    that falls out never comes back.
    """

    def __init__(self, tolerance: float = 0.0) -> None:
        self.tolerance = float(tolerance)
        self.score: ObjectiveScore | None = None
        self.step = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.stale = 0  # feedback steps since the best
        # (score, step, weights) of the steps that may still be selected (tolerance > 0)
        self.front: list[tuple[ObjectiveScore, int, dict[str, torch.Tensor]]] = []

    def offer(self, score: ObjectiveScore, step: int, model: nn.Module) -> bool:
        """Keeps ``model``'s weights if ``score`` beats the best (ties keep the earlier)."""
        if self.tolerance > 0 and score.tiebreak is not None and score.coverage is None:
            return self._offer_within_tolerance(score, step, model)
        if self.score is not None and not score > self.score:
            self.stale += 1
            return False
        self.score, self.step, self.stale = score, step, 0
        self.weights = _copy(model)
        return True

    def _offer_within_tolerance(self, score: ObjectiveScore, step: int, model: nn.Module) -> bool:
        front = [*self.front, (score, step, {})]
        top = max(s.metric for s, _, _ in front)
        front = [m for m in front if m[0].metric >= top - self.tolerance]
        front = [
            m for m in front
            if not any(_dominates(o[0], m[0]) or (o[0] == m[0] and o[1] < m[1]) for o in front)
        ]  # fmt: skip
        chosen = front[undominated_index([s for s, _, _ in front], self.tolerance)]
        if any(s is score for s, _, _ in front):
            weights = _copy(model)
            front = [(s, n, weights if s is score else w) for s, n, w in front]
            chosen = next(m for m in front if m[1] == chosen[1])
        self.front = front
        if self.score is not None and chosen[1] == self.step:
            self.stale += 1
            return False
        self.score, self.step, self.weights = chosen
        self.stale = 0
        return True

    def exhausted(self, patience: int | None) -> bool:
        """Whether ``patience`` feedback steps in a row failed to beat the best."""
        return patience is not None and self.stale >= patience

    def state_dict(self) -> dict[str, Any]:
        score = None if self.score is None else self.score.to_dict()
        return {
            "score": score, "step": self.step, "weights": self.weights, "stale": self.stale,
            "tolerance": self.tolerance,
            "front": [(s.to_dict(), n, w) for s, n, w in self.front],
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        score = state["score"]
        self.score = None if score is None else _score_of(score)
        self.step, self.weights, self.stale = state["step"], state["weights"], state["stale"]
        self.tolerance = float(state.get("tolerance", self.tolerance))
        self.front = [(_score_of(s), n, w) for s, n, w in state.get("front", [])]


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return state_to_host(model)


def _dominates(a: ObjectiveScore, b: ObjectiveScore) -> bool:
    """Whether a has a metric and a tie-break at least as high as b's, and one higher."""
    assert a.tiebreak is not None and b.tiebreak is not None
    at_least = a.metric >= b.metric and a.tiebreak >= b.tiebreak
    return at_least and (a.metric > b.metric or a.tiebreak > b.tiebreak)
