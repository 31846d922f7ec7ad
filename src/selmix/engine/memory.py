"""Batch sizes bounded by the memory: the evaluation batch sized from the model's activations.

An evaluation or feature-extraction pass holds one batch of inputs and, layer after layer,
the activations of the widest layers; at 224-256 px inputs those, not the data, set the
memory. A small CNN at 256 px evaluated 500 images at a time peaked at 7.5 GB resident,
64 at a time at 1.7 GB (issue 27). So, unless set:

* :func:`activation_profile` runs one forward pass of 2 samples in inference mode and
  counts the bytes every leaf module outputs (forward hooks), per sample: the largest
  output and their sum;
* :func:`eval_batch_size` takes as many samples as fit in :data:`EVAL_MEMORY_BUDGET`
  (or half the available memory when that is less) at ``input + 3 x largest output`` bytes
  each (a layer's input and output plus a residual branch), at most :data:`MAX_EVAL_BATCH`;
* :func:`check_batch_fits` fails early, in one line naming the setting to lower, when a
  batch given explicitly (``eval_batch_size``, or a training ``batch_size`` whose stored
  activations are the sum of the outputs, twice with their gradients) needs more memory
  than the machine has: on Linux a process that runs out of memory is killed without a
  Python error.

:func:`available_memory` reads ``MemAvailable`` (and the cgroup's limit) on the CPU and
``torch.cuda.mem_get_info`` on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix.engine.hardware import sample_shape
from selmix.engine.precision import evaluation_mode

__all__ = [
    "EVAL_MEMORY_BUDGET",
    "MAX_EVAL_BATCH",
    "ActivationProfile",
    "activation_profile",
    "available_memory",
    "check_batch_fits",
    "eval_batch_size",
    "resolve_eval_batch_size",
]

#: Bytes of activations an evaluation batch may hold when sized automatically.
EVAL_MEMORY_BUDGET = 1 << 30
#: The largest automatic evaluation batch (the former fixed default).
MAX_EVAL_BATCH = 512
_GB = 1e9


def _cgroup_free() -> int | None:
    """Bytes left under the cgroup (v2 or v1) memory limit, if there is one."""
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (v1 + "limit_in_bytes", v1 + "usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes a new allocation can take on ``device`` (None when unknown).

    CPU: ``MemAvailable`` of ``/proc/meminfo``, or less under a cgroup limit; CUDA: the free
    bytes of ``torch.cuda.mem_get_info``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = None
    cgroup = _cgroup_free()
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes per sample of one forward pass.

    Attributes:
        input_bytes: one input sample (as the model receives it).
        largest_bytes: the largest output of one leaf module.
        total_bytes: the outputs of all leaf modules (what training keeps for backward).
        input_shape: one sample's shape.
    """

    input_bytes: int
    largest_bytes: int
    total_bytes: int
    input_shape: tuple[int, ...]

    @property
    def eval_bytes(self) -> int:
        """Peak bytes per sample of an evaluation pass (input, a layer's input and output
        and a residual branch held at once)."""
        return self.input_bytes + 3 * self.largest_bytes

    @property
    def train_bytes(self) -> int:
        """Bytes per sample of a training step: the stored activations and their
        gradients."""
        return self.input_bytes + 2 * self.total_bytes


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    logits = getattr(value, "logits", None)  # a Hugging Face output object
    return _tensor_bytes(logits) if isinstance(logits, torch.Tensor) else 0


def activation_profile(
    model: nn.Module,
    input_shape: Sequence[int],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> ActivationProfile:
    """One forward pass of 2 random samples in inference mode, its leaf outputs counted.

    Args:
        model: the model (or feature extractor) a pass runs; its mode is restored.
        input_shape: one sample's shape, e.g. ``(3, 256, 256)``.
        device: where the pass runs (the model's device).
        precision: a resolved precision (bf16 activations take half the bytes).
    """

    shape = tuple(int(size) for size in input_shape)
    samples = 2
    outputs: list[int] = []
    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [
        leaf.register_forward_hook(lambda module, args, out: outputs.append(_tensor_bytes(out)))
        for leaf in leaves
    ]
    was_training = model.training
    model.eval()
    try:
        images = torch.zeros((samples, *shape), device=device)
        with evaluation_mode(precision, device):
            model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    largest = max(outputs, default=0) // samples
    total = sum(outputs) // samples
    return ActivationProfile(images[0].numel() * images.element_size(), largest, total, shape)


def eval_batch_size(
    profile: ActivationProfile, available: int | None, budget: int = EVAL_MEMORY_BUDGET
) -> int:
    """The evaluation batch: as many samples as fit in ``min(budget, available / 2)``
    bytes, between 1 and :data:`MAX_EVAL_BATCH` (a multiple of 8 from 8 on)."""
    if available is not None:
        budget = min(budget, available // 2)
    batch = max(1, min(MAX_EVAL_BATCH, budget // max(1, profile.eval_bytes)))
    return batch - batch % 8 if batch >= 8 else batch


def _describe(profile: ActivationProfile) -> str:
    return "x".join(map(str, profile.input_shape))


def check_batch_fits(
    name: str, batch: int, per_sample: int, available: int | None, profile: ActivationProfile
) -> None:
    """Raises MemoryError (one line naming ``name``) when ``batch`` samples of
    ``per_sample`` bytes need more than the ``available`` memory."""
    needed = batch * per_sample
    if available is not None and needed > available:
        raise MemoryError(
            f"`{name}` = {batch} needs about {needed / _GB:.1f} GB of activations for "
            f"{_describe(profile)} inputs but {available / _GB:.1f} GB are available; lower "
            f"`{name}`"
        )


def resolve_eval_batch_size(
    model: nn.Module,
    dataset_or_shape: Any,
    device: str | torch.device,
    precision: str = "fp32",
    eval_batch: int | None = None,
    train_batch: int | None = None,
) -> int:
    """The evaluation batch of a run: ``eval_batch`` if given (checked against the
    memory), else sized from the activations (:func:`eval_batch_size`); a training
    ``train_batch`` given is checked too.

    Args:
        model: the model (or feature extractor) evaluated.
        dataset_or_shape: the data set (its first sample gives the shape) or a shape.
        device: where it runs.
        precision: a resolved precision.
        eval_batch: the ``eval_batch_size`` setting (None: sized here).
        train_batch: the per-process training batch of a whole-model phase, if any.

    Raises:
        MemoryError: a batch that cannot fit, in one line naming the setting to lower.
    """

    if isinstance(dataset_or_shape, (tuple, list, torch.Size)):
        shape = [int(size) for size in dataset_or_shape]
    else:
        shape = sample_shape(dataset_or_shape)
    profile = activation_profile(model, shape, device, precision)
    available = available_memory(device)
    if train_batch is not None:
        check_batch_fits("batch_size", train_batch, profile.train_bytes, available, profile)
    if eval_batch is not None:
        check_batch_fits("eval_batch_size", eval_batch, profile.eval_bytes, available, profile)
        return eval_batch
    return eval_batch_size(profile, available)
