"""Drawing batches of mixup pairs from the policy with a few tensor operations."""

from __future__ import annotations

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
        self.set_second_labels(second_labels)

    def set_second_labels(self, second_labels: torch.Tensor | None) -> None:
        """Replaces the second pool's labels (pseudo-labels are refreshed at feedback)."""
        self.second = None if second_labels is None else ClassPools(second_labels, self.num_classes)

    @property
    def second_has_class(self) -> torch.Tensor:
        """BoolTensor[K]: which classes the second pool can serve."""
        if self.second is None:
            return torch.zeros(self.num_classes, dtype=torch.bool)
        return self.second.sizes > 0

    def sample(
        self, distribution: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draws a batch of pairs.

        Args:
            distribution: Tensor[K, K] of pair probabilities (sums to 1).
            batch_size: B.

        Returns:
            ``(first_index, second_index, second_from_second_pool, label)``, each Tensor[B]:
            indices into the first pool, indices into the second pool (or into the first
            pool where ``second_from_second_pool`` is False), and the label i.
        """
        flat = distribution.detach().flatten().double().cpu()
        pairs = torch.multinomial(flat, batch_size, replacement=True, generator=self.generator)
        first_class = pairs // self.num_classes
        second_class = pairs % self.num_classes
        first_index = self.first.draw(first_class, self.generator)
        if self.second is None:
            from_second = torch.zeros(batch_size, dtype=torch.bool)
            second_index = self.first.draw(second_class, self.generator)
        else:
            from_second = self.second_has_class[second_class]
            second_index = torch.empty(batch_size, dtype=torch.long)
            if from_second.any():
                second_index[from_second] = self.second.draw(
                    second_class[from_second], self.generator
                )
            if (~from_second).any():
                second_index[~from_second] = self.first.draw(
                    second_class[~from_second], self.generator
                )
        return first_index, second_index, from_second, first_class
