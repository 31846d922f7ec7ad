"""How the two samples of a SelMix pair are mixed (paper App. K.3, Table K.5).

The SelMix policy decides *which classes* are mixed: it draws the pairs (i, j) from the
gain matrix. How a sample x1 of class i and a sample x2 of class j are mixed is a separate
choice, the fine-tuning setting ``mixup``:

* ``"feature"`` (the paper's method, the default): the features are mixed,
  ``lam g(x1) + (1 - lam) g(x2)`` with ``lam ~ U[lam_min, 1]``, and the loss is the
  cross-entropy with label i. The views do this themselves (:mod:`selmix.engine.views`); it is
  not a :class:`MixupOperation`.
* ``"input"``: the images are mixed, ``lam x1 + (1 - lam) x2`` (:class:`InputMixup`).
* ``"cutmix"``: a box of x2 is pasted into x1, its area drawn as in CutMix (Yun et al.,
  2019): side ``sqrt(1 - lam)`` of the image's, centre uniform, clipped to the image
  (:class:`CutMix`).
* any name given to :func:`register_mixup`: a user's :class:`MixupOperation` (PuzzleMix,
  SaliencyMix, a mixup of text or audio embeddings...).

An operation other than ``"feature"`` mixes the model's *inputs*, so the backbone has to
be in the loop: it runs in the backbone phase of a run with ``frozen_backbone`` off (the
head-first phase, on cached features, mixes features), and a frozen-backbone run refuses
it (:func:`check_mixup_needs_backbone`).

The loss of an input-space mix is ``w CE(z, y_i) + (1 - w) CE(z, y_j)`` per pair
(:func:`mixed_cross_entropy`), with ``w`` the operation's ``first_weight``; ``None``
means ``w = 1``, SelMix's label i. The built-in operations keep label i by default
(``labels="first"``); ``labels="mixed"`` weights the labels by the share of x1 in the
input (CutMix's area, mixup's lam). docs/DESIGN.md ("Other mixups") gives the measurement
behind the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from selmix._validation import check_choice
from selmix.devices import to_host

__all__ = [
    "FEATURE",
    "LABEL_RULES",
    "CutMix",
    "InputMixup",
    "MixedBatch",
    "MixupOperation",
    "box_mask",
    "check_mixed_batch",
    "check_mixup_needs_backbone",
    "cutmix_boxes",
    "get_mixup",
    "list_mixups",
    "mixed_cross_entropy",
    "register_mixup",
    "second_labels",
]

#: The name of the paper's feature mixup (done by the views, not an operation).
FEATURE = "feature"
#: How a built-in operation forms the loss: label i only (SelMix), or both labels weighted
#: by the share of x1 in the mixed input (CutMix, mixup).
LABEL_RULES = ("first", "mixed")


@dataclass(frozen=True)
class MixedBatch:
    """What a :class:`MixupOperation` returns.

    Attributes:
        inputs: Tensor[B, ...], the mixed inputs (the model's input shape).
        first_weight: Tensor[B] in [0, 1], the weight of label i in the loss (label j gets
            ``1 - first_weight``), or None for label i only (SelMix's loss).
    """

    inputs: Tensor
    first_weight: Tensor | None = None


@runtime_checkable
class MixupOperation(Protocol):
    """A way of mixing the two inputs of a batch of SelMix pairs.

    Called once per training step with the inputs of the pairs' first samples (class i,
    augmented if ``augment`` is on) and of their second samples (class j), the run's mixing
    weights and its generator; everything random must come from ``generator`` so that a
    seeded run repeats and resumes bit-exactly.
    """

    def __call__(
        self, first: Tensor, second: Tensor, lam: Tensor, generator: torch.Generator
    ) -> MixedBatch:
        """Mixes ``first`` and ``second``.

        Args:
            first: Tensor[B, ...], the inputs of x1 (on the training device).
            second: Tensor[B, ...], the inputs of x2 (same shape).
            lam: float32 Tensor[B] on the same device, the run's draw ``U[lam_min, 1]``
                (the share of x1 for operations that have one; free to ignore).
            generator: the run's CPU generator.

        Returns:
            A :class:`MixedBatch` of B mixed inputs and the loss weights of label i.
        """
        ...


def _as_column(lam: Tensor, like: Tensor) -> Tensor:
    """``lam`` (Tensor[B]) shaped to broadcast over ``like`` (Tensor[B, ...])."""
    return lam.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _check_labels_rule(labels: str) -> str:
    if labels not in LABEL_RULES:
        raise ValueError(f"`labels` must be one of {LABEL_RULES}, got {labels!r}")
    return labels


class InputMixup:
    """Mixup of the inputs (Zhang et al., 2018): ``lam x1 + (1 - lam) x2``.

    Args:
        labels: ``"first"`` (label i, SelMix) or ``"mixed"`` (label i with weight lam,
            label j with ``1 - lam``).
    """

    def __init__(self, labels: str = "first") -> None:
        self.labels = _check_labels_rule(labels)

    def __call__(
        self, first: Tensor, second: Tensor, lam: Tensor, generator: torch.Generator
    ) -> MixedBatch:
        weight = _as_column(lam, first)
        mixed = weight * first + (1 - weight) * second
        return MixedBatch(mixed, lam.float() if self.labels == "mixed" else None)

    def __repr__(self) -> str:
        return f"InputMixup(labels={self.labels!r})"


def cutmix_boxes(
    lam: Tensor, height: int, width: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The CutMix boxes of a batch (Yun et al., 2019, Sec. 3.1), one per pair.

    Each box has sides ``floor(H sqrt(1 - lam))`` x ``floor(W sqrt(1 - lam))`` (area
    ``1 - lam`` of the image before clipping) around a centre drawn uniformly over the
    pixels, and is clipped to the image; the share of x1 left is recomputed from the
    clipped area.

    Args:
        lam: Tensor[B], the share of x1 before clipping.
        height, width: the image size.
        generator: CPU generator of the centres (2 B uniforms).

    Returns:
        ``(boxes, share)``: LongTensor[B, 4] of ``(top, bottom, left, right)`` (half-open:
        rows ``top <= r < bottom``) on the CPU, and float32 Tensor[B] on the CPU, the
        share of x1's pixels outside the box.
    """
    lam = to_host(lam).float()  # the boxes are drawn on the host (CPU generator)
    centres = torch.rand(lam.shape[0], 2, generator=generator)
    cut = torch.sqrt((1 - lam).clamp(min=0.0))
    sides = torch.stack([(height * cut).floor(), (width * cut).floor()], 1).long()
    size = torch.tensor([height, width])
    # the centre pixel uniform in [0, size); rand can round up to exactly 1.0
    centre = torch.minimum((centres * size).long(), size - 1)
    start = (centre - sides // 2).clamp(min=0)
    end = (centre - sides // 2 + sides).clamp(max=size)
    start = torch.minimum(start, end)
    area = ((end - start).prod(1)).float()
    boxes = torch.stack([start[:, 0], end[:, 0], start[:, 1], end[:, 1]], 1)
    return boxes, 1 - area / (height * width)


def box_mask(boxes: Tensor, height: int, width: int, device: Any = None) -> Tensor:
    """BoolTensor[B, 1, H, W], True inside each pair's box (see :func:`cutmix_boxes`)."""
    boxes = boxes.to(device)
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    top, bottom, left, right = (boxes[:, k, None, None] for k in range(4))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return inside[:, None]


class CutMix:
    """CutMix (Yun et al., 2019): a box of x2 pasted into x1 (images Tensor[B, C, H, W]).

    The box covers ``1 - lam`` of the image before clipping (:func:`cutmix_boxes`), with
    ``lam`` the run's draw ``U[lam_min, 1]``: with the default ``lam_min = 0.6`` a box
    covers at most 40% of the image, so x1 (class i) dominates as in feature mixup.

    Args:
        labels: ``"first"`` (label i, SelMix) or ``"mixed"`` (labels weighted by area:
            label i with the share of x1's pixels left, label j with the box's).
    """

    def __init__(self, labels: str = "first") -> None:
        self.labels = _check_labels_rule(labels)

    def __call__(
        self, first: Tensor, second: Tensor, lam: Tensor, generator: torch.Generator
    ) -> MixedBatch:
        if first.dim() != 4:
            raise ValueError(
                f"cutmix mixes images Tensor[B, C, H, W], got inputs of shape {tuple(first.shape)}"
            )
        height, width = first.shape[-2:]
        boxes, share = cutmix_boxes(lam, height, width, generator)
        mixed = torch.where(box_mask(boxes, height, width, first.device), second, first)
        return MixedBatch(mixed, share.to(first.device) if self.labels == "mixed" else None)

    def __repr__(self) -> str:
        return f"CutMix(labels={self.labels!r})"


# -- the registry ---------------------------------------------------------------------------
_MIXUPS: dict[str, MixupOperation | None] = {
    FEATURE: None,
    "input": InputMixup(),
    "cutmix": CutMix(),
}


def register_mixup(
    name: str, operation: MixupOperation | None = None, *, replace: bool = False
) -> Any:
    """Makes a :class:`MixupOperation` available as ``mixup=name`` (the API, the CLI's
    ``--set mixup=NAME`` and ``config.yaml``).

    Use it as a call or as a decorator::

        register_mixup("noise", NoiseMix(0.1))

        @register_mixup("halves")
        def halves(first, second, lam, generator):
            ...

    Args:
        name: the setting's value; not one of the built-in names.
        operation: the callable (omitted: returns a decorator).
        replace: allow replacing an earlier registration of ``name``.

    Returns:
        The operation (or the decorator).

    Raises:
        ValueError: the name is empty, built in, or taken (without ``replace``).
        TypeError: the operation is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if name in (FEATURE, "input", "cutmix"):
        raise ValueError(f"`name` {name!r} is a built-in mixup; choose another name")

    def add(function: MixupOperation) -> MixupOperation:
        if not callable(function):
            raise TypeError(f"`operation` must be callable, got {type(function).__name__}")
        if name in _MIXUPS and not replace:
            raise ValueError(
                f"mixup {name!r} is already registered; pass replace=True to replace it"
            )
        _MIXUPS[name] = function
        return function

    return add if operation is None else add(operation)


def list_mixups() -> list[str]:
    """The names ``mixup`` accepts: the built-in ones, then the registered ones."""
    return list(_MIXUPS)


def get_mixup(name: str) -> MixupOperation | None:
    """The operation registered as ``name``; None for ``"feature"`` (the views' own).

    Raises:
        ValueError: an unknown name (listing the known ones).
    """
    return _MIXUPS[check_choice("mixup", name, list_mixups())]


def check_mixup_needs_backbone(mixup: str, frozen_backbone: bool) -> None:
    """An input-space mixup with cached features is an error that names both settings."""
    if mixup != FEATURE and frozen_backbone:
        raise ValueError(
            f"`mixup` = {mixup!r} mixes the model's inputs, so the backbone must be in the "
            "loop, but `frozen_backbone` is true (the head trains on cached features): set "
            "frozen_backbone=false (--no-frozen-backbone) or mixup='feature'"
        )


def check_mixed_batch(mixed: Any, first: Tensor, operation: Any) -> MixedBatch:
    """The output of a user's operation, checked where it enters the loop.

    Raises:
        TypeError / ValueError: naming the operation, what was expected and what came.
    """
    if not isinstance(mixed, MixedBatch):
        raise TypeError(
            f"mixup operation {operation!r} must return a selmix.core.mixing.MixedBatch, got "
            f"{type(mixed).__name__}"
        )
    batch = first.shape[0]
    if not isinstance(mixed.inputs, Tensor) or mixed.inputs.dim() == 0:
        raise TypeError(f"mixup operation {operation!r}: `inputs` must be a Tensor[B, ...]")
    if mixed.inputs.shape[0] != batch:
        raise ValueError(
            f"mixup operation {operation!r}: `inputs` must hold {batch} rows, got shape "
            f"{tuple(mixed.inputs.shape)}"
        )
    weight = mixed.first_weight
    if weight is not None:
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (batch,):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(
                f"mixup operation {operation!r}: `first_weight` must be Tensor[{batch}], "
                f"got {shape}"
            )
        if not bool(((weight >= 0) & (weight <= 1)).all()):
            raise ValueError(
                f"mixup operation {operation!r}: `first_weight` must lie in [0, 1], got "
                f"values in [{float(weight.min()):.3g}, {float(weight.max()):.3g}]"
            )
    return mixed


def second_labels(
    train_labels: Any, pseudo_labels: Tensor | None, second: Tensor, from_unlabelled: Tensor
) -> Tensor:
    """Label j of each pair: the training label of x2, or its pseudo-label where x2 is
    unlabelled. LongTensor[B] on the CPU (all arguments as in
    :meth:`selmix.engine.views.ModelView.mixed_logits`)."""
    labels = torch.as_tensor(train_labels).long().cpu()
    second = second.long().cpu()
    from_unlabelled = from_unlabelled.bool().cpu()
    result = torch.empty_like(second)
    labelled = ~from_unlabelled
    result[labelled] = labels[second[labelled]]
    if bool(from_unlabelled.any()):
        if pseudo_labels is None:
            raise ValueError("pairs with unlabelled second samples need `pseudo_labels`")
        result[from_unlabelled] = pseudo_labels.long().cpu()[second[from_unlabelled]]
    return result


def mixed_cross_entropy(
    logits: Tensor,
    first_labels: Tensor,
    second_labels: Tensor | Callable[[], Tensor],
    first_weight: Tensor | None,
) -> Tensor:
    """The loss of a batch of mixed inputs, in float32.

    ``mean_b [w_b CE(z_b, y_i) + (1 - w_b) CE(z_b, y_j)]``; with ``first_weight`` None it
    is ``F.cross_entropy(z, y_i)`` exactly, SelMix's loss.

    Args:
        logits: Tensor[B, K].
        first_labels: LongTensor[B], label i (on the logits' device).
        second_labels: LongTensor[B], label j, or a function returning it (called only
            when the weights need it).
        first_weight: Tensor[B] in [0, 1] or None.
    """
    logits = logits.float()
    if first_weight is None:
        return F.cross_entropy(logits, first_labels)
    labels_j = second_labels() if callable(second_labels) else second_labels
    log_probs = torch.log_softmax(logits, dim=1)
    loss_i = -log_probs.gather(1, first_labels[:, None]).squeeze(1)
    loss_j = -log_probs.gather(1, labels_j.to(logits.device)[:, None]).squeeze(1)
    weight = first_weight.to(device=logits.device, dtype=logits.dtype)
    return (weight * loss_i + (1 - weight) * loss_j).mean()


def describe(name: str) -> str:
    """A short description of a mixup name for logs ("cutmix: CutMix(labels='first')")."""
    operation = get_mixup(name)
    return f"{name}: features, label i" if operation is None else f"{name}: {operation!r}"
