"""What selmix's data sets share: ``labels``, ``num_classes`` and ``batch(indices, ...)``.

SelMix asks a data set for whole batches of chosen indices, never for an iterator, so every
data set (in memory, streamed from disk, decoded from a list of files) offers the same
``batch`` call. :class:`BatchDataset` checks the indices once for all of them and derives
``__len__``, ``__getitem__`` and ``class_counts`` from ``labels`` and ``batch``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


def as_index(indices: Any, length: int) -> Tensor:
    """``indices`` as a 1-d int64 CPU Tensor, checked against a data set of ``length``.

    A single index becomes a batch of one; negative indices count from the end.

    Raises:
        ValueError: ``indices`` is not 1-d.
        TypeError: it holds floats or booleans.
        IndexError: an index outside ``[-length, length)``.
    """
    index = torch.as_tensor(indices)
    if index.dim() == 0:
        index = index.reshape(1)
    if index.dim() != 1:
        raise ValueError(f"`indices` must be 1-d, got shape {tuple(index.shape)}")
    if index.numel() == 0:
        return index.long().cpu()
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"`indices` must hold integers, got {index.dtype}")
    index = index.long().cpu()
    low, high = int(index.min()), int(index.max())
    if low < -length or high >= length:
        bad = high if high >= length else low
        raise IndexError(f"`indices` must lie in [0, {length}), got {bad}")
    return index


class BatchDataset(Dataset):
    """Base of data sets served a batch of indices at a time.

    A subclass sets ``labels`` (int64 Tensor[N]) and ``num_classes`` and implements
    :meth:`_batch`; a sample is then a batch of one, without augmentation.
    """

    labels: Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One sample as :meth:`batch` gives it (no augmentation) and its label."""
        inputs, labels = self.batch([index])
        return inputs[0], int(labels[0])

    def class_counts(self) -> Tensor:
        """Samples per class, LongTensor[K]."""
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)

    def batch(
        self,
        indices: Any,
        augment: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The inputs and labels of the given samples.

        Args:
            indices: B sample indices (LongTensor, list or range).
            augment: apply the data set's training augmentation (see the class).
            generator: CPU generator the augmentation's randomness comes from; the same
                generator state gives the same batch.
            device: where to return the batch (see the class for the default).

        Returns:
            ``(inputs, labels)``: Tensor[B, ...] (float32 images for image data sets) and
            int64 Tensor[B].
        """
        return self._batch(as_index(indices, len(self)), augment, generator, device)

    def _batch(
        self,
        index: Tensor,
        augment: bool,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`batch` for a checked int64 CPU index Tensor[B]."""
        raise NotImplementedError
