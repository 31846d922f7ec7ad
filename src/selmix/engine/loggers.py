"""Loggers for SelMix fine-tuning: TensorBoard (optional extra ``selmix[tensorboard]``).

:class:`TensorBoardLogger` is a ``callback=`` of :func:`selmix.finetune`: each feedback
record becomes scalars (validation metrics, objective, multipliers, largest gain, policy
entropy, learning rates, loss), next to the ``log.jsonl`` the run writes anyway::

    from selmix.engine.loggers import TensorBoardLogger

    with TensorBoardLogger("runs/selmix") as logger:
        result = selmix.finetune(model, train, val, "min_recall", callback=logger)
        logger.log_gains(result.gains)      # the gain matrix of every feedback step

A record that carries the gain matrix itself (key ``"gain"``, Tensor[K, K], as
:class:`selmix.engine.feedback.SelMixFeedback` records do) is drawn as an image at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from selmix.devices import to_host

__all__ = ["TensorBoardLogger", "gain_image"]

# Record fields logged as they are, under the same name.
_SCALARS = (
    "objective", "max_gain", "policy_entropy", "effective_pairs", "lr_head", "lr_backbone",
    "train_loss", "pseudo_label_accuracy", "feedback_seconds",
)  # fmt: skip
# Each image cell of the gain matrix becomes a square of this many pixels (at most 512 wide).
_MAX_IMAGE_SIDE = 512


def gain_image(gain: torch.Tensor) -> torch.Tensor:
    """The gain matrix as an RGB image: red where G > 0, blue where G < 0, white at 0.

    Colours are scaled by ``max |G|`` (so the image shows the pattern, not the size; the
    size is the ``max_gain`` scalar) and each cell is an ``s x s`` square, with
    ``s = max(1, 512 // K)``.

    Args:
        gain: Tensor[K, K], rows i (the label's class), columns j (the mixed-in class).

    Returns:
        float32 Tensor[3, K s, K s] in [0, 1].
    """
    gain = to_host(torch.as_tensor(gain)).double()
    if gain.dim() != 2 or gain.shape[0] != gain.shape[1]:
        raise ValueError(f"`gain` must be a square Tensor[K, K], got shape {tuple(gain.shape)}")
    scale = gain.abs().max()
    scaled = gain / scale if scale > 0 and math.isfinite(float(scale)) else torch.zeros_like(gain)
    positive, negative = scaled.clamp_min(0), (-scaled).clamp_min(0)
    # white fades to red for gains above 0 and to blue for gains below
    red = 1 - negative
    green = 1 - positive - negative
    blue = 1 - positive
    image = torch.stack([red, green, blue]).float().clamp(0, 1)
    side = max(1, _MAX_IMAGE_SIDE // gain.shape[0])
    return image.repeat_interleave(side, dim=1).repeat_interleave(side, dim=2)


class TensorBoardLogger:
    """Writes SelMix feedback records to TensorBoard; use it as ``finetune(callback=...)``.

    Scalars, at the record's ``step``:

    * ``val/<metric>`` for every number in ``record["metrics"]`` (mean recall, min recall,
      G-mean, H-mean, coverage...), and ``val/recall/<k>`` per class;
    * ``objective``, ``max_gain``, ``policy_entropy``, ``effective_pairs``, ``lr_head``,
      ``lr_backbone``, ``train_loss`` (and ``pseudo_label_accuracy`` semi-supervised);
    * ``multipliers/<k>`` when the objective has multipliers.

    Image ``gain`` (:func:`gain_image`) when the record has a ``"gain"`` matrix, or through
    :meth:`log_gains`.

    Args:
        log_dir: the TensorBoard run folder (created if needed).
        **writer_kwargs: passed on to ``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        ImportError: if the ``tensorboard`` package is not installed (naming the extra).
    """

    def __init__(self, log_dir: str | os.PathLike, **writer_kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoardLogger needs the optional package 'tensorboard': "
                "pip install 'selmix[tensorboard]' (or pip install tensorboard)"
            ) from None
        self.log_dir = os.fspath(log_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir, **writer_kwargs)

    def __call__(self, record: Mapping[str, Any]) -> None:
        """Logs one feedback record (the ``callback`` interface of :func:`selmix.finetune`)."""
        if not isinstance(record, Mapping) or "step" not in record:
            raise TypeError("`record` must be a feedback record (a mapping with a 'step')")
        step = int(record["step"])
        for key, value in (record.get("metrics") or {}).items():
            if _is_number(value):
                self.writer.add_scalar(f"val/{key}", float(value), step)
            elif key == "per_class_recall":
                for k, recall in enumerate(value):
                    self.writer.add_scalar(f"val/recall/{k}", float(recall), step)
        for key in _SCALARS:
            if _is_number(record.get(key)):
                self.writer.add_scalar(key, float(record[key]), step)
        for k, multiplier in enumerate(record.get("multipliers") or ()):
            self.writer.add_scalar(f"multipliers/{k}", float(multiplier), step)
        if record.get("gain") is not None:
            self.writer.add_image("gain", gain_image(record["gain"]), step, dataformats="CHW")
        self.writer.flush()

    def log_gains(self, gains: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Draws ``(step, Tensor[K, K])`` gain matrices, e.g. ``FinetuneResult.gains``."""
        for step, gain in gains:
            self.writer.add_image("gain", gain_image(gain), int(step), dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
