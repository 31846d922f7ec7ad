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
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix._io import atomic_write_text
from selmix.engine.precision import _physical_cores, autocast, resolve_precision
from selmix.models.split import output_tensor

__all__ = [
    "CLEAR_SPEEDUP",
    "HardwareChoice",
    "cache_dir",
    "choose",
    "cpu_flags",
    "machine_description",
    "machine_key",
    "model_key",
    "resolve_for_run",
    "resolve_hardware",
    "sample_shape",
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

    flags = cpu_flags()
    yes = {True: "yes", False: "no"}
    return (
        f"{_cpu_name()}, {_physical_cores()} cores, "
        f"avx512_bf16: {yes['avx512_bf16' in flags]}, amx_bf16: {yes['amx_bf16' in flags]}, "
        f"torch {torch.__version__}"
    )


def machine_key(device: str | torch.device = "cpu") -> str:
    """What the cached choices are keyed on: the CPU model and flags (or the GPU name), the
    CPU threads in use and the torch version."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
    elif device.type == "cpu":
        fast = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"})
        name = f"{_cpu_name()} [{' '.join(fast)}]"
    else:
        name = device.type
    return f"{device.type}: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def model_key(model: nn.Module) -> str:
    """The model's class and a digest of its parameter and buffer names, shapes and dtypes."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return f"{type(model).__module__}.{type(model).__qualname__}:{digest.hexdigest()[:16]}"


def cache_dir() -> Path:
    """``$SELMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/selmix``, else ``~/.cache/selmix``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "selmix"


# -- measuring ----------------------------------------------------------------------------
def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def candidate_name(candidate: Candidate) -> str:
    precision, channels_last = candidate
    return f"{precision}/{'channels-last' if channels_last else 'contiguous'}"


def candidates(
    device: str | torch.device, precision: str, channels_last: bool | str, model: nn.Module
) -> list[Candidate]:
    """The (precision, channels_last) pairs ``auto`` compares, the baseline first.

    ``precision`` or ``channels_last`` given explicitly fixes that axis; the layout is not
    varied for a model without 2-d convolutions (channels-last changes nothing there).
    """
    if precision == "auto":
        precisions = ["fp32", "bf16"]
        if torch.device(device).type == "cuda":
            if torch.cuda.is_bf16_supported():
                precisions.append("fp16")
            else:
                precisions = ["fp32", "fp16"]
        elif torch.device(device).type not in ("cpu",):
            precisions = ["fp32"]
    else:
        precisions = [precision]
    if channels_last == "auto":
        layouts = [False, True] if _has_conv2d(model) else [False]
    else:
        layouts = [bool(channels_last)]
    return [(p, cl) for p in precisions for cl in layouts]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_settings(
    model: nn.Module,
    input_shape: Sequence[int],
    device: str | torch.device,
    settings: Sequence[Candidate],
    *,
    batch_size: int = 64,
    train: bool = True,
    steps: int = 3,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[Candidate, float]:
    """Median seconds per step of each setting (the model itself is left untouched).

    Each setting runs on a copy of ``model``: ``warmup`` steps not counted, then ``steps``
    timed ones. A training step is a forward pass under the precision's autocast, a loss
    on the float32 outputs, backward and an SGD step; with ``train=False`` a step is a
    forward pass under ``torch.inference_mode`` (what a frozen backbone's feature
    extraction and the evaluations cost).

    Args:
        model: the model as the run will use it.
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``.
        device: where the run trains.
        settings: ``(precision, channels_last)`` pairs (resolved precisions).
        batch_size: images per step.
        train: time training steps (else inference passes).
        steps, warmup: timed and untimed steps per setting.
        timer: returns seconds (tests pass a fake one).

    Returns:
        ``{(precision, channels_last): median seconds per step}``.
    """

    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((batch_size, *input_shape), generator=generator).to(device)
    result: dict[Candidate, float] = {}
    for precision, channels_last in settings:
        probe = copy.deepcopy(model).to(device)
        for module in probe.modules():
            # the copy's steps are not the run's: hooks (loggers, probes) stay out of them
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
            module._backward_hooks.clear()
        inputs = images
        if channels_last:
            probe.to(memory_format=torch.channels_last)
            if inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.0)
        probe.train(train)
        seconds = []
        for index in range(warmup + steps):
            _synchronize(device)
            started = timer()
            if train:
                with autocast(precision, device):
                    outputs = output_tensor(probe(inputs))
                loss = outputs.float().square().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                with torch.inference_mode(), autocast(precision, device):
                    output_tensor(probe(inputs))
            _synchronize(device)
            if index >= warmup:
                seconds.append(timer() - started)
        result[(precision, channels_last)] = statistics.median(seconds)
        del probe, optimizer
    return result


def choose(
    timings: dict[Candidate, float], baseline: Candidate, threshold: float = CLEAR_SPEEDUP
) -> Candidate:
    """The fastest setting if it is at least ``threshold`` times faster than ``baseline``,
    else ``baseline``.

    Args:
        timings: seconds per step of each setting (``baseline`` among them).
        baseline: the setting kept unless another is clearly faster.
        threshold: the speed-up that counts as clear.
    """
    if baseline not in timings:
        raise ValueError(f"`baseline` {baseline} is not among the timed settings {list(timings)}")
    fastest = min(timings, key=lambda setting: (timings[setting], setting != baseline))
    if timings[fastest] > 0 and timings[baseline] / timings[fastest] >= threshold:
        return fastest
    return baseline


# -- resolving, with the cache -------------------------------------------------------------
@dataclass(frozen=True)
class HardwareChoice:
    """What ``auto`` resolved to.

    Attributes:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        channels_last: the memory layout.
        source: ``"given"`` (nothing was auto), ``"measured"``, ``"cached"`` (measured
            earlier on this machine) or ``"default"`` (auto without measuring, e.g. in a
            multi-process run).
        timings: seconds per step of each candidate (``"fp32/contiguous": 0.85``), the
            baseline first, when measured.
        machine: :func:`machine_description` of the device.
    """

    precision: str
    channels_last: bool
    source: str
    timings: dict[str, float] = field(default_factory=dict)
    machine: str = ""

    def describe(self, requested: tuple[str, bool | str] | None = None) -> str:
        """One line: what was chosen, from what, on which machine."""
        resolved = (self.precision, str(self.channels_last).lower())
        asked = requested if requested is not None else resolved
        names = ("precision", "channels_last")
        chosen = ", ".join(
            f"{name} {value} -> {result}" if value == "auto" else f"{name} {result}"
            for name, value, result in zip(names, asked, resolved, strict=True)
        )
        if not self.timings:
            return f"selmix hardware: {chosen} ({self.source}; {self.machine})"
        times = ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in self.timings.items())
        return (
            f"selmix hardware: {chosen} ({self.source} per step: {times}; a change needs "
            f">= {CLEAR_SPEEDUP}x over {next(iter(self.timings))}; {self.machine})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "source": self.source,
            "timings": dict(self.timings),
            "machine": self.machine,
        }


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, record: dict[str, Any]) -> None:

    try:
        data = _read_cache(path)
        data[key] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError:
        pass  # a read-only home: measured again next time


def resolve_hardware(
    model: nn.Module,
    input_shape: Sequence[int],
    device: str | torch.device,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    *,
    batch_size: int = 64,
    train: bool = True,
    measure: bool = True,
    use_cache: bool = True,
    timer: Callable[[], float] | None = None,
    report: Callable[[str], None] | None = None,
) -> HardwareChoice:
    """The precision and layout a run uses, ``auto`` measured (see the module docstring).

    Args:
        model: the model the run trains (not changed).
        input_shape: one sample's shape.
        device: the run's device.
        precision: ``"auto"`` or a precision (:data:`selmix.engine.precision.PRECISIONS`).
        channels_last: ``"auto"``, True or False.
        batch_size: images per timed step (at most the run's batch).
        train: time training steps, else inference passes (a frozen backbone).
        measure: False resolves ``auto`` to fp32 / contiguous without timing (e.g. in a
            multi-process run, whose processes must agree).
        use_cache: read and write the cache (:func:`cache_dir`).
        timer: a seconds clock for the timing (tests).
        report: called with the one-line summary when ``auto`` was resolved (default: print
            to stdout).

    Raises:
        ValueError: an unknown precision or layout, or ``"fp16"`` off CUDA.
    """

    if channels_last != "auto" and not isinstance(channels_last, bool):
        raise TypeError(f"`channels_last` must be True, False or 'auto', got {channels_last!r}")
    if precision != "auto":
        resolve_precision(precision, device)  # validates
    device = torch.device(device)
    description = machine_description(device) if device.type in ("cpu", "cuda") else device.type
    if precision != "auto" and isinstance(channels_last, bool):  # nothing is auto
        return HardwareChoice(precision, channels_last, "given", machine=description)
    settings = candidates(device, precision, channels_last, model)
    baseline = settings[0]
    requested = (precision, channels_last)
    if report is None:
        report = _print_line
    if len(settings) == 1:  # nothing to choose (no convolution, one precision)
        return HardwareChoice(*baseline, source="default", machine=description)
    if not measure:
        choice = HardwareChoice(*baseline, source="default", machine=description)
        report(choice.describe(requested))
        return choice
    shape = [int(size) for size in input_shape]
    key = json.dumps(
        {"machine": machine_key(device), "model": model_key(model), "input": shape,
         "batch": batch_size, "train": train, "settings": settings},
        sort_keys=True,
    )  # fmt: skip
    path = cache_dir() / _CACHE_FILE
    cached = _read_cache(path).get(key) if use_cache else None
    if isinstance(cached, dict) and {"precision", "channels_last"} <= set(cached):
        choice = HardwareChoice(
            cached["precision"], bool(cached["channels_last"]), "cached",
            dict(cached.get("timings", {})), description,
        )  # fmt: skip
    else:
        timings = time_settings(
            model, shape, device, settings, batch_size=batch_size, train=train,
            timer=timer or time.perf_counter,
        )  # fmt: skip
        best = choose(timings, baseline)
        named = {candidate_name(s): round(t, 6) for s, t in timings.items()}
        choice = HardwareChoice(*best, source="measured", timings=named, machine=description)
        if use_cache:
            _write_cache(path, key, choice.to_dict())
    report(choice.describe(requested))
    return choice


def _print_line(line: str) -> None:

    print(line, file=sys.stdout, flush=True)


def sample_shape(dataset: Any) -> list[int]:
    """One sample's shape, from a data set with ``batch(indices)`` or ``(x, y)`` items."""
    if hasattr(dataset, "batch"):
        images, _ = dataset.batch(torch.tensor([0]), augment=False)
        return [int(size) for size in images.shape[1:]]
    first = dataset[0][0]
    return [int(size) for size in torch.as_tensor(first).shape]


def resolve_for_run(
    model: nn.Module,
    dataset: Any,
    device: str | torch.device,
    precision: str,
    channels_last: bool | str,
    *,
    batch_size: int,
    train: bool = True,
    processes: int = 1,
    is_main: bool = True,
) -> HardwareChoice:
    """:func:`resolve_hardware` for a run on ``dataset`` (its first sample gives the input
    shape; nothing is read when nothing is ``auto``).

    Args:
        batch_size: the run's batch per process; at most 128 images are timed per step.
        processes: the run's processes; with more than one, ``auto`` gives fp32 /
            contiguous without measuring (each process could measure differently).
        is_main: whether this process prints the one-line summary.
    """
    if precision != "auto" and channels_last != "auto":
        return resolve_hardware(model, (), device, precision, channels_last)
    return resolve_hardware(
        model, sample_shape(dataset), device, precision, channels_last,
        batch_size=max(1, min(int(batch_size), 128)), train=train, measure=processes == 1,
        report=None if is_main else (lambda line: None),
    )  # fmt: skip
