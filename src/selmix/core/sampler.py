"""Drawing batches of mixup pairs from the policy with a few tensor operations."""

from __future__ import annotations

import numpy as np
import torch

from selmix._validation import check_int
from selmix.devices import to_host

__all__ = ["ClassPools", "PairSampler"]


class ClassPools:
    """Sample indices grouped by class, for O(1) uniform draws within a class.

    The indices are sorted by class once; a draw for class c picks a uniform offset in
    ``[start[c], start[c] + size[c])``. That is one ``torch.rand`` and one gather for a
    whole batch.

    Args:
        labels: Tensor[N] of class labels (use -1 to leave a sample out).
        num_classes: K.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.dim() != 1:
            raise ValueError(f"`labels` must be 1-d, got shape {tuple(labels.shape)}")
        if labels.numel() and labels.max() >= num_classes:
            raise ValueError(
                f"`labels` must lie in [0, {num_classes}), got a label {int(labels.max())}"
            )
        kept = (labels >= 0).nonzero().flatten()
        order = torch.argsort(labels[kept], stable=True)
        self.indices = kept[order]
        self.sizes = torch.bincount(labels[kept], minlength=num_classes)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.num_classes = num_classes

    def draw(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One uniform sample index for each requested class. Tensor[B] -> Tensor[B]."""
        sizes = self.sizes[classes]
        if (sizes == 0).any():
            empty = sorted(set(classes[sizes == 0].tolist()))
            raise ValueError(f"no samples of class(es) {empty} to draw from")
        offsets = (torch.rand(classes.shape, generator=generator) * sizes).long()
        offsets = torch.minimum(offsets, sizes - 1)  # rand can round up to exactly 1.0
        return self.indices[self.starts[classes] + offsets]


class PairSampler:
    """Draws (x1 of class i, x2 of class j) index pairs, (i, j) ~ P.

    The draws are those of the straightforward implementation (``torch.multinomial`` over
    the K^2 pairs, then :meth:`ClassPools.draw` for x1 and for x2), bit for bit, so seeded
    runs are unchanged; only the bookkeeping around the generator calls is cheaper: the
    pair probabilities are converted once per distribution (cached until it changes),
    the per-pair class tables of both pools are built when the pools change, and the
    index arithmetic runs in NumPy (a few microseconds per operation, where a small torch
    operation costs several times more).

    Args:
        first_labels: Tensor[N1], labels of the pool x1 comes from (the labelled set).
        second_labels: Tensor[N2] or None: labels (or pseudo-labels) of the pool x2 comes
            from; None uses the first pool. A class with no sample in the second pool falls
            back to the first pool.
        num_classes: K.
        generator: the source of randomness (CPU ``torch.Generator``).
    """

    def __init__(
        self,
        first_labels: torch.Tensor,
        second_labels: torch.Tensor | None,
        num_classes: int,
        generator: torch.Generator,
    ) -> None:
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.first = ClassPools(first_labels, num_classes)
        missing = (self.first.sizes == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"the training set has no samples of class(es) {missing}")
        self.generator = generator
        self._source: torch.Tensor | None = None
        self._source_version = -1
        self._probabilities = torch.empty(0, dtype=torch.float64)
        k = num_classes
        first = self.first
        self._first_class = np.repeat(np.arange(k), k)
        self._second_class = np.tile(np.arange(k), k)
        self._first_indices = first.indices.numpy()
        self._first_starts = first.starts.numpy()
        # float32 sizes: ``rand * size`` in float32, as ClassPools.draw computes it
        self._first_sizes = first.sizes.numpy().astype(np.float32)
        self._first_last = first.sizes.numpy() - 1
        self.set_second_labels(second_labels)

    def set_second_labels(self, second_labels: torch.Tensor | None) -> None:
        """Replaces the second pool's labels (pseudo-labels are refreshed at feedback)."""
        self.second = None if second_labels is None else ClassPools(second_labels, self.num_classes)
        if self.second is not None:
            self._second_indices = self.second.indices.numpy()
            self._second_starts = self.second.starts.numpy()
            self._second_sizes = self.second.sizes.numpy().astype(np.float32)
            self._second_last = self.second.sizes.numpy() - 1
            self._serves = (self.second.sizes > 0).numpy()

    @property
    def second_has_class(self) -> torch.Tensor:
        """BoolTensor[K]: which classes the second pool can serve."""
        if self.second is None:
            return torch.zeros(self.num_classes, dtype=torch.bool)
        return self.second.sizes > 0

    def _pair_probabilities(self, distribution: torch.Tensor) -> torch.Tensor:
        """The K^2 pair probabilities in float64, converted only when ``distribution`` changes."""
        if distribution is self._source and distribution._version == self._source_version:
            return self._probabilities
        k = self.num_classes
        if distribution.shape != (k, k):
            raise ValueError(
                f"`distribution` must be Tensor[{k}, {k}], got shape {tuple(distribution.shape)}"
            )
        flat = to_host(distribution).flatten().double()
        if not torch.isfinite(flat).all() or (flat < 0).any() or flat.sum() <= 0:
            raise ValueError("`distribution` must be finite and non-negative with a positive sum")
        self._probabilities = flat
        self._source, self._source_version = distribution, distribution._version
        return flat

    def _draw(
        self, indices: np.ndarray, starts: np.ndarray, sizes: np.ndarray, last: np.ndarray,
        classes: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        """:meth:`ClassPools.draw` on precomputed tables (the same generator call)."""
        uniforms = torch.rand(classes.shape[0], generator=self.generator).numpy()
        offsets = (uniforms * sizes[classes]).astype(np.int64)
        np.minimum(offsets, last[classes], out=offsets)  # rand can round up to exactly 1.0
        return indices[starts[classes] + offsets]

    def sample(
        self, distribution: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draws a batch of pairs.

        Args:
            distribution: Tensor[K, K] of pair probabilities (sums to 1).
            batch_size: B.

        Returns:
            ``(first_index, second_index, second_from_second_pool, label)``, each Tensor[B]
            on the CPU: indices into the first pool, indices into the second pool (or into
            the first pool where ``second_from_second_pool`` is False), and the label i.
        """
        probabilities = self._pair_probabilities(distribution)
        pairs = torch.multinomial(
            probabilities, batch_size, replacement=True, generator=self.generator
        ).numpy()
        first_class = self._first_class[pairs]
        second_class = self._second_class[pairs]
        first_tables = (self._first_indices, self._first_starts, self._first_sizes,
                        self._first_last)  # fmt: skip
        first_index = self._draw(*first_tables, first_class)
        if self.second is None:
            from_second = np.zeros(batch_size, dtype=bool)
            second_index = self._draw(*first_tables, second_class)
        else:
            from_second = self._serves[second_class]
            second_index = np.empty(batch_size, dtype=np.int64)
            if from_second.any():
                second_index[from_second] = self._draw(
                    self._second_indices, self._second_starts, self._second_sizes,
                    self._second_last, second_class[from_second],
                )  # fmt: skip
            if not from_second.all():
                second_index[~from_second] = self._draw(*first_tables, second_class[~from_second])
        return (
            torch.from_numpy(first_index),
            torch.from_numpy(second_index),
            torch.from_numpy(from_second),
            torch.from_numpy(first_class),
        )
