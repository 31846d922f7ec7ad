"""Hardware settings measured on the machine: ``precision="auto"`` and ``channels_last="auto"``.

Which precision and memory layout run fastest depends on the CPU or GPU, the model and the
input size, and CPU flags do not tell: on one AVX-512-bf16 CPU bf16 halved a ResNet-32
step, on another it gained 9% and channels-last fp32 was the fastest
(docs/results/hardware_auto.md). So ``auto`` measures:

* :func:`time_settings` times a few steps of the actual model at the actual input size on
  the actual device for each candidate (fp32 and bf16, plus fp16 on CUDA; contiguous and
  channels-last for models with 2-d convolutions): training steps (forward, backward, SGD)
  or, for a frozen backbone, inference passes. The first ``warmup`` steps are not counted;
  the median of the others is.
* :func:`choose` keeps the baseline (fp32, contiguous) unless a candidate is at least
  :data:`CLEAR_SPEEDUP` times faster; then the fastest wins. A setting given explicitly
  (``precision="bf16"``, ``channels_last=False``) fixes that axis and only the other one is
  measured.
* :func:`resolve_hardware` caches the decision per machine (CPU model or GPU name, and the
  torch version), model (class and parameter shapes) and input shape in
  :func:`cache_dir` (``$SELMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/selmix``, else
  ``~/.cache/selmix``), prints it in one line and returns it; runs record the resolved values
  in their config, so a resumed run or a rerun on another machine can tell.

:func:`machine_description` names the machine in one line (CPU model, cores, bf16 / AMX
flags, or the GPU), for every speed table the benchmarks print.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLEAR_SPEEDUP",
    "HardwareChoice",
    "cache_dir",
    "choose",
    "cpu_flags",
    "machine_description",
    "machine_key",
    "model_key",
    "resolve_hardware",
    "time_settings",
]

#: A candidate replaces fp32 + contiguous only when at least this many times faster.
CLEAR_SPEEDUP = 1.2
#: Where the measured choices are kept unless ``SELMIX_CACHE_DIR`` says otherwise.
CACHE_ENV = "SELMIX_CACHE_DIR"
_CACHE_FILE = "hardware.json"

Candidate = tuple[str, bool]  # (precision, channels_last)
BASELINE: Candidate = ("fp32", False)


# -- the machine --------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty off Linux)."""
    return set(_cpuinfo().get("flags", "").split())


def _cpu_name() -> str:
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "CPU"
    if "cpu family" in info and "model" in info:
        # "AMD EPYC" alone does not tell a Zen 3 from a Zen 4
        name += f" (family {info['cpu family']} model {info['model']})"
    return name


def machine_description(device: str | torch.device = "cpu") -> str:
    """One line naming the machine a speed figure was measured on.

    For a CPU: its model, the cores this process may use, whether it has AVX-512-bf16 and
    AMX, and the torch version, e.g. ``"AMD EPYC (family 25 model 17), 2 cores,
    avx512_bf16: yes, amx_bf16: no, torch 2.4.1"``. For a CUDA device: the GPU's name and
    memory, CUDA and torch versions.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
            f"torch {torch.__version__}"
        )
    from selmix.precision import _physical_cores

    flags = cpu_flags()
    yes = {True: "yes", False: "no"}
    return (
        f"{_cpu_name()}, {_physical_cores()} cores, "
        f"avx512_bf16: {yes['avx512_bf16' in flags]}, amx_bf16: {yes['amx_bf16' in flags]}, "
        f"torch {torch.__version__}"
    )
