"""Where a fine-tuning run spends its wall time, and how often the whole-model phase
evaluates.

A run has up to two phases (:class:`selmix.finetune.Trainer`): the head on cached
features (``"frozen"`` for a frozen-backbone run, ``"head"`` for the head-first phase of a
fine-tuned backbone) and the whole model (``"backbone"``). :class:`PhaseTimings` adds up
per phase the wall time of the training steps and of the feedback steps (evaluating the
validation set, multipliers, gain and policy); the run's ``timings`` (in ``metrics.json``
of ``selmix finetune``) say which share of the time feedback took.

A feedback step evaluates the whole validation set (N images, forward only); a training
step runs forward and backward on B mixups, about three forward passes each. With feedback
every k steps its share of the phase is about ``N / (N + 3 k B)``; at k = 10, B = 128 and
the 5,000 validation images of Fashion-MNIST-LT that is over half of the whole-model
phase. :func:`backbone_feedback_every` chooses the whole-model phase's interval from N and
B so that the share stays near 15% or below (``docs/results/feedback_share.md``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FEEDBACK_SHARE", "PhaseTimings", "backbone_feedback_every", "parse_duration"]

#: The share of the whole-model phase's wall time that feedback should stay under.
FEEDBACK_SHARE = 0.15
# a training step costs about 3 forward passes per sample (forward, backward of the
# activations and of the weights); validation runs the forward pass only
_TRAIN_COST_PER_SAMPLE = 3.0


def backbone_feedback_every(feedback_every: int, val_size: int, batch_size: int) -> int:
    """Steps between feedback steps in the whole-model phase, unless set.

    The smallest multiple of ``feedback_every`` with an estimated feedback share
    ``N / (N + 3 k B)`` of at most :data:`FEEDBACK_SHARE`.

    Args:
        feedback_every: the head phase's interval (>= 1).
        val_size: N, the validation images one feedback step evaluates.
        batch_size: B, the mixup pairs of one training step (the global batch).

    Returns:
        k >= ``feedback_every``, a multiple of it.
    """
    for name, value in (("feedback_every", feedback_every), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise ValueError(f"`val_size` must be an int >= 0, got {val_size!r}")
    # N / (N + 3 k B) <= s  <=>  k >= N (1 - s) / (3 B s)
    needed = (
        val_size * (1 - FEEDBACK_SHARE) / (_TRAIN_COST_PER_SAMPLE * batch_size * FEEDBACK_SHARE)
    )
    multiples = max(1, math.ceil(needed / feedback_every - 1e-9))
    return multiples * feedback_every


class PhaseTimings:
    """Wall seconds of training and feedback steps, per phase of a run.

    ``record(phase, kind, seconds)`` adds one step; :meth:`to_dict` gives, per phase,
    ``{"steps", "train_seconds", "feedbacks", "feedback_seconds", "feedback_share"}``
    (``feedback_share``: feedback / (training + feedback)) and a ``"total"`` over phases.
    """

    KINDS = ("train", "feedback")

    def __init__(self) -> None:
        self._phases: dict[str, dict[str, float]] = {}

    def record(self, phase: str, kind: str, seconds: float) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"`kind` must be one of {list(self.KINDS)}, got {kind!r}")
        entry = self._phases.setdefault(
            phase, {"steps": 0, "train_seconds": 0.0, "feedbacks": 0, "feedback_seconds": 0.0}
        )
        entry["steps" if kind == "train" else "feedbacks"] += 1
        entry[f"{kind}_seconds"] += float(seconds)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        total = {"steps": 0, "train_seconds": 0.0, "feedbacks": 0, "feedback_seconds": 0.0}
        for phase, entry in self._phases.items():
            result[phase] = _with_share(entry)
            for key in total:
                total[key] += entry[key]
        if result:
            result["total"] = _with_share(total)
        return result


def _with_share(entry: dict[str, float]) -> dict[str, Any]:
    spent = entry["train_seconds"] + entry["feedback_seconds"]
    share = entry["feedback_seconds"] / spent if spent > 0 else 0.0
    return {
        "steps": int(entry["steps"]),
        "train_seconds": round(entry["train_seconds"], 4),
        "feedbacks": int(entry["feedbacks"]),
        "feedback_seconds": round(entry["feedback_seconds"], 4),
        "feedback_share": round(share, 4),
    }


def parse_duration(name: str, value: Any) -> float:
    """Seconds of a wall-clock budget: a number of seconds (``90``, ``"90"``) or Lightning's
    ``max_time`` string ``"DD:HH:MM:SS"`` (also ``"HH:MM:SS"``).

    Args:
        name: the setting, for the message.
        value: the budget.

    Raises:
        ValueError: not a positive finite number of seconds or such a string.
    """
    expected = "seconds > 0 or 'DD:HH:MM:SS'"
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        parts = value.strip().split(":")
        try:
            numbers = [float(part) for part in parts]
        except ValueError:
            numbers = []
        if len(parts) == 1 and numbers:
            seconds = numbers[0]
        elif len(parts) in (3, 4) and len(numbers) == len(parts):
            weights = (86400.0, 3600.0, 60.0, 1.0)[-len(parts) :]
            if all(n >= 0 for n in numbers):
                seconds = sum(n * w for n, w in zip(numbers, weights, strict=True))
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
    return seconds
