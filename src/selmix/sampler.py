"""Drawing batches of mixup pairs from the policy with a few tensor operations."""

from __future__ import annotations

import numpy as np
import torch

from selmix._validation import check_int

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

    A batch is drawn from one ``torch.rand`` call of 3B uniforms (float64, from the
    sampler's generator): the first B pick the pair by inverting the cumulative
    distribution of the K^2 pairs (a binary search; the CDF is cached until the
    distribution changes), the next B the first sample uniformly within class i and the
    last B the partner uniformly within class j. Per-pair tables of both pools are built
    when the pools change, so a batch is a handful of NumPy operations on the uniforms
    (a few microseconds each, where a small torch operation costs about ten times more).

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
        self._cdf_source: torch.Tensor | None = None
        self._cdf_version = -1
        self._cdf = np.empty(0)
        self.set_second_labels(second_labels)

    def set_second_labels(self, second_labels: torch.Tensor | None) -> None:
        """Replaces the second pool's labels (pseudo-labels are refreshed at feedback)."""
        self.second = None if second_labels is None else ClassPools(second_labels, self.num_classes)
        # Per pair p = i * K + j, the columns of ``_pair_table``: where class i starts in
        # ``_indices`` and its size, where the partner class j starts and its size (in the
        # second pool's part of ``_indices`` when it serves j, else in the first pool's),
        # i, and whether the partner comes from the second pool.
        first = self.first
        from_second = self.second_has_class
        parts = [first.indices]
        partner_starts, partner_sizes = first.starts, first.sizes
        if self.second is not None:
            parts.append(self.second.indices)
            shifted = self.second.starts + first.indices.numel()
            partner_starts = torch.where(from_second, shifted, first.starts)
            partner_sizes = torch.where(from_second, self.second.sizes, first.sizes)
        k = self.num_classes
        i = torch.arange(k).repeat_interleave(k)
        j = torch.arange(k).repeat(k)
        columns = [
            first.starts[i], partner_starts[j], first.sizes[i], partner_sizes[j], i,
            from_second[j].long(),
        ]  # fmt: skip
        self._pair_table = torch.stack(columns).numpy().astype(np.int64)
        self._indices = torch.cat(parts).numpy().astype(np.int64)

    @property
    def second_has_class(self) -> torch.Tensor:
        """BoolTensor[K]: which classes the second pool can serve."""
        if self.second is None:
            return torch.zeros(self.num_classes, dtype=torch.bool)
        return self.second.sizes > 0

    def _cumulative(self, distribution: torch.Tensor) -> np.ndarray:
        """The float64 CDF over the K^2 pairs, recomputed only when ``distribution`` changes."""
        if distribution is self._cdf_source and distribution._version == self._cdf_version:
            return self._cdf
        k = self.num_classes
        if distribution.shape != (k, k):
            raise ValueError(
                f"`distribution` must be Tensor[{k}, {k}], got shape {tuple(distribution.shape)}"
            )
        flat = distribution.detach().flatten().double().cpu()
        if not torch.isfinite(flat).all() or (flat < 0).any() or flat.sum() <= 0:
            raise ValueError("`distribution` must be finite and non-negative with a positive sum")
        cdf = torch.cumsum(flat, 0)
        self._cdf = (cdf / cdf[-1]).numpy()
        self._cdf_source, self._cdf_version = distribution, distribution._version
        return self._cdf

    def sample(
        self, distribution: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draws a batch of pairs.

        Args:
            distribution: Tensor[K, K] of pair probabilities (normalised here).
            batch_size: B.

        Returns:
            ``(first_index, second_index, second_from_second_pool, label)``, each Tensor[B]
            on the CPU: indices into the first pool, indices into the second pool (or into
            the first pool where ``second_from_second_pool`` is False), and the label i.
        """
        cdf = self._cumulative(distribution)
        uniforms = torch.rand(3, batch_size, generator=self.generator, dtype=torch.float64)
        uniforms = uniforms.numpy()
        # side="right": a pair of probability 0 spans an empty interval and is never drawn
        pairs = np.searchsorted(cdf, uniforms[0], side="right")
        np.minimum(pairs, cdf.size - 1, out=pairs)
        table = self._pair_table[:, pairs]  # [6, B]
        # floor(u * n) is uniform on {0, ..., n - 1}; the minimum guards float rounding to n
        offsets = (uniforms[1:] * table[2:4]).astype(np.int64)
        np.minimum(offsets, table[2:4] - 1, out=offsets)
        members = self._indices[table[:2] + offsets]  # [2, B]: first, partner
        return (
            torch.from_numpy(members[0]),
            torch.from_numpy(members[1]),
            torch.from_numpy(table[5].astype(bool)),
            torch.from_numpy(table[4]),
        )
