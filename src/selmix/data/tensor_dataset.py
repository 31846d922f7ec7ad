"""Image data sets held as one uint8 tensor, served a whole batch at a time.

SelMix draws every batch as index pairs from a policy over classes, so the engine asks for
``dataset.batch(indices)`` rather than iterating a DataLoader. Holding the images as a single
uint8 tensor makes that one indexing operation plus a batched augmentation, on CPU or (after
``.to("cuda")``) entirely on the GPU, with a quarter of the memory of float images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from selmix._validation import check_int
from selmix.data.augment import channel_stats, normalize, random_crop_flip
from selmix.data.base import BatchDataset, as_index
from selmix.data.streaming import WorkerPool, run_seeded, seeded_items, to_device

IndexLike = Tensor | Sequence[int] | range


class ImageTensorDataset(BatchDataset):
    """Images as a uint8 tensor with int64 labels, normalised on the way out.

    Args:
        images: uint8 Tensor[N, C, H, W].
        labels: integer Tensor[N] (stored as int64) with values in [0, K).
        mean: per-channel mean in [0, 1] units (a float, or a sequence/Tensor of length C);
            None computes it from ``images``.
        std: per-channel standard deviation in [0, 1] units, > 0; None computes it.
        classes: class names; ``len(classes)`` is K. Defaults to ``["0", ..., "K-1"]``.
        num_classes: K when ``classes`` is not given; defaults to ``labels.max() + 1``.
            Give it when a subset may miss the last classes.
        flip: whether ``batch(..., augment=True)`` flips images horizontally (also on for
            Fashion-MNIST, following the paper's augmentations).
        padding: padding of the random crop in pixels (0 disables cropping).

    Attributes:
        images, labels, mean (Tensor[C]), std (Tensor[C]), classes, num_classes, flip,
        padding.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | Sequence[int],
        mean: float | Sequence[float] | Tensor | None = None,
        std: float | Sequence[float] | Tensor | None = None,
        classes: Sequence[str] | None = None,
        *,
        num_classes: int | None = None,
        flip: bool = True,
        padding: int = 4,
    ) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"`images` must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                "`images` must be a uint8 Tensor[N, C, H, W], got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        labels = _as_labels(labels, "labels")
        if labels.numel() != images.shape[0]:
            raise ValueError(
                f"`labels` must have one entry per image ({images.shape[0]}), got {labels.numel()}"
            )
        self.images = images
        self.labels = labels
        self.num_classes = _resolve_num_classes(labels, classes, num_classes)
        self.classes = (
            [str(c) for c in classes]
            if classes is not None
            else [str(k) for k in range(self.num_classes)]
        )
        channels = images.shape[1]
        if mean is None or std is None:
            computed_mean, computed_std = channel_stats(images)
            mean = computed_mean if mean is None else mean
            std = computed_std if std is None else std
        self.mean = _per_channel("mean", mean, channels)
        self.std = _per_channel("std", std, channels)
        if (self.std <= 0).any():
            raise ValueError(f"`std` must be > 0 in every channel, got {self.std.tolist()}")
        if not isinstance(flip, bool):
            raise TypeError(f"`flip` must be a bool, got {type(flip).__name__}")
        self.flip = flip
        self.padding = check_int("padding", padding, minimum=0)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One normalised image, float32 [C, H, W], and its label (no augmentation)."""
        image = self.images[index].unsqueeze(0)
        return normalize(image, self.mean, self.std)[0], int(self.labels[index])

    def __repr__(self) -> str:
        _, c, h, w = self.images.shape
        return (
            f"ImageTensorDataset({len(self)} images of {c}x{h}x{w}, {self.num_classes} classes, "
            f"device={self.images.device})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        _, c, h, w = self.images.shape
        return c, h, w

    def _batch(
        self,
        index: Tensor,
        augment: bool,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> tuple[Tensor, Tensor]:
        """A normalised batch, float32 [B, C, H, W], where the images are unless ``device``
        says otherwise; ``augment``: random crop (``padding``, reflect) and, with ``flip``,
        horizontal flip."""
        source = self.images.device
        images = self.images[index.to(source)]
        labels = self.labels[index.to(self.labels.device)]
        if device is not None:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        images = images.float()
        if augment:
            images = random_crop_flip(images, self.padding, self.flip, generator)
        return normalize(images, self.mean, self.std), labels

    def subset(self, indices: IndexLike) -> ImageTensorDataset:
        """A new data set of the given samples (same classes, statistics and augmentation)."""
        index = as_index(indices, len(self))
        return self._replace(
            self.images[index.to(self.images.device)], self.labels[index.to(self.labels.device)]
        )

    def to(self, device: torch.device | str) -> ImageTensorDataset:
        """The same data set with its tensors on ``device`` (GPU-resident batches)."""
        return self._replace(self.images.to(device), self.labels.to(device))

    def _replace(self, images: Tensor, labels: Tensor) -> ImageTensorDataset:
        return ImageTensorDataset(
            images,
            labels,
            self.mean,
            self.std,
            self.classes,
            num_classes=self.num_classes,
            flip=self.flip,
            padding=self.padding,
        )


class DatasetAdapter(BatchDataset):
    """Gives any map-style ``(x, y)`` data set the ``.labels`` / ``.batch(...)`` interface.

    Batches are stacked from ``dataset[i]``, so each item's ``x`` must already be a tensor
    (add ``torchvision.transforms.ToTensor()`` and normalisation to the data set's transform).
    There is no augmentation beyond what the data set's own transform does. With
    ``augment``, one seed is drawn from ``generator`` per batch and item ``b`` is read with
    torch's (and Python's) global generator seeded from it, so a random transform gives
    the same batch for the same generator state, in the main process or in workers.

    Args:
        dataset: a map-style data set of ``(x, y)`` pairs.
        labels: int Tensor[N]; read from the data set when not given.
        classes: class names.
        num_classes: K.
        num_workers: processes reading items (``torch.utils.data.DataLoader`` workers, kept
            between batches); 0 (the default) reads in the main process, best for a data
            set already in memory. Workers pay off when items are decoded from files.

    Attributes:
        dataset: the wrapped data set.
        labels: int64 Tensor[N].
        num_classes: K (``len(dataset.classes)`` if it has ``classes``, else max label + 1).
        classes: class names.
    """

    def __init__(
        self,
        dataset: Dataset,
        labels: Tensor | None = None,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        num_workers: int = 0,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "`dataset` must be a map-style dataset of (x, y) pairs, "
                f"got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.labels = _as_labels(labels, "labels") if labels is not None else _read_labels(dataset)
        if classes is None:
            names = getattr(dataset, "classes", None)
            classes = list(names) if isinstance(names, Sequence) and names else None
        if classes is not None and num_classes is not None and len(classes) != num_classes:
            classes = None  # the underlying set's names do not describe these labels
        self.num_classes = _resolve_num_classes(self.labels, classes, num_classes)
        self.classes = (
            [str(c) for c in classes]
            if classes is not None
            else [str(k) for k in range(self.num_classes)]
        )
        self.pool = WorkerPool(_ItemReader(dataset), num_workers)

    @property
    def num_workers(self) -> int:
        """Processes reading items (0: the main process)."""
        return self.pool.num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __repr__(self) -> str:
        return f"DatasetAdapter({type(self.dataset).__name__}, {len(self)} samples)"

    def _batch(
        self,
        index: Tensor,
        augment: bool,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> tuple[Tensor, Tensor]:
        """Stacks ``dataset[i][0]`` for the indices; returns ``(x [B, ...], labels [B])``.

        A batch copied to a GPU goes through pinned memory.
        """
        images = self.pool.load(seeded_items(index.tolist(), augment, True, generator))
        labels = self.labels[index]
        if device is not None:
            images, labels = to_device(images, device), labels.to(device)
        return images, labels

    def subset(self, indices: IndexLike) -> DatasetAdapter:
        """A view of the given samples (same classes)."""
        index = as_index(indices, len(self))
        return DatasetAdapter(
            Subset(self.dataset, index.tolist()),
            labels=self.labels[index],
            classes=self.classes,
            num_classes=self.num_classes,
            num_workers=self.num_workers,
        )


class _ItemReader(Dataset):
    """``reader[(i, augment, seed)]`` is ``dataset[i][0]``, read under ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, bool, int | None]) -> Tensor:
        index, _, seed = item
        x = run_seeded(seed, lambda: self.dataset[index][0])
        if not isinstance(x, Tensor):
            raise TypeError(
                f"`dataset` items must be (Tensor, label) pairs, got a {type(x).__name__} "
                "input; add torchvision.transforms.ToTensor() to its transform"
            )
        return x


def as_tensor_dataset(dataset: Any) -> ImageTensorDataset | DatasetAdapter:
    """Returns ``dataset`` with selmix's ``.labels`` / ``.num_classes`` / ``.batch`` interface.

    An :class:`ImageTensorDataset` (or :class:`DatasetAdapter`) is returned as it is; any other
    map-style data set of ``(x, y)`` with ``x`` a tensor is wrapped in a
    :class:`DatasetAdapter`. Labels are read from ``dataset.targets`` when present (as
    torchvision data sets have), from the label tensor of a ``TensorDataset``, or else by
    reading every item once.

    Args:
        dataset: a torch ``Dataset`` yielding ``(x, y)``.

    Returns:
        An object with ``labels`` (int64 Tensor[N]), ``num_classes``, ``classes``,
        ``batch(indices, augment=False, generator=None, device=None)`` and ``subset``.
    """
    if isinstance(dataset, (ImageTensorDataset, DatasetAdapter)):
        return dataset
    return DatasetAdapter(dataset)


def _as_labels(labels: Any, name: str) -> Tensor:
    tensor = torch.as_tensor(labels)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integers, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"`{name}` must be 1-d, got shape {tuple(tensor.shape)}")
    tensor = tensor.long()
    if tensor.numel() and tensor.min() < 0:
        raise ValueError(f"`{name}` must be >= 0, got a label {int(tensor.min())}")
    return tensor


def _resolve_num_classes(
    labels: Tensor, classes: Sequence[str] | None, num_classes: int | None
) -> int:
    if classes is not None and not isinstance(classes, Sequence):
        raise TypeError(f"`classes` must be a sequence of names, got {type(classes).__name__}")
    if num_classes is not None:
        check_int("num_classes", num_classes, minimum=1)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"`classes` must have `num_classes` = {num_classes} names, got {len(classes)}"
            )
    elif classes is not None:
        num_classes = len(classes)
    elif labels.numel():
        num_classes = int(labels.max()) + 1
    else:
        raise ValueError("`num_classes` must be given when `labels` is empty")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}), got a label {int(labels.max())}"
        )
    return num_classes


def _per_channel(name: str, value: Any, channels: int) -> Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
    if tensor.numel() == 1:
        tensor = tensor.expand(channels).clone()
    if tensor.numel() != channels:
        raise ValueError(
            f"`{name}` must have one value per channel ({channels}), got {tensor.numel()}"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` must be finite, got {tensor.tolist()}")
    return tensor


def _read_labels(dataset: Any) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return _as_labels(targets, "dataset.targets")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return _as_labels(dataset.tensors[1], "dataset.tensors[1]")
    if isinstance(dataset, Subset):
        base = getattr(dataset.dataset, "targets", None)
        if base is not None:
            return _as_labels(base, "dataset.dataset.targets")[torch.as_tensor(dataset.indices)]
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(
                f"`dataset` must yield (x, y) pairs, got a {type(item).__name__} at index {i}"
            )
        labels.append(int(item[1]))
    return _as_labels(torch.tensor(labels, dtype=torch.long), "labels")
