"""Argument checks shared by the public functions.

Errors follow scikit-learn's wording: they name the argument, what was expected and what
was received, so a user can fix the call without reading the source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def check_positive(name: str, value: float, *, strict: bool = True) -> float:
    """Checks that a number is positive (or non-negative with ``strict=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or (value <= 0 if strict else value < 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"`{name}` must be {bound}, got {value}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Checks that ``value`` is an integer, at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_in_range(name: str, value: float, low: float, high: float) -> float:
    """Checks ``low <= value <= high``."""
    value = check_positive(name, value, strict=False) if low >= 0 else float(value)
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in [{low}, {high}], got {value}")
    return value


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
    labels = torch.as_tensor(labels).long().cpu()
    if labels.numel() == 0:
        raise ValueError(f"`{name}` is empty")
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
    return torch.Generator().manual_seed(seed)
