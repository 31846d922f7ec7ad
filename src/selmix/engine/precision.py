"""Numeric precision, memory layout and CPU threads of training and evaluation passes.

One ``precision`` setting runs a model's forward passes under ``torch.autocast``:

* ``"fp32"``: plain float32, no autocast.
* ``"bf16"``: bfloat16 autocast, on any device. No loss scaling is needed (bf16 has
  float32's exponent range).
* ``"fp16"``: float16 autocast with gradient scaling, CUDA only (CPUs have no fast fp16
  path and an fp16 CPU run would only be slower and less accurate).
* ``"auto"``: measured. A run times a few steps of its model at its input size in each
  precision (and memory layout) and keeps fp32 unless another is clearly faster
  (:func:`selmix.engine.hardware.resolve_hardware`; cached per machine, model and input shape).
  CPU flags do not predict it: on two AVX-512-bf16 CPUs bf16 ran a ResNet-32 step 2x and
  1.09x as fast as fp32. :func:`resolve_precision` alone, without a model to time, resolves
  ``"auto"`` to bf16 on a CUDA device that supports it and to fp32 elsewhere.

Autocast only changes the dtype of the activations of the matrix products and
convolutions. What must stay exact stays in float32 / float64 whatever the precision:
the master weights and optimiser state (autocast never changes parameters), the losses
(computed from ``logits.float()``), the confusion counts (integers), the class-mean
features (summed in float64), the Lagrange multipliers and the gain matrix.

Threads: :func:`configure_threads` sets torch's intra-op thread count. With ``threads=None``
it does nothing when the user already chose (``OMP_NUM_THREADS`` is set); otherwise it uses
the physical cores this process may run on (``os.sched_getaffinity``, hyper-threads of one
core counted once) divided by the processes of this machine (``LOCAL_WORLD_SIZE`` under
torchrun), at least 1 and at most torch's own default. On a machine shared with other jobs
pass ``threads=1``: torch's threads wait on each other when another process holds a core
(on this project's 2-core CPU a float32 ResNet-32 step took 2.6-3.5 s with 2 threads and
a busy second core, against 0.64-0.76 s with 1 thread).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix._config import Choice, FlagOrAuto, Int, Optional, setting

__all__ = [
    "PRECISIONS",
    "autocast",
    "configure_threads",
    "cpu_has_fast_bf16",
    "default_threads",
    "evaluation_mode",
    "grad_scaler",
    "resolve_precision",
    "to_channels_last",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# -- the three hardware settings every training configuration declares --------------------
def precision_setting(default: str = "fp32", **metadata: Any) -> Any:
    """The ``precision`` field of a run configuration (see :func:`selmix._config.setting`;
    ``metadata`` adds ``run``, ``flag``, ``extra``)."""

    return setting(
        default, check=Choice(PRECISIONS), **metadata,
        help="numeric precision of the forward passes: fp32, bf16, fp16 (CUDA, with loss "
        "scaling) or auto (a few steps of the model timed in each; fp32 unless another is "
        ">= 1.2x faster; cached per machine); weights, losses, confusion counts, multipliers "
        "and gain stay float32/64",
    )  # fmt: skip


def threads_setting(**metadata: Any) -> Any:
    """The ``threads`` field of a run configuration."""

    return setting(
        None, check=Optional(Int(1)), metavar="N", **metadata,
        help="torch CPU threads; unset: OMP_NUM_THREADS if set, else the physical cores "
        "this process may use (divided among torchrun's local processes)",
    )  # fmt: skip


def channels_last_setting(default: bool | str = "auto", **metadata: Any) -> Any:
    """The ``channels_last`` field of a run configuration: True, False or ``"auto"``
    (measured, :func:`selmix.engine.hardware.resolve_hardware`; the layout changes no result
    beyond float rounding, so ``"auto"`` is the default)."""

    return setting(
        default, check=FlagOrAuto(), **metadata,
        help="channels-last memory layout for convolutional models: true, false or auto "
        "(a few steps timed in each layout; contiguous unless channels-last is >= 1.2x "
        "faster; cached per machine)",
    )  # fmt: skip


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX-bf16 or AVX-512-bf16 units (Linux ``/proc/cpuinfo`` flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The concrete precision of a run: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Without a model to time, ``"auto"`` is bf16 on a CUDA device with bf16 and fp32
    elsewhere; runs resolve it by measuring (:func:`selmix.engine.hardware.resolve_hardware`).

    Args:
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: the device the run uses.

    Raises:
        ValueError: an unknown value, or ``"fp16"`` on a device other than CUDA.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {list(PRECISIONS)}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"`precision` 'fp16' needs a CUDA device, got device {str(device)!r}; "
            "use 'bf16' or 'fp32'"
        )
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # CPU flags do not tell whether bf16 is faster (selmix.engine.hardware measures it)
    return "fp32"


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (a no-op context for ``"fp32"``).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (resolve ``"auto"`` first with
            :func:`resolve_precision`).
        device: where the forward pass runs.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"`precision` must be 'fp32', 'bf16' or 'fp16' here (resolve 'auto' first), "
            f"got {precision!r}"
        )
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """A gradient scaler: active for ``"fp16"``, a pass-through otherwise.

    Use it the same way in every precision: ``scaler.scale(loss).backward();
    scaler.step(optimizer); scaler.update()``. Disabled, ``scale`` returns the loss
    unchanged and ``step`` calls ``optimizer.step()``, so fp32 and bf16 runs are
    bit-identical to a loop without a scaler.
    """
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")


@contextlib.contextmanager
def evaluation_mode(precision: str = "fp32", device: str | torch.device = "cpu") -> Iterator[None]:
    """``torch.inference_mode`` and the precision's autocast, for evaluation passes.

    Tensors made inside are inference tensors: they can be read and copied but never
    take part in autograd. A feature cache that later feeds a trained head must be built
    under ``torch.no_grad`` instead (or cloned outside this context).
    """
    with torch.inference_mode(), autocast(precision, device):
        yield


def to_channels_last(model: nn.Module) -> nn.Module:
    """Converts a model with 2-d convolutions to the channels-last memory layout, in place.

    Inputs need not be converted: the first convolution accepts either layout. Models
    without a ``Conv2d`` are returned unchanged.
    """
    if any(isinstance(module, nn.Conv2d) for module in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def _physical_cores() -> int:
    """Cores this process may run on, hyper-thread siblings counted once."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def default_threads() -> int:
    """The thread count :func:`configure_threads` uses for ``threads=None`` (see module doc)."""
    processes = 1
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            processes = int(value)
            break
    return max(1, min(_physical_cores() // processes, torch.get_num_threads()))


def configure_threads(threads: int | None = None) -> int:
    """Sets torch's intra-op CPU threads and returns the count in effect.

    Args:
        threads: a count >= 1, or None for the default: leave torch alone when
            ``OMP_NUM_THREADS`` is set, else :func:`default_threads`.
    """
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        threads = default_threads()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be an int >= 1 or None, got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
