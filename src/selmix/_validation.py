"""Argument checks shared by the public functions.

Errors follow scikit-learn's wording: they name the argument, what was expected and what
was received, so a user can fix the call without reading the source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _is_number(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.number))


def check_finite(name: str, value: Any) -> float:
    """Checks that ``value`` is a real number other than ``inf``, ``-inf`` and ``nan``."""
    if not _is_number(value):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}")
    return value


def check_positive(name: str, value: float, *, strict: bool = True) -> float:
    """Checks that a number is finite and positive (or non-negative with ``strict=False``).

    ``inf`` and ``nan`` are rejected: no learning rate, scale or smoothing is meaningful at
    infinity, and they turn into NaN losses or invalid sampling distributions much later.
    """
    if not _is_number(value):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    bound = "> 0" if strict else ">= 0"
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value}")
    if value <= 0 if strict else value < 0:
        raise ValueError(f"`{name}` must be {bound}, got {value}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Checks that ``value`` is an integer, at least ``minimum`` when given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def height_width(value: Any) -> tuple[int, int] | None:
    """``(H, W)`` from an int side (``(side, side)``) or an ``(H, W)`` pair of ints, each
    >= 1; None for anything else (the caller's error says where the value came from)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, value
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def check_in_range(name: str, value: float, low: float, high: float) -> float:
    """Checks ``low <= value <= high`` for a finite number."""
    value = check_positive(name, value, strict=False) if low >= 0 else check_finite(name, value)
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in [{low}, {high}], got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Checks that a setting is a boolean (``true`` / ``false`` in YAML), not 2 or "maybe"."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be true or false, got {type(value).__name__} {value!r}")
    return bool(value)


# torch.manual_seed accepts [-2**63, 2**64) and raises a multi-line RuntimeError outside it
SEED_RANGE = (-(2**63), 2**64)


def check_seed(name: str, value: Any) -> int:
    """Checks a random seed: an int that ``torch.manual_seed`` accepts."""
    value = check_int(name, value)
    low, high = SEED_RANGE
    if not low <= value < high:
        raise ValueError(
            f"`{name}` must be an integer in [-2**63, 2**64) (what torch accepts as a seed), "
            f"got {value}"
        )
    return value


def check_head_classes(
    value: Any, num_classes: int | None, name: str = "head_classes"
) -> list[int]:
    """Checks a list of head-class indices against K classes; returns it sorted.

    Args:
        value: e.g. ``[0, 1, 2]``: distinct class indices in ``[0, K)``, leaving at least one
            head and one tail class.
        num_classes: K; None checks the type and the repeats only (before K is known,
            e.g. when a configuration is built).
        name: the argument's name for error messages.

    Returns:
        The sorted list of ints.
    """
    example = "e.g. [0, 1, 2]"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"`{name}` must be a list of class indices ({example}), got "
            f"{type(value).__name__} {value!r}"
        )
    bad = [item for item in value if isinstance(item, bool) or not isinstance(item, int)]
    if bad:
        raise TypeError(f"`{name}` must hold integer class indices ({example}), got {bad[0]!r}")
    if num_classes is None:
        negative = [item for item in value if item < 0]
        if negative:
            raise ValueError(f"`{name}` must hold class indices >= 0, got {negative[0]}")
        repeated = sorted({item for item in value if list(value).count(item) > 1})
        if repeated:
            raise ValueError(f"`{name}` lists class(es) {repeated} more than once")
        return sorted(value)
    outside = [item for item in value if not 0 <= item < num_classes]
    if outside:
        raise ValueError(
            f"`{name}` must hold class indices in [0, {num_classes}), got {outside[0]}"
        )
    if len(set(value)) != len(value):
        repeated = sorted({item for item in value if value.count(item) > 1})
        raise ValueError(f"`{name}` lists class(es) {repeated} more than once")
    if not 0 < len(value) < num_classes:
        raise ValueError(
            f"`{name}` must leave at least one head and one tail class among the "
            f"{num_classes} classes, got {len(value)} head classes"
        )
    return sorted(value)


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Checks that ``value`` is one of ``choices``; the error lists them."""
    if value not in choices:
        known = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown `{name}` {value!r}; expected one of {known}")
    return value


def check_confusion(confusion: Any, name: str = "confusion") -> torch.Tensor:
    """Checks a confusion matrix: square, K >= 2, finite, non-negative, not all zero.

    Args:
        confusion: Tensor[K, K] of counts or fractions; rows are true labels.
        name: the argument's name for error messages.

    Returns:
        The matrix as a floating-point tensor (float64 unless it already was floating).
    """
    if not isinstance(confusion, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(confusion).__name__}")
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(
            f"`{name}` must be a square K x K matrix, got shape {tuple(confusion.shape)}"
        )
    if confusion.shape[0] < 2:
        raise ValueError(f"`{name}` must have K >= 2 classes, got K = {confusion.shape[0]}")
    if not confusion.is_floating_point():
        confusion = confusion.double()
    # one synchronising check on the fast path; the details only when something is wrong
    if not bool(((confusion >= 0).all() & (confusion.sum() > 0)) & torch.isfinite(confusion).all()):
        if not torch.isfinite(confusion).all():
            raise ValueError(f"`{name}` must be finite, got NaN or infinite entries")
        if (confusion < 0).any():
            raise ValueError(
                f"`{name}` must be non-negative, got a minimum of {confusion.min().item()}"
            )
        raise ValueError(f"`{name}` must have a positive total, got all zeros")
    return confusion


def check_all_classes_present(confusion: torch.Tensor, name: str = "confusion") -> None:
    """Recall is undefined for a class with no samples: name the classes that have none."""
    empty = (confusion.sum(dim=1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"`{name}` has no samples of class(es) {empty}: their recall is undefined; "
            "the validation set needs at least one sample of every class"
        )


def check_labels(
    name: str, labels: Any, num_classes: int, *, every_class: bool = False
) -> torch.Tensor:
    """Checks a data set's labels against a K-output head; returns them as int64 Tensor[N].

    Args:
        name: the data set's argument name for error messages.
        labels: integer Tensor[N] (or anything ``torch.as_tensor`` accepts).
        num_classes: K.
        every_class: also require at least one sample of every class.
    """
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        # .long() would truncate 2.7 to 2 without a word
        raise TypeError(f"`{name}` labels must be integers, got {labels.dtype}")
    labels = labels.long().cpu()
    if labels.numel() == 0:
        raise ValueError(f"`{name}` is empty")
    if labels.dim() != 1:
        raise ValueError(f"`{name}` labels must be a 1-D tensor, got shape {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"`{name}` labels must lie in [0, {num_classes}) for a model with {num_classes} "
            f"outputs, got labels in [{low}, {high}]"
        )
    if every_class:
        present = torch.bincount(labels, minlength=num_classes)
        missing = (present == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"`{name}` has no samples of class(es) {missing}; every one of the "
                f"{num_classes} classes needs at least one"
            )
    return labels


def as_generator(seed: int | torch.Generator, name: str = "seed") -> torch.Generator:
    """A CPU ``torch.Generator``: ``seed`` itself if it is one, else a new one seeded with it."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(
                f"`{name}` must be an int or a CPU torch.Generator, got a generator on "
                f"{seed.device}"
            )
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`{name}` must be an int or a torch.Generator, got {type(seed).__name__}")
    return torch.Generator().manual_seed(check_seed(name, seed))
