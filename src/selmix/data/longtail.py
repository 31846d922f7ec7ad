"""Long-tailed class counts and seeded, disjoint train/validation splits.

The long tail is that of docs/maths.md section 7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from selmix._validation import as_generator, check_int


def long_tail_counts(max_per_class: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class sample counts of an exponentially long-tailed data set.

    Class k (k = 0..K-1) keeps ``n_k = floor(N_1 * imbalance ** (-k / (K - 1)))`` samples, so
    class 0 has ``N_1`` and class K-1 has ``N_1 / imbalance``. With ``imbalance < 1`` the
    counts increase instead (the "inverted" unlabelled distribution of the semi-supervised
    experiments, rho_u = 1/100), and ``max_per_class`` is then the count of class 0, not
    the largest one.

    Args:
        max_per_class: N_1, the count of class 0 (>= 1).
        num_classes: K (>= 2).
        imbalance: rho = n_0 / n_{K-1} (> 0); 1 gives balanced counts.

    Returns:
        K ints, class 0 first. For CIFAR-10-LT (N_1 = 5000, rho = 100):
        [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50].
    """
    check_int("max_per_class", max_per_class, minimum=1)
    check_int("num_classes", num_classes, minimum=2)
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)):
        raise TypeError(f"`imbalance` must be a number, got {type(imbalance).__name__}")
    if not math.isfinite(imbalance) or imbalance <= 0:
        raise ValueError(f"`imbalance` must be > 0 and finite, got {imbalance}")
    # Written as (1 / rho) ** (k / (K - 1)), the form of the reference CIFAR-LT code, so the
    # floor rounds the same way and the standard counts come out exactly.
    ratio = 1.0 / float(imbalance)
    return [
        int(math.floor(max_per_class * ratio ** (k / (num_classes - 1))))
        for k in range(num_classes)
    ]


def long_tail_split(
    labels: Tensor | Sequence[int],
    counts: Sequence[int],
    val_per_class: int | Sequence[int] = 0,
    seed: int | torch.Generator = 0,
) -> tuple[Tensor, Tensor]:
    """Draws a long-tailed training set and a balanced validation set, disjoint.

    For each class k in turn, the indices of its samples are shuffled with one generator;
    the first ``val_per_class`` (or ``val_per_class[k]``) go to validation and the next
    ``counts[k]`` to training.

    Args:
        labels: integer Tensor[N] with values in [0, K), K = ``len(counts)``.
        counts: training samples to keep per class (e.g. from :func:`long_tail_counts`).
        val_per_class: validation samples per class (0 for none), or one count per class
            (a sequence of ``len(counts)`` ints), e.g. a smaller validation set for a head
            class whose training count would otherwise be cut.
        seed: an int seed or a ``torch.Generator`` (which is advanced).

    Returns:
        ``(train_idx, val_idx)``: sorted LongTensors of indices into ``labels``.

    Raises:
        ValueError: naming the class that has too few samples.
    """
    labels = check_label_vector(labels)
    if not isinstance(counts, Sequence) and not isinstance(counts, Tensor):
        raise TypeError(f"`counts` must be a sequence of ints, got {type(counts).__name__}")
    counts = [int(c) for c in counts]
    num_classes = len(counts)
    if num_classes < 1:
        raise ValueError("`counts` must have one entry per class, got an empty sequence")
    if any(c < 0 for c in counts):
        raise ValueError(f"`counts` must be >= 0, got {counts}")
    if isinstance(val_per_class, (Sequence, Tensor)) and not isinstance(val_per_class, str):
        val_counts = [int(v) for v in val_per_class]
        if len(val_counts) != num_classes or any(v < 0 for v in val_counts):
            raise ValueError(
                f"`val_per_class` must be an int >= 0 or {num_classes} ints >= 0 (one per "
                f"class of `counts`), got {val_counts}"
            )
    else:
        check_int("val_per_class", val_per_class, minimum=0)
        val_counts = [int(val_per_class)] * num_classes
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}) for {num_classes} `counts`, got labels "
            f"in [{int(labels.min())}, {int(labels.max())}]"
        )
    generator = as_generator(seed)
    order = torch.argsort(labels, stable=True)
    sizes = torch.bincount(labels, minlength=num_classes).tolist()
    train_parts, val_parts = [], []
    start = 0
    for k, size in enumerate(sizes):
        members = order[start : start + size]
        start += size
        val_count = val_counts[k]
        needed = val_count + counts[k]
        if size < needed:
            raise ValueError(
                f"class {k} has {size} samples, but `val_per_class` + `counts[{k}]` = "
                f"{val_count} + {counts[k]} = {needed} are needed"
            )
        shuffled = members[torch.randperm(size, generator=generator)]
        val_parts.append(shuffled[:val_count])
        train_parts.append(shuffled[val_count:needed])
    train = torch.cat(train_parts).sort().values
    val = torch.cat(val_parts).sort().values
    return train, val


def check_label_vector(labels: Tensor | Sequence[int]) -> Tensor:
    """``labels`` as a 1-d int64 CPU tensor; an error names the argument otherwise."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(
            f"`labels` must be a 1-d integer tensor, got {labels.dtype} of shape "
            f"{tuple(labels.shape)}"
        )
    return labels.long().cpu()
