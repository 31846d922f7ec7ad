"""Semi-supervised splits: a long-tailed labelled set, an unlabelled pool and a balanced
validation set, disjoint and drawn from one training set (docs/maths.md section 7).

The unlabelled pool's class distribution is one of the paper's four settings (App. H):

* ``"matched"``: rho_u = rho_l, the same long tail as the labelled set;
* ``"uniform"``: rho_u = 1, balanced;
* ``"inverted"``: rho_u = 1 / rho_l < 1, increasing counts, so the unlabelled head is the
  labelled tail;
* ``"unknown"``: every image left after the labelled and validation sets are drawn.

The pool is served as an :class:`UnlabelledDataset`: its ``labels`` are all -1 and the true
labels live only in :attr:`UnlabelledDataset.hidden_labels`, for reporting pseudo-label
accuracy. Nothing in training reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from selmix._validation import check_choice, check_int
from selmix.data.longtail import check_label_vector, long_tail_counts, long_tail_split
from selmix.data.tensor_dataset import ImageTensorDataset

__all__ = [
    "UNLABELLED_DISTRIBUTIONS",
    "SemiSupervisedData",
    "SemiSupervisedSplit",
    "UnlabelledDataset",
    "semi_supervised_data",
    "semi_supervised_split",
    "unlabelled_distribution",
]

UNLABELLED_DISTRIBUTIONS = ("matched", "uniform", "inverted", "unknown")

# Unlabelled M_1 of the paper's settings with labelled N_1 = 1500 (docs/maths.md section 7).
_PAPER_UNLABELLED_MAX = {"matched": 3000, "uniform": 3000, "inverted": 30}


def unlabelled_distribution(
    distribution: str,
    labelled_imbalance: float = 100.0,
    unlabelled_max: int | None = None,
) -> dict[str, Any]:
    """The ``unlabelled_max`` / ``unlabelled_imbalance`` arguments of a named setting.

    Args:
        distribution: ``"matched"``, ``"uniform"``, ``"inverted"`` or ``"unknown"``.
        labelled_imbalance: rho_l of the labelled set.
        unlabelled_max: M_1, the count of unlabelled class 0; None takes the paper's value
            (3000 for matched and uniform, 30 for inverted). Must be None for unknown.

    Returns:
        ``{"unlabelled_max": M_1, "unlabelled_imbalance": rho_u}`` for
        :func:`semi_supervised_split`: rho_u = rho_l (matched), 1 (uniform),
        1 / rho_l (inverted); both None for unknown.
    """
    check_choice("distribution", distribution, UNLABELLED_DISTRIBUTIONS)
    _check_imbalance("labelled_imbalance", labelled_imbalance)
    if distribution == "unknown":
        if unlabelled_max is not None:
            raise ValueError(
                "`unlabelled_max` must be None for the 'unknown' distribution (it takes every "
                f"remaining image), got {unlabelled_max}"
            )
        return {"unlabelled_max": None, "unlabelled_imbalance": None}
    if unlabelled_max is None:
        unlabelled_max = _PAPER_UNLABELLED_MAX[distribution]
    check_int("unlabelled_max", unlabelled_max, minimum=1)
    rho = float(labelled_imbalance)
    imbalance = {"matched": rho, "uniform": 1.0, "inverted": 1.0 / rho}[distribution]
    return {"unlabelled_max": unlabelled_max, "unlabelled_imbalance": imbalance}


@dataclass
class SemiSupervisedSplit:
    """Disjoint index sets into one training set.

    Attributes:
        labelled: sorted LongTensor of the labelled samples' indices.
        unlabelled: sorted LongTensor of the unlabelled pool's indices.
        val: sorted LongTensor of the balanced validation set's indices.
        labelled_counts: the K per-class labelled counts that were drawn.
        unlabelled_counts: the K per-class unlabelled counts (for ``"unknown"``, what was
            left; reporting only).
    """

    labelled: Tensor
    unlabelled: Tensor
    val: Tensor
    labelled_counts: list[int]
    unlabelled_counts: list[int]

    def describe(self) -> str:
        """Sizes and per-class counts, one line per set."""
        return "\n".join(
            [
                f"labelled: {self.labelled.numel()} images, per class {self.labelled_counts}",
                f"unlabelled: {self.unlabelled.numel()} images, per class {self.unlabelled_counts}",
                f"val: {self.val.numel()} images",
            ]
        )


def semi_supervised_split(
    labels: Tensor | Sequence[int],
    labelled_max: int,
    labelled_imbalance: float,
    unlabelled_max: int | None = None,
    unlabelled_imbalance: float | None = None,
    val_per_class: int = 0,
    seed: int | torch.Generator = 0,
) -> SemiSupervisedSplit:
    """Draws labelled, unlabelled and validation indices, disjoint and reproducible.

    First the labelled set (``long_tail_counts(labelled_max, K, labelled_imbalance)``) and
    the balanced validation set are drawn exactly as :func:`selmix.data.long_tail_split`
    draws them; then the unlabelled pool (``long_tail_counts(unlabelled_max, K,
    unlabelled_imbalance)``) comes from what is left, with the same generator. The result
    equals ``load_data(..., unlabelled_max_per_class=M_1, unlabelled_imbalance=rho_u)``'s
    split for the same seed. With ``unlabelled_max`` and ``unlabelled_imbalance`` both None
    (the "unknown" setting), the pool is every remaining image.

    Args:
        labels: integer Tensor[N] of the training set's labels, values in [0, K).
        labelled_max: N_1, the labelled count of class 0.
        labelled_imbalance: rho_l = n_0 / n_{K-1} of the labelled set.
        unlabelled_max: M_1, the unlabelled count of class 0, or None (unknown).
        unlabelled_imbalance: rho_u (> 1 long tail, 1 uniform, < 1 inverted), or None.
        val_per_class: validation samples per class.
        seed: an int seed or a ``torch.Generator`` (advanced).

    Returns:
        A :class:`SemiSupervisedSplit`.

    Raises:
        ValueError: naming the argument, e.g. a class with too few samples for the split.
    """
    labels = check_label_vector(labels)
    if labels.numel() == 0 or labels.min() < 0:
        raise ValueError("`labels` must be non-empty with values >= 0")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise ValueError(f"`labels` must hold at least 2 classes, got {num_classes}")
    check_int("labelled_max", labelled_max, minimum=1)
    _check_imbalance("labelled_imbalance", labelled_imbalance)
    if (unlabelled_max is None) != (unlabelled_imbalance is None):
        raise ValueError(
            "`unlabelled_max` and `unlabelled_imbalance` must be given together (or both None "
            f"for the 'unknown' setting), got {unlabelled_max!r} and {unlabelled_imbalance!r}"
        )
    if unlabelled_max is not None:
        check_int("unlabelled_max", unlabelled_max, minimum=0)
        _check_imbalance("unlabelled_imbalance", unlabelled_imbalance)
    check_int("val_per_class", val_per_class, minimum=0)
    if isinstance(seed, torch.Generator):
        generator = seed
    else:
        generator = torch.Generator().manual_seed(check_int("seed", seed))

    labelled_counts = long_tail_counts(labelled_max, num_classes, float(labelled_imbalance))
    labelled, val = long_tail_split(labels, labelled_counts, val_per_class, generator)
    taken = torch.zeros(labels.numel(), dtype=torch.bool)
    taken[labelled] = True
    taken[val] = True
    rest = (~taken).nonzero().flatten()
    if unlabelled_max is None:
        unlabelled = rest
    elif unlabelled_max == 0:
        unlabelled = rest[:0]
    else:
        assert unlabelled_imbalance is not None  # given with unlabelled_max (checked above)
        counts = long_tail_counts(unlabelled_max, num_classes, float(unlabelled_imbalance))
        try:
            picked, _ = long_tail_split(labels[rest], counts, 0, generator)
        except ValueError as error:
            raise ValueError(
                f"`unlabelled_max` = {unlabelled_max} with `unlabelled_imbalance` = "
                f"{unlabelled_imbalance} asks for more images than are left: {error}"
            ) from None
        unlabelled = rest[picked]
    unlabelled_counts = torch.bincount(labels[unlabelled], minlength=num_classes).tolist()
    return SemiSupervisedSplit(
        labelled=labelled,
        unlabelled=unlabelled.sort().values,
        val=val,
        labelled_counts=labelled_counts,
        unlabelled_counts=unlabelled_counts,
    )


class UnlabelledDataset(Dataset):
    """Images without labels: ``labels`` are all -1, the true ones stay hidden.

    It serves batches exactly like :class:`~selmix.data.ImageTensorDataset` (same
    normalisation and crop/flip augmentation), so the fine-tuning engine and FixMatch use it
    in place of a labelled set. The true labels, if known, are kept in
    :attr:`hidden_labels` for reporting (pseudo-label accuracy) and are read by nothing
    that trains.

    Args:
        images: uint8 Tensor[N, C, H, W].
        mean, std: per-channel normalisation in [0, 1] units (as ImageTensorDataset).
        num_classes: K, the number of classes of the task.
        hidden_labels: optional integer Tensor[N] of the true labels (reporting only).
        classes: class names (length K).
        flip, padding: the crop/flip augmentation, as ImageTensorDataset.

    Attributes:
        images, labels (LongTensor[N] of -1), num_classes, classes, mean, std, flip,
        padding, hidden_labels.
    """

    def __init__(
        self,
        images: Tensor,
        mean: float | Sequence[float] | Tensor,
        std: float | Sequence[float] | Tensor,
        num_classes: int,
        *,
        hidden_labels: Tensor | Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        flip: bool = True,
        padding: int = 4,
    ) -> None:
        check_int("num_classes", num_classes, minimum=2)
        if not isinstance(images, Tensor):
            raise TypeError(f"`images` must be a torch.Tensor, got {type(images).__name__}")
        placeholder = torch.zeros(images.shape[0] if images.dim() else 0, dtype=torch.long)
        # The wrapped set does the checks, the normalisation and the augmentation; its
        # labels are zeros that are never returned.
        self._data = ImageTensorDataset(
            images, placeholder, mean, std, classes, num_classes=num_classes, flip=flip,
            padding=padding,
        )  # fmt: skip
        self.labels = torch.full((len(self._data),), -1, dtype=torch.long)
        self._hidden: Tensor | None = None
        if hidden_labels is not None:
            hidden = torch.as_tensor(hidden_labels)
            if hidden.dtype.is_floating_point or hidden.dtype == torch.bool or hidden.dim() != 1:
                raise ValueError(
                    f"`hidden_labels` must be a 1-d integer tensor, got {hidden.dtype} of "
                    f"shape {tuple(hidden.shape)}"
                )
            if hidden.numel() != len(self._data):
                raise ValueError(
                    f"`hidden_labels` must have one entry per image ({len(self._data)}), "
                    f"got {hidden.numel()}"
                )
            self._hidden = hidden.long().cpu().clone()

    @classmethod
    def from_dataset(
        cls, dataset: ImageTensorDataset, indices: Tensor | Sequence[int] | None = None
    ) -> UnlabelledDataset:
        """The (optionally subset) images of a labelled set, its labels moved to hidden."""
        if not isinstance(dataset, ImageTensorDataset):
            raise TypeError(
                f"`dataset` must be an ImageTensorDataset, got {type(dataset).__name__}"
            )
        if indices is not None:
            dataset = dataset.subset(indices)
        return cls(
            dataset.images, dataset.mean, dataset.std, dataset.num_classes,
            hidden_labels=dataset.labels, classes=dataset.classes, flip=dataset.flip,
            padding=dataset.padding,
        )  # fmt: skip

    # -- the ImageTensorDataset interface ------------------------------------------------
    @property
    def images(self) -> Tensor:
        """uint8 Tensor[N, C, H, W]."""
        return self._data.images

    @property
    def num_classes(self) -> int:
        """K."""
        return self._data.num_classes

    @property
    def classes(self) -> list[str]:
        """Class names."""
        return self._data.classes

    @property
    def mean(self) -> Tensor:
        """Per-channel mean, Tensor[C]."""
        return self._data.mean

    @property
    def std(self) -> Tensor:
        """Per-channel standard deviation, Tensor[C]."""
        return self._data.std

    @property
    def flip(self) -> bool:
        """Whether augmentation flips horizontally."""
        return self._data.flip

    @property
    def padding(self) -> int:
        """Padding of the random crop."""
        return self._data.padding

    @property
    def hidden_labels(self) -> Tensor | None:
        """The true labels, LongTensor[N] or None: for reporting only, never for training."""
        return self._hidden

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One normalised image, float32 [C, H, W], and the label -1."""
        return self._data[index][0], -1

    def __repr__(self) -> str:
        _, c, h, w = self.images.shape
        hidden = "with" if self._hidden is not None else "without"
        return (
            f"UnlabelledDataset({len(self)} images of {c}x{h}x{w}, {self.num_classes} classes, "
            f"{hidden} hidden labels)"
        )

    def batch(
        self,
        indices: Tensor | Sequence[int] | range,
        augment: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """A normalised (optionally crop/flip-augmented) batch.

        Returns:
            ``(images, labels)``: float32 Tensor[B, C, H, W] and int64 Tensor[B] of -1.
        """
        images, placeholder = self._data.batch(indices, augment, generator, device)
        return images, torch.full_like(placeholder, -1)

    def subset(self, indices: Tensor | Sequence[int] | range) -> UnlabelledDataset:
        """A new unlabelled set of the given samples (hidden labels follow)."""
        index = torch.as_tensor(indices).long().reshape(-1)
        hidden = None if self._hidden is None else self._hidden[index]
        return self._replace(self.images[index.to(self.images.device)], hidden)

    def to(self, device: torch.device | str) -> UnlabelledDataset:
        """The same set with its images on ``device``."""
        return self._replace(self.images.to(device), self._hidden)

    def _replace(self, images: Tensor, hidden: Tensor | None) -> UnlabelledDataset:
        return UnlabelledDataset(
            images, self.mean, self.std, self.num_classes, hidden_labels=hidden,
            classes=self.classes, flip=self.flip, padding=self.padding,
        )  # fmt: skip


@dataclass
class SemiSupervisedData:
    """The three training-side sets of a semi-supervised experiment.

    Attributes:
        labelled: the long-tailed labelled set (ImageTensorDataset).
        unlabelled: the unlabelled pool (:class:`UnlabelledDataset`, labels hidden).
        val: the balanced validation set (ImageTensorDataset).
    """

    labelled: ImageTensorDataset
    unlabelled: UnlabelledDataset
    val: ImageTensorDataset


def semi_supervised_data(
    dataset: ImageTensorDataset, split: SemiSupervisedSplit
) -> SemiSupervisedData:
    """Cuts ``dataset`` (the full training set) along ``split``.

    Args:
        dataset: the training set whose labels ``split`` was drawn from.
        split: from :func:`semi_supervised_split`.

    Returns:
        A :class:`SemiSupervisedData`; the unlabelled pool's labels are hidden.
    """
    if not isinstance(dataset, ImageTensorDataset):
        raise TypeError(f"`dataset` must be an ImageTensorDataset, got {type(dataset).__name__}")
    if not isinstance(split, SemiSupervisedSplit):
        raise TypeError(f"`split` must be a SemiSupervisedSplit, got {type(split).__name__}")
    largest = max(
        (int(part.max()) for part in (split.labelled, split.unlabelled, split.val) if part.numel()),
        default=-1,
    )
    if largest >= len(dataset):
        raise ValueError(
            f"`split` indexes sample {largest} but `dataset` has {len(dataset)} samples"
        )
    return SemiSupervisedData(
        labelled=dataset.subset(split.labelled),
        unlabelled=UnlabelledDataset.from_dataset(dataset, split.unlabelled),
        val=dataset.subset(split.val),
    )


def _check_imbalance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"`{name}` must be > 0 and finite, got {value}")
    return value
