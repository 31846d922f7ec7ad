"""Two views of a classifier for fine-tuning: frozen cached features, or the full backbone.

A :class:`ModelView` is what the :class:`selmix.Trainer` (and the baselines) see of the
model: evaluate a data set, predict its labels, the logits of a batch of mixed pairs, and
whether the backbone trains. Both views run on a :class:`selmix.engine.collective.Collective`, so
the same code serves one process and ``torchrun``.

* :class:`FrozenFeatures`: the backbone never changes, so each data set's features are
  computed once (eval mode, no augmentation; shard by shard and gathered across
  processes) and kept in a :class:`FeatureCache`; training mixes cached features and only
  the head learns (its gradients averaged across processes by an optimiser hook).
* :class:`FullBackbone`: every batch goes through the backbone (augmented if asked);
  both images of a pair pass in one forward of :class:`MixupForward`, the module
  DistributedDataParallel wraps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from selmix.core.mixing import check_mixed_batch
from selmix.devices import to_host
from selmix.engine.collective import Collective, SingleProcess, evaluate_across
from selmix.engine.evaluate import Evaluation, class_sums, extract_features, prediction_sums
from selmix.engine.precision import autocast, evaluation_mode

if TYPE_CHECKING:
    from selmix.models import ModelSplit

__all__ = [
    "FeatureCache",
    "FrozenFeatures",
    "FullBackbone",
    "MixupForward",
    "ModelView",
    "PairPools",
    "make_view",
    "predict_logits",
]


def predict_logits(
    split: ModelSplit,
    dataset: Any,
    device: torch.device,
    batch_size: int = 512,
    precision: str = "fp32",
) -> torch.Tensor:
    """The head's logits of every sample (eval mode, no augmentation, inference mode and
    the autocast of the resolved ``precision``): float32 Tensor[N, K] on ``device``.
    Every prediction from images in selmix goes through here."""
    was_training = split.features.training, split.head.training
    split.features.eval()
    split.head.eval()
    try:
        with evaluation_mode(precision, device):
            features = extract_features(
                split.features, dataset, device, batch_size, precision=precision
            )
            logits = split.head(features).float()
        return logits.clone()  # an ordinary tensor (inference tensors cannot be updated)
    finally:
        split.features.train(was_training[0])
        split.head.train(was_training[1])


class PairPools:
    """Where the two sides of the mixup pairs come from.

    The first sample of a pair is always a training sample; the second is a training
    sample, or (semi-supervised) an unlabelled one where the sampler says so.

    Args:
        train: the labelled training set.
        unlabelled: the unlabelled set, or None.
    """

    def __init__(self, train: Any, unlabelled: Any = None) -> None:
        self.train = train
        self.unlabelled = unlabelled

    def second_rows(
        self,
        indices: torch.Tensor,
        from_unlabelled: torch.Tensor,
        rows: Callable[[Any, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``rows(pool, indices)`` of the pairs' second samples, each from its own pool.

        Args:
            indices: LongTensor[B], positions in the pool of each pair.
            from_unlabelled: BoolTensor[B], True where the sample is unlabelled.
            rows: ``(dataset, indices) -> Tensor[b, ...]`` (images or features).
        """
        if self.unlabelled is None or not from_unlabelled.any():
            return rows(self.train, indices)
        if from_unlabelled.all():
            return rows(self.unlabelled, indices)
        unlabelled = rows(self.unlabelled, indices[from_unlabelled])
        labelled = rows(self.train, indices[~from_unlabelled])
        merged = unlabelled.new_empty((indices.numel(), *unlabelled.shape[1:]))
        mask = from_unlabelled.to(merged.device)
        merged[mask] = unlabelled
        merged[~mask] = labelled
        return merged


@runtime_checkable
class ModelView(Protocol):
    """What the fine-tuning engine sees of a model (see the module docstring).

    Attributes:
        split: the model's (features, head) split.
        device: where it computes.
        trains_backbone: whether the backbone's parameters learn (an optimiser group).
    """

    split: ModelSplit
    device: torch.device
    trains_backbone: bool

    def evaluate(self, dataset: Any, soft: bool = True) -> Evaluation:
        """Confusion counts, prototypes and soft counts of ``dataset`` (the whole set);
        with ``soft=False`` a view may leave the soft counts out (None)."""
        ...

    def predict(self, dataset: Any) -> torch.Tensor:
        """Predicted labels of every sample of ``dataset``: LongTensor[N] on the CPU."""
        ...

    def mixed_logits(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        from_unlabelled: torch.Tensor,
        lam: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Logits of the mixed pairs ``lam * phi(x_first) + (1 - lam) * phi(x_second)``.

        Args:
            first: LongTensor[B], training-set positions of the first samples.
            second: LongTensor[B], positions of the second samples in their pool.
            from_unlabelled: BoolTensor[B], True where the second sample is unlabelled.
            lam: Tensor[B, 1] on :attr:`device`, the mixing weights.
            generator: the run's generator (augmentation draws).

        Returns:
            Tensor[B, K] on :attr:`device`, differentiable in the trainable parameters.
        """
        ...

    def mixed_features(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        from_unlabelled: torch.Tensor,
        lam: torch.Tensor,
    ) -> torch.Tensor:
        """The head's input of the mixed pairs, ``lam * g(x_first) + (1 - lam) * g(x_second)``,
        as constants (no autograd): float32 Tensor[B, d] on :attr:`device` (arguments as in
        :meth:`mixed_logits`). Only a view whose backbone does not train has them
        (``trains_backbone`` False); the others raise ValueError."""
        ...

    def mixed_input_logits(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        from_unlabelled: torch.Tensor,
        lam: torch.Tensor,
        generator: torch.Generator,
        operation: Callable[..., Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the pairs mixed in input space by ``operation`` (a
        :class:`selmix.core.mixing.MixupOperation`) and its weights of label i (arguments as
        in :meth:`mixed_logits`). Only a view that runs the backbone on every batch has them
        (``trains_backbone`` True); the others raise ValueError."""
        ...

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the optimiser of the trainable parameters."""
        ...


class FeatureCache:
    """Each data set's backbone features, computed once (eval mode, no augmentation).

    Shared by the frozen views of models with one backbone (e.g. copies of one starting
    model with different heads). Keys are the data set objects themselves.

    Args:
        features: the backbone.
        device: where the features are computed and kept.
        batch_size: batch size of the extraction.
        collective: the processes the extraction is split over.
        precision: a resolved precision: the extraction runs under its autocast (and
            ``no_grad``); the cached features are float32 whatever it is.
    """

    def __init__(
        self,
        features: nn.Module,
        device: torch.device,
        batch_size: int = 512,
        collective: Collective | None = None,
        precision: str = "fp32",
    ) -> None:
        self.features = features
        self.device = device
        self.batch_size = batch_size
        self.collective = collective or SingleProcess()
        self.precision = precision
        self._store: dict[int, tuple[Any, torch.Tensor]] = {}

    def __call__(self, dataset: Any) -> torch.Tensor:
        """Tensor[N, d] on :attr:`device`, the features of every sample of ``dataset``."""
        key = id(dataset)
        if key not in self._store:
            self.features.eval()
            values = self.collective.gather(
                lambda part: extract_features(
                    self.features, part, self.device, self.batch_size, precision=self.precision
                ),
                dataset,
            )
            # the data set is kept with its features so that its id is never reused
            self._store[key] = (dataset, values)
        return self._store[key][1]


class _PairMixing:
    """:meth:`ModelView.mixed_logits` from a view's ``_rows`` (the inputs of some samples
    of a pool) and ``_mix`` (the logits of the mixed inputs)."""

    def __init__(
        self,
        split: ModelSplit,
        device: torch.device,
        collective: Collective | None,
        pools: PairPools | None,
    ) -> None:
        self.split = split
        self.device = device
        self.collective = collective or SingleProcess()
        self.pools = pools

    def _rows(self, dataset: Any, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _mix(self, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mixed_logits(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        from_unlabelled: torch.Tensor,
        lam: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """See :meth:`ModelView.mixed_logits`."""
        if self.pools is None:
            raise ValueError("this view was made without `pools`: it cannot draw pairs")

        def rows(dataset: Any, index: torch.Tensor) -> torch.Tensor:
            return self._rows(dataset, index, generator)

        first_rows = rows(self.pools.train, first)
        return self._mix(first_rows, self.pools.second_rows(second, from_unlabelled, rows), lam)


class FrozenFeatures(_PairMixing):
    """The head trains on cached features; the backbone never changes.

    Args:
        split: the model's split.
        device: where to compute.
        collective: the processes of the run.
        batch_size: batch size of the feature extraction.
        pools: the pair pools (needed by :meth:`mixed_logits` only).
        cache: a :class:`FeatureCache` of the same backbone to share (default: a new one).
        precision: a resolved precision, used by the feature extraction only: the head
            trains and evaluates in float32 on the float32 cached features (a d x K
            product gains nothing from bf16 and its step is dominated by overheads).
    """

    trains_backbone = False

    def __init__(
        self,
        split: ModelSplit,
        device: torch.device,
        collective: Collective | None = None,
        batch_size: int = 512,
        pools: PairPools | None = None,
        cache: FeatureCache | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__(split, device, collective, pools)
        self.cache = cache or FeatureCache(
            split.features, device, batch_size, self.collective, precision
        )
        # per data set (kept with it, so that its id is never reused): feature sums, counts
        self._class_sums: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def features(self, dataset: Any) -> torch.Tensor:
        """The cached features of ``dataset``, Tensor[N, d] on :attr:`device`."""
        return self.cache(dataset)

    @torch.no_grad()
    def logits(self, dataset: Any) -> torch.Tensor:
        """The head's logits of every sample, Tensor[N, K] on :attr:`device`."""
        self.split.head.eval()
        return self.split.head(self.features(dataset))

    @torch.no_grad()
    def evaluate(self, dataset: Any, soft: bool = True) -> Evaluation:
        # every process holds all features, so the sums need no reduction; the features
        # never change, so their class sums are computed once per data set, and the soft
        # counts (a K x K softmax over the set, the cost that grows fastest with K) only
        # when asked for
        features = self.features(dataset)
        num_classes = self.split.head.out_features
        labels = torch.as_tensor(dataset.labels).long()
        key = id(dataset)
        if key not in self._class_sums:
            self._class_sums[key] = (dataset, *class_sums(features, labels, num_classes))
        _, feature_sums, class_counts = self._class_sums[key]
        counts, soft_counts = prediction_sums(self.logits(dataset), labels, num_classes, soft)
        return Evaluation.from_sums((counts, feature_sums, class_counts, soft_counts))

    def predict(self, dataset: Any) -> torch.Tensor:
        return to_host(self.logits(dataset).argmax(dim=1))

    def _rows(self, dataset: Any, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.features(dataset)[index.to(self.device)]

    def _mix(self, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return self.split.head(self._blend(first, second, lam))

    @staticmethod
    def _blend(first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return lam * first + (1 - lam) * second

    def mixed_features(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        from_unlabelled: torch.Tensor,
        lam: torch.Tensor,
    ) -> torch.Tensor:
        """The mixed cached features ``lam * g(x_first) + (1 - lam) * g(x_second)``, the
        head's input in :meth:`mixed_logits`: float32 Tensor[B, d] on :attr:`device`
        (arguments as there; no autograd: the features are constants)."""
        if self.pools is None:
            raise ValueError("this view was made without `pools`: it cannot draw pairs")
        cached = self.features
        first_rows = cached(self.pools.train)[first.to(self.device)]
        second_rows = self.pools.second_rows(
            second, from_unlabelled, lambda dataset, index: cached(dataset)[index.to(self.device)]
        )
        return self._blend(first_rows, second_rows, lam)

    def mixed_input_logits(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        from_unlabelled: torch.Tensor,
        lam: torch.Tensor,
        generator: torch.Generator,
        operation: Callable[..., Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See :meth:`ModelView.mixed_input_logits`: cached features have no input to mix."""
        raise ValueError(
            "a frozen-features view mixes cached features; mixing in input space needs the "
            "backbone's forward pass (FullBackbone)"
        )

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        # the head trains outside DDP: same start everywhere, gradients averaged per step
        self.collective.broadcast_module(self.split.head)
        self.collective.average_gradients(optimizer)


class MixupForward(nn.Module):
    """Features of both images in one pass, mixed, then the head (one module for DDP)."""

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(
        self, first: torch.Tensor, second: torch.Tensor | None = None, lam: Any = None
    ) -> torch.Tensor:
        if second is None:
            # inputs mixed before the backbone (selmix.core.mixing): one pass, then the head
            return self.head(self.features(first))
        both = self.features(torch.cat([first, second]))
        first_features, second_features = both[: first.shape[0]], both[first.shape[0] :]
        return self.head(lam * first_features + (1 - lam) * second_features)


class FullBackbone(_PairMixing):
    """Every batch goes through the backbone, which trains with the head.

    Args:
        split: the model's split.
        device: where to compute.
        collective: the processes of the run (the training module is wrapped by it).
        batch_size: batch size of evaluation and prediction.
        pools: the pair pools (needed by :meth:`mixed_logits` only).
        augment: random crop and flip of the training images.
        precision: a resolved precision: the training forward pass runs under its
            autocast (:meth:`mixed_logits` may return bf16 / fp16 logits: take the loss
            of ``logits.float()``), evaluation and prediction under
            :func:`selmix.engine.precision.evaluation_mode`.
    """

    trains_backbone = True

    def __init__(
        self,
        split: ModelSplit,
        device: torch.device,
        collective: Collective | None = None,
        batch_size: int = 512,
        pools: PairPools | None = None,
        augment: bool = False,
        precision: str = "fp32",
    ) -> None:
        super().__init__(split, device, collective, pools)
        self.batch_size = batch_size
        self.augment = augment
        self.precision = precision
        self.mixup = MixupForward(split.features, split.head)
        self.train_module = self.collective.wrap(self.mixup)

    def evaluate(self, dataset: Any, soft: bool = True) -> Evaluation:
        return evaluate_across(
            self.collective, self.mixup, dataset, self.device, self.batch_size,
            features=self.split.features, head=self.split.head, precision=self.precision,
        )  # fmt: skip

    def predict(self, dataset: Any) -> torch.Tensor:
        labels = self.collective.gather(
            lambda part: predict_logits(
                self.split, part, self.device, self.batch_size, self.precision
            ).argmax(1),
            dataset,
        )
        return to_host(labels)

    def _rows(self, dataset: Any, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images, _ = dataset.batch(
            index, augment=self.augment, generator=generator, device=self.device
        )
        return images

    def _mix(self, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self.train_module(first, second, lam)

    def mixed_features(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        from_unlabelled: torch.Tensor,
        lam: torch.Tensor,
    ) -> torch.Tensor:
        """See :meth:`ModelView.mixed_features`: a training backbone's features are no
        constants."""
        raise ValueError(
            "the full-backbone view trains the backbone: its features are not constants "
            "(mixed_features is the frozen-features view's)"
        )

    def mixed_input_logits(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        from_unlabelled: torch.Tensor,
        lam: torch.Tensor,
        generator: torch.Generator,
        operation: Callable[..., Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the pairs mixed in input space by ``operation`` (a
        :class:`selmix.core.mixing.MixupOperation`) and its weights of label i.

        Arguments as in :meth:`mixed_logits` (``lam``: Tensor[B] or Tensor[B, 1]); the
        images are drawn (and augmented) as there, then mixed, then one forward pass.
        """

        if self.pools is None:
            raise ValueError("this view was made without `pools`: it cannot draw pairs")

        def rows(dataset: Any, index: torch.Tensor) -> torch.Tensor:
            return self._rows(dataset, index, generator)

        first_rows = rows(self.pools.train, first)
        second_rows = self.pools.second_rows(second, from_unlabelled, rows)
        mixed = operation(first_rows, second_rows, lam.reshape(-1), generator)
        mixed = check_mixed_batch(mixed, first_rows, operation)
        with autocast(self.precision, self.device):
            return self.train_module(mixed.inputs), mixed.first_weight

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        return None  # DistributedDataParallel (from `wrap`) averages the gradients


def make_view(
    frozen_backbone: bool,
    split: ModelSplit,
    device: torch.device,
    collective: Collective | None = None,
    batch_size: int = 512,
    pools: PairPools | None = None,
    augment: bool = False,
    precision: str = "fp32",
) -> ModelView:
    """:class:`FrozenFeatures` when ``frozen_backbone``, else :class:`FullBackbone`
    (``precision``: a resolved precision, see each view)."""
    if frozen_backbone:
        return FrozenFeatures(split, device, collective, batch_size, pools, precision=precision)
    return FullBackbone(split, device, collective, batch_size, pools, augment, precision)
