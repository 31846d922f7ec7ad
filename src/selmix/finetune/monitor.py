"""Monitoring a run: the training loss and its divergence warning (:class:`_LossMonitor`),
the stops on a non-finite loss and on a batch too large for the memory, and the
JSON-lines feedback log."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from selmix._io import atomic_write_text

#: The training loss is reported as diverging above this multiple of
#: ``max(first step's loss, log K)`` (log K: the loss of a uniform guess).
DIVERGENCE_FACTOR = 5.0


class _LossMonitor:
    """The training loss of a run: its mean between feedback steps, its first value and
    the divergence warning (raised once)."""

    def __init__(self, num_classes: int, is_main: bool) -> None:
        self.num_classes, self.is_main = num_classes, is_main
        self.total, self.count = 0.0, 0
        self.start_loss: float | None = None  # the first step's loss
        self.diverged_step: int | None = None

    def add(self, loss: float) -> None:
        if self.start_loss is None:
            self.start_loss = loss
        self.total += loss
        self.count += 1

    def take_mean(self) -> float | None:
        """The mean loss since the last call (None if no step), and a fresh sum."""
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean

    def warn_if_diverging(self, train_loss: float | None, step: int) -> None:
        """Warns once when the mean training loss since the last feedback step is far
        above where it started: ``DIVERGENCE_FACTOR * max(first loss, log K)``.

        The floor log K (a uniform guess) keeps a model that starts almost perfect on its
        training data from warning at the first rise; a loss 5x worse than guessing does
        not happen in a run that learns (``--lr-head 1e3`` reaches 1e4).
        """
        if train_loss is None or self.start_loss is None or self.diverged_step is not None:
            return
        reference = max(self.start_loss, math.log(self.num_classes))
        if train_loss > DIVERGENCE_FACTOR * reference:
            self.diverged_step = step
            if self.is_main:
                # called from Trainer.feedback: the warning points at feedback's caller
                warnings.warn(
                    f"the training loss ({train_loss:.3g} before step {step}) is far above "
                    f"its start ({self.start_loss:.3g}): the run is diverging; lower "
                    "`lr_head` / `lr_backbone`",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's keys ``loss``, ``start_loss`` and ``diverged_step``."""
        return {
            "loss": [self.total, self.count],
            "start_loss": self.start_loss,
            "diverged_step": self.diverged_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.count = state["loss"]
        # checkpoints written before the divergence warning have neither
        self.start_loss = state.get("start_loss")
        self.diverged_step = state.get("diverged_step")


def _check_finite(loss: float, step: int, good_checkpoint: tuple[str, int] | None) -> None:
    """Stops on a non-finite loss, naming a checkpoint only if this run wrote it with
    finite weights (see :meth:`Trainer.save_checkpoint`)."""
    if not math.isfinite(loss):
        where = ""
        if good_checkpoint is not None:
            path, saved_step = good_checkpoint
            where = f"; the last checkpoint with finite weights is {path!r} (step {saved_step})"
        raise FloatingPointError(
            f"non-finite loss ({loss}) at step {step}: lower `lr_head` / "
            f"`lr_backbone` or use `frozen_backbone`{where}"
        )


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or any(
        sign in text for sign in ("out of memory", "DefaultCPUAllocator", "Unable to allocate")
    )


@contextlib.contextmanager
def _batch_must_fit(batch_size: int, device: torch.device) -> Iterator[None]:
    """Turns running out of memory inside the block into one clear error naming
    ``batch_size`` (other errors pass through unchanged)."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        if not _is_out_of_memory(error):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise MemoryError(
            f"`batch_size` = {batch_size} does not fit in the memory of "
            f"{device} ({first}); lower `batch_size`"
        ) from None


def _pseudo_label_report(pseudo_labels: torch.Tensor, unlabelled: Any, num_classes: int) -> dict:
    """The feedback record's pseudo-label histogram (and accuracy, if the labels are known)."""
    histogram = torch.bincount(pseudo_labels, minlength=num_classes)
    report: dict[str, Any] = {"pseudo_label_histogram": histogram.tolist()}
    true_labels = getattr(unlabelled, "hidden_labels", None)
    if true_labels is not None:
        # reporting only: the hidden labels never reach the sampler or the loss
        agree = torch.as_tensor(true_labels).long() == pseudo_labels
        report["pseudo_label_accuracy"] = float(agree.double().mean())
    return report


def _append_json_line(path: str, record: dict[str, Any]) -> None:
    file_path = Path(path)
    file_path.parent.mkdir(parents=True, exist_ok=True)
    with file_path.open("a") as file:
        file.write(json.dumps(record) + "\n")


def _rewrite_log(path: str, history: list[dict[str, Any]]) -> None:
    """Makes the log at ``path`` this run's history: empty for a fresh run, cut back to
    the checkpoint's step for a resumed one (no duplicate or foreign records)."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in history))
