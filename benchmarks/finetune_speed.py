"""Fine-tuning speed: SelMix vs plain fine-tuning, feedback share, frozen backbone, sampler.

For each model (``resnet32`` on CIFAR-10-LT, ``small_cnn`` on Fashion-MNIST-LT, both
rho = 100, 500 validation images per class, B = 128 pairs) this times, in one process and
with the measurements interleaved (each of ``--repeats`` rounds runs every measurement
once, in a rotated order; the table reports medians over the rounds, and every ratio is
the median of the per-round ratios, so the two sides of a ratio ran seconds apart):

1. SelMix training steps with the full backbone (:meth:`selmix.Trainer.train_step`: B
   pairs, so 2B images forwarded and back-propagated) vs plain fine-tuning of a copy of
   the same model: cross-entropy on B labelled images drawn uniformly from the training
   set, the same SGD optimiser over head + backbone (the SelMix Trainer's own), batch norm
   in eval mode, the same augmentation path (``train.batch(..., augment=True)``). Per-step
   and per-image ratios.
2. One feedback step (:meth:`selmix.Trainer.feedback`: validation pass, multipliers,
   gain matrix, policy) and its share of SelMix wall time at feedback every E steps,
   ``F / (F + E * S)`` with F the feedback time and S the step time of the same round.
3. Frozen-backbone steps (the head trained on cached features) and the one-off feature
   extraction (training and validation sets), measured as the first frozen feedback +
   first frozen step minus their steady-state medians.
4. ``PairSampler.sample`` for a batch of B pairs as a share of a training step.

Also the feedback step with a smaller evaluation batch (``--small-eval-batch``, default
128, vs FinetuneConfig's 512): on a CPU with one thread, a 512-image batch runs slower per
image than a smaller one.

With ``--precisions`` (default ``fp32 bf16``) and ``--layouts`` (default ``contiguous
channels_last``) a second table times, for ResNet-32 on CIFAR-10-LT, every precision x
layout combination side by side, interleaved in the same way, with ratios to fp32 /
contiguous:

With ``--sections frozen``, frozen-backbone steps: the closed-form head step of the
Trainer against its autograd step, alternating rounds on the same cached features.

5. a pre-training step (:func:`selmix.pretrain`: B images, input mixup, SGD) and the
   implied epoch;
6. a SelMix step with the full backbone (:meth:`selmix.Trainer.train_step` of a Trainer
   with ``precision`` and ``channels_last`` set);
7. a feedback step of that Trainer (:meth:`selmix.Trainer.feedback`: the validation pass
   on the 5,000 validation images in inference mode and autocast, then multipliers, gain
   matrix and policy in float32 / float64, milliseconds for K = 10).

``--sections`` picks ``base`` (the first table), ``precision`` (the second) or both.

Weights are randomly initialised (timing does not depend on them). The Trainers are built
as :func:`selmix.finetune` builds them. On CUDA the clock is read after
``torch.cuda.synchronize()``.

Usage::

    python benchmarks/finetune_speed.py [--models resnet32 small_cnn] [--steps 3]
        [--repeats 3] [--threads 1] [--device cpu|cuda] [--small-eval-batch 128]
        [--sections base precision] [--precisions fp32 bf16]
        [--layouts contiguous channels_last] [--note TEXT] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from selmix.core.policy import StationaryPointWarning
from selmix.data import load_data
from selmix.engine.hardware import machine_description, resolve_hardware, sample_shape
from selmix.engine.precision import resolve_precision
from selmix.engine.pretrain import pretrain
from selmix.finetune import FinetuneConfig, Trainer
from selmix.models import create_model

BATCH_SIZE = 128
EVAL_BATCH = 512  # the automatic eval batch of these 32-pixel models, used for every timing
FEEDBACK_EVERY = (10, 50)
SAMPLER_DRAWS = 50  # sampler calls per round (one call is ~0.1 ms)
FROZEN_CALLS = 500  # frozen steps per round of the frozen section


@dataclass(frozen=True)
class Setup:
    """A model and the data set it is timed on."""

    model: str
    label: str
    spec: str
    max_per_class: int


SETUPS = {
    "resnet32": Setup("resnet32", "CIFAR-10-LT", "cifar10:../shared/data", 4500),
    "small_cnn": Setup(
        "small_cnn", "Fashion-MNIST-LT", "fashion-mnist:../shared/data/fashion-mnist", 5000
    ),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device, calls: int = 1) -> tuple[float, float]:
    """Wall and process CPU seconds per call of ``calls`` consecutive calls.

    Clocks are read after a device sync. The CPU time (this process, all its threads)
    depends less than the wall time on other processes sharing the cores.
    """
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(calls):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / calls, (time.process_time() - cpu_start) / calls


class PlainStep:
    """One plain fine-tuning step: cross-entropy on B labelled images, no mixup.

    Uses a SelMix :class:`Trainer` of its own model copy for everything but the loss: its
    optimiser and scheduler (SGD over head + backbone), its training set's augmentation
    path and its generator, so the only difference from a SelMix step is the batch (B
    images drawn uniformly instead of B pairs) and the loss.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self) -> float:
        trainer = self.trainer
        config = trainer.config
        indices = torch.randint(
            len(trainer.train.labels), (config.batch_size,), generator=trainer.generator
        )
        images, labels = trainer.train.batch(
            indices, augment=config.augment, generator=trainer.generator, device=trainer.device
        )
        trainer.model.eval()  # batch norm frozen, as in SelMix
        loss = F.cross_entropy(trainer.model(images), labels.to(trainer.device))
        loss_value = float(loss.detach())  # SelMix reads the loss too (finite check, logging)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
        return loss_value


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved_rounds(
    measurements: dict[Any, Callable[[], tuple[float, float]]],
    repeats: int,
    describe: Callable[[int, dict[Any, list[float]]], str],
) -> tuple[dict[Any, list[float]], dict[Any, list[float]]]:
    """Runs every measurement once per round, each round starting one measurement further
    along (so none always runs first, on a cold cache); returns the wall and the CPU seconds
    of each measurement per round. ``describe(round_index, wall)`` is printed to stderr
    after each round."""
    keys = list(measurements)
    wall: dict[Any, list[float]] = {key: [] for key in keys}
    cpu: dict[Any, list[float]] = {key: [] for key in keys}
    for round_index in range(repeats):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            seconds, cpu_seconds = measurements[key]()
            wall[key].append(seconds)
            cpu[key].append(cpu_seconds)
        print(describe(round_index, wall), file=sys.stderr, flush=True)
    return wall, cpu


def load_setup(setup: Setup, args: argparse.Namespace) -> tuple[torch.device, Any, torch.nn.Module]:
    """The device, the long-tailed data (rho = 100, 500 validation images per class, seed 0)
    and a freshly initialised model (torch seed 0) of one setup."""
    device = torch.device(args.device)
    data = load_data(
        setup.spec, imbalance=100, max_per_class=setup.max_per_class, val_per_class=500, seed=0
    )
    torch.manual_seed(0)
    model = create_model(setup.model, data.num_classes, in_channels=data.train.image_shape[0])
    return device, data, model


def measure(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of one model, interleaved over ``args.repeats`` rounds."""
    device, data, model = load_setup(setup, args)
    config = FinetuneConfig(
        objective="min_recall",
        batch_size=BATCH_SIZE,
        steps=10**6,
        feedback_every=10**6,
        progress=False,
        device=args.device,
        seed=0,
    )

    def trainer(**changes: Any) -> Trainer:
        return Trainer(copy.deepcopy(model), data.train, data.val, None, config.replace(**changes))

    selmix, plain_trainer, frozen = trainer(), trainer(), trainer(frozen_backbone=True)
    plain = PlainStep(plain_trainer)
    # the same feedback with a smaller evaluation batch (the step is the same)
    small_eval = trainer(eval_batch_size=args.small_eval_batch) if args.small_eval_batch else None

    # warm-up (untimed), then the one-off feature extraction of the frozen Trainer
    selmix.train_step()
    plain()
    first_frozen_feedback = timed(frozen.feedback, device)  # extracts the val features
    first_frozen_step = timed(frozen.train_step, device)  # extracts the train features
    for _ in range(3):
        frozen.train_step()

    frozen_steps = max(10 * args.steps, 20)  # frozen steps take milliseconds
    measurements: dict[str, Callable[[], tuple[float, float]]] = {
        "selmix": lambda: timed(selmix.train_step, device, args.steps),
        "plain": lambda: timed(plain, device, args.steps),
        "feedback": lambda: timed(selmix.engine.feedback, device),
        "frozen": lambda: timed(frozen.train_step, device, frozen_steps),
        "frozen_feedback": lambda: timed(frozen.feedback, device),
        "sampler": lambda: timed(
            lambda: selmix.core.sampler.sample(selmix.distribution, BATCH_SIZE),
            torch.device("cpu"),
            SAMPLER_DRAWS,
        ),
    }
    if small_eval is not None:
        measurements["small_eval_feedback"] = lambda: timed(small_eval.feedback, device)
    names = list(measurements)
    wall, cpu = interleaved_rounds(
        measurements, args.repeats,
        lambda round_index, wall: f"  {setup.model} round {round_index + 1}/{args.repeats}: "
        + ", ".join(f"{name} {wall[name][-1] * 1e3:.1f} ms" for name in names),
    )  # fmt: skip

    def per_round(function: Callable[..., float], *keys: str, clock=wall) -> float:
        return median([function(*values) for values in zip(*(clock[k] for k in keys), strict=True)])

    def share(feedback: str, step: str, every: int) -> float:
        return per_round(lambda f, s: f / (f + every * s), feedback, step)

    def extraction(clock: dict[str, list[float]], index: int) -> float:
        first = first_frozen_feedback[index] + first_frozen_step[index]
        return first - median(clock["frozen_feedback"]) - median(clock["frozen"])

    result = {
        "setup": setup,
        "train": len(data.train),
        "val": len(data.val),
        "image_shape": data.train.image_shape,
        "feature_dim": selmix.split.head.in_features,
        "params": sum(p.numel() for p in model.parameters()),
        "median": {name: median(values) for name, values in wall.items()},
        "cpu": {name: median(values) for name, values in cpu.items()},
        "step_ratio": per_round(lambda s, p: p / s, "selmix", "plain"),
        "step_ratio_cpu": per_round(lambda s, p: p / s, "selmix", "plain", clock=cpu),
        "share": {every: share("feedback", "selmix", every) for every in FEEDBACK_EVERY},
        "frozen_speedup": per_round(lambda s, f: s / f, "selmix", "frozen"),
        "frozen_share": {
            every: share("frozen_feedback", "frozen", every) for every in FEEDBACK_EVERY
        },
        "extraction": extraction(wall, 0),
        "extraction_cpu": extraction(cpu, 1),
        "sampler_share": per_round(lambda d, s: d / s, "sampler", "selmix"),
        "sampler_share_frozen": per_round(lambda d, s: d / s, "sampler", "frozen"),
    }
    if small_eval is not None:
        result["small_eval_share"] = {
            every: share("small_eval_feedback", "selmix", every) for every in FEEDBACK_EVERY
        }
        result["small_eval_speedup"] = per_round(
            lambda big, small: big / small, "feedback", "small_eval_feedback"
        )
    return result


PRECISION_QUANTITIES = ("pretrain", "selmix", "validation")


def measure_precision(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Pre-training step, SelMix step and validation pass per precision x layout."""
    device, data, model = load_setup(setup, args)
    config = FinetuneConfig(
        objective="min_recall", batch_size=BATCH_SIZE, steps=10**6, feedback_every=10**6,
        progress=False, device=args.device, seed=0,
    )  # fmt: skip
    variants = [
        (resolve_precision(precision, device), layout)
        for precision in args.precisions
        for layout in args.layouts
    ]
    generator = torch.Generator().manual_seed(0)
    steps = args.steps

    def pretrain_steps(precision: str, layout: str) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            index = torch.randperm(len(data.train), generator=generator)[: steps * BATCH_SIZE]
            subset = data.train.subset(index)
            trained = copy.deepcopy(model)
            settings = dict(
                epochs=1, batch_size=BATCH_SIZE, lr=0.1, mixup_alpha=1.0, progress=False,
                device=args.device, precision=precision, threads=args.threads,
                channels_last=layout == "channels_last", seed=0,
            )  # fmt: skip
            # one untimed step first: allocations and oneDNN kernel selection
            pretrain(trained, data.train.subset(index[:BATCH_SIZE]), None, **settings)
            seconds, cpu_seconds = timed(lambda: pretrain(trained, subset, None, **settings),
                                         device)  # fmt: skip
            return seconds / steps, cpu_seconds / steps

        return run

    trainers = {}
    for precision, layout in variants:
        # the Trainer's own settings: autocast placement, fp32 loss, layout
        changes = {"precision": precision, "channels_last": layout == "channels_last"}
        trainer = Trainer(
            copy.deepcopy(model), data.train, data.val, None, config.replace(**changes)
        )
        trainer.train_step()  # warm-up, untimed
        trainers[(precision, layout)] = trainer

    def selmix_steps(precision: str, layout: str) -> Callable[[], tuple[float, float]]:
        return lambda: timed(trainers[(precision, layout)].train_step, device, steps)

    def validation(precision: str, layout: str) -> Callable[[], tuple[float, float]]:
        # a whole feedback step: the validation pass (inference mode + autocast), then
        # multipliers, gain and policy in float32 / float64
        return lambda: timed(trainers[(precision, layout)].feedback, device)

    makers = {"pretrain": pretrain_steps, "selmix": selmix_steps, "validation": validation}
    measurements = {
        (quantity, variant): makers[quantity](*variant)
        for quantity in PRECISION_QUANTITIES
        for variant in variants
    }
    keys = list(measurements)
    wall, cpu = interleaved_rounds(
        measurements, args.repeats,
        lambda round_index, wall: f"  {setup.model} precision round {round_index + 1}/"
        f"{args.repeats}: " + ", ".join(
            f"{q} {p}/{lay} {wall[(q, (p, lay))][-1] * 1e3:.0f} ms" for q, (p, lay) in keys
        ),
    )  # fmt: skip
    base = variants[0]
    # what `auto` (precision and layout) chooses for this model, measured here beside the
    # fixed settings (selmix.engine.hardware; not cached, so that this run measures it)
    auto = resolve_hardware(
        model, sample_shape(data.train), device, "auto", "auto", batch_size=BATCH_SIZE,
        use_cache=False, report=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip

    def ratio(quantity: str, variant: tuple[str, str], clock: dict[Any, list[float]]) -> float:
        pairs = zip(clock[(quantity, base)], clock[(quantity, variant)], strict=True)
        return median([b / v for b, v in pairs])

    return {
        "setup": setup,
        "variants": variants,
        "train": len(data.train),
        "val": len(data.val),
        "median": {key: median(values) for key, values in wall.items()},
        "cpu": {key: median(values) for key, values in cpu.items()},
        "ratio": {(q, v): ratio(q, v, wall) for q in PRECISION_QUANTITIES for v in variants},
        "ratio_cpu": {(q, v): ratio(q, v, cpu) for q in PRECISION_QUANTITIES for v in variants},
        "auto": auto,
    }


def measure_frozen(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Frozen-backbone head steps: the closed-form step against the autograd step (the
    Trainer's path before the closed form: module call, autograd, ``model.eval()``)."""
    device = torch.device(args.device)
    data = load_data(
        setup.spec, imbalance=100, max_per_class=setup.max_per_class, val_per_class=500, seed=0
    )
    torch.manual_seed(0)
    model = create_model(setup.model, data.num_classes, in_channels=data.train.image_shape[0])
    config = FinetuneConfig(
        objective="min_recall", batch_size=BATCH_SIZE, steps=10**6, feedback_every=10**6,
        progress=False, device=args.device, seed=0, frozen_backbone=True,
    )  # fmt: skip
    closed = Trainer(copy.deepcopy(model), data.train, data.val, None, config)
    autograd = Trainer(copy.deepcopy(model), data.train, data.val, None, config)
    autograd._head_step = None
    autograd.view.cache = closed.view.cache  # one feature extraction for both
    for trainer in (closed, autograd):
        for _ in range(20):
            trainer.train_step()
    calls = FROZEN_CALLS
    wall: dict[str, list[float]] = {"closed": [], "autograd": []}
    cpu: dict[str, list[float]] = {"closed": [], "autograd": []}
    for round_index in range(max(args.repeats, 5)):
        order = [("closed", closed), ("autograd", autograd)][:: 1 if round_index % 2 else -1]
        for name, trainer in order:
            seconds, cpu_seconds = timed(trainer.train_step, device, calls)
            wall[name].append(seconds)  # per step already
            cpu[name].append(cpu_seconds)

    def ratio(clock: dict[str, list[float]]) -> float:
        return median([a / c for a, c in zip(clock["autograd"], clock["closed"], strict=True)])

    return {
        "setup": setup,
        "wall": {k: median(v) for k, v in wall.items()},
        "cpu": {k: median(v) for k, v in cpu.items()},
        "ratio": ratio(wall),
        "ratio_cpu": ratio(cpu),
        "dim": closed.split.head.in_features,
        "rounds": len(wall["closed"]),
    }


def frozen_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| frozen-backbone step (B = 128) | autograd step (before) | closed-form step (now) "
        "| speed-up |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        w, c = r["wall"], r["cpu"]
        lines.append(
            f"| {r['setup'].model} (d = {r['dim']}, K = 10) | "
            f"{w['autograd'] * 1e6:.0f} µs ({1 / w['autograd']:,.0f} steps/s; CPU "
            f"{c['autograd'] * 1e6:.0f} µs) | {w['closed'] * 1e6:.0f} µs "
            f"({1 / w['closed']:,.0f} steps/s; CPU {c['closed'] * 1e6:.0f} µs) | "
            f"{r['ratio']:.2f}x wall, {r['ratio_cpu']:.2f}x CPU |"
        )
    return lines


def precision_table(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Rows are quantities, columns the precision x layout variants."""
    variants = result["variants"]
    on_cpu = not args.device.startswith("cuda")
    steps_per_epoch = math.ceil(result["train"] / BATCH_SIZE)

    def cell(quantity: str, variant: tuple[str, str], scale: float = 1.0) -> str:
        seconds = result["median"][(quantity, variant)] * scale
        text = format_seconds(seconds)
        speedup = f"{result['ratio'][(quantity, variant)]:.2f}x"
        if on_cpu:
            text += f" (CPU {format_seconds(result['cpu'][(quantity, variant)] * scale)})"
            speedup += f" wall, {result['ratio_cpu'][(quantity, variant)]:.2f}x CPU"
        return f"{text}, {speedup}"

    def row(name: str, quantity: str, scale: float = 1.0) -> str:
        return f"| {name} | " + " | ".join(cell(quantity, v, scale) for v in variants) + " |"

    b = BATCH_SIZE
    return [
        f"| {result['setup'].model} on {result['setup'].label} | "
        + " | ".join(f"{p} / {layout.replace('_', '-')}" for p, layout in variants)
        + " |",
        "|---|" + "---:|" * len(variants),
        row(f"pre-training step (B = {b}, mixup)", "pretrain"),
        row(
            f"pre-training epoch, implied ({result['train']:,} images, {steps_per_epoch} steps)",
            "pretrain",
            steps_per_epoch,
        ),
        row(f"SelMix step, full backbone (B = {b} pairs)", "selmix"),
        row(f"feedback step (validation pass of {result['val']:,} images + gain)", "validation"),
    ]


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def percent(share: float) -> str:
    return f"{share * 100:.2g}%" if share < 0.01 else f"{share * 100:.1f}%"


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Rows are quantities, columns are the models."""
    b = BATCH_SIZE

    on_cpu = not args.device.startswith("cuda")

    def row(name: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {name} | " + " | ".join(cell(r) for r in results) + " |"

    def step_cell(key: str, rate: str = ".2f") -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            seconds = r["median"][key]
            cpu_time = f"; CPU {format_seconds(r['cpu'][key])}" if on_cpu else ""
            return f"{format_seconds(seconds)} ({1 / seconds:{rate}} steps/s{cpu_time})"

        return cell

    header = (
        "| | " + " | ".join(f"{r['setup'].model} on {r['setup'].label}" for r in results) + " |"
    )
    small_eval_rows = []
    if args.small_eval_batch:
        small = args.small_eval_batch
        small_eval_rows = [
            row(
                f"feedback step with eval batch {small} (vs {EVAL_BATCH})",
                lambda r: (
                    format_seconds(r["median"]["small_eval_feedback"])
                    + (
                        f" (CPU {format_seconds(r['cpu']['small_eval_feedback'])})"
                        if on_cpu
                        else ""
                    )
                    + f", {r['small_eval_speedup']:.2f}x faster"
                ),
            ),
            *(
                row(
                    f"... its share of SelMix wall time, E = {every}",
                    lambda r, e=every: percent(r["small_eval_share"][e]),
                )
                for every in FEEDBACK_EVERY
            ),
        ]
    rows = [
        header,
        "|---|" + "---:|" * len(results),
        row(
            "images (C x H x W), train / val",
            lambda r: "{} x {} x {}, ".format(*r["image_shape"]) + f"{r['train']:,} / {r['val']:,}",
        ),
        row("parameters, feature dim d", lambda r: f"{r['params']:,}, {r['feature_dim']}"),
        row(f"SelMix step, full backbone (B = {b} pairs, {2 * b} images)", step_cell("selmix")),
        row(f"plain fine-tuning step (B = {b} images)", step_cell("plain")),
        row("SelMix / plain, steps per second", lambda r: f"{r['step_ratio']:.2f}x"),
        row("SelMix / plain, images per second", lambda r: f"{2 * r['step_ratio']:.2f}x"),
        *(
            [row("SelMix / plain, steps per CPU second", lambda r: f"{r['step_ratio_cpu']:.2f}x")]
            if on_cpu
            else []
        ),
        row(
            "feedback step (val pass + multipliers + gain + policy)",
            lambda r: (
                format_seconds(r["median"]["feedback"])
                + (f" (CPU {format_seconds(r['cpu']['feedback'])})" if on_cpu else "")
            ),
        ),
        *(
            row(
                f"feedback share of SelMix wall time, E = {every}",
                lambda r, e=every: percent(r["share"][e]),
            )
            for every in FEEDBACK_EVERY
        ),
        *small_eval_rows,
        row("frozen-backbone step (head on cached features)", step_cell("frozen", ",.0f")),
        row(
            "frozen / full-backbone SelMix, steps per second",
            lambda r: f"{r['frozen_speedup']:,.0f}x",
        ),
        row(
            "one-off feature extraction, frozen (train + val images)",
            lambda r: (
                f"{format_seconds(r['extraction'])} ({r['train'] + r['val']:,} images"
                + (f"; CPU {format_seconds(r['extraction_cpu'])})" if on_cpu else ")")
            ),
        ),
        row(
            "frozen feedback step (head on cached val features)",
            lambda r: format_seconds(r["median"]["frozen_feedback"]),
        ),
        *(
            row(
                f"frozen feedback share of wall time, E = {every}",
                lambda r, e=every: percent(r["frozen_share"][e]),
            )
            for every in FEEDBACK_EVERY
        ),
        row(
            f"PairSampler.sample, B = {b} pairs",
            lambda r: format_seconds(r["median"]["sampler"]),
        ),
        row("... share of a full-backbone SelMix step", lambda r: percent(r["sampler_share"])),
        row("... share of a frozen-backbone step", lambda r: percent(r["sampler_share_frozen"])),
    ]
    return rows


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=list(SETUPS), choices=list(SETUPS), help="models to time"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="consecutive timed training steps per measurement"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds (medians are over these)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's default)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--small-eval-batch",
        type=int,
        default=128,
        help="also time the feedback step with this evaluation batch size (0: skip)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["base", "precision"],
        choices=["base", "precision", "frozen"],
        help="the tables to measure",
    )
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"],
        choices=["fp32", "bf16", "fp16", "auto"], help="precisions of the second table",
    )  # fmt: skip
    parser.add_argument(
        "--layouts", nargs="+", default=["contiguous", "channels_last"],
        choices=["contiguous", "channels_last"], help="memory layouts of the second table",
    )  # fmt: skip
    parser.add_argument("--note", default=None, help="a line added to the header (conditions)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    # random weights: min recall is often flat, and the policy falls back to uniform
    warnings.filterwarnings("ignore", category=StationaryPointWarning)

    started = time.perf_counter()
    load = load_average()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = (
        [measure(SETUPS[name], args) for name in args.models] if "base" in args.sections else []
    )
    precision_results = (
        [measure_precision(SETUPS["resnet32"], args)] if "precision" in args.sections else []
    )
    frozen_results = (
        [measure_frozen(SETUPS[name], args) for name in args.models]
        if "frozen" in args.sections
        else []
    )
    elapsed = time.perf_counter() - started

    device_name = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else cpu_model()
    )
    lines = [
        f"# Fine-tuning speed ({args.device})",
        "",
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        f"{date}; torch {torch.__version__}, {torch.get_num_threads()} torch CPU thread(s); "
        f"CPU: {machine_description()}"
        + ("" if device_name == cpu_model() else f"; device: {device_name}")
        + f"; 1-minute load average {load:.2f} at start, {load_average():.2f} at the end; "
        f"{elapsed:.0f} s in all.",
    ]
    if args.note:
        lines += ["", args.note]
    if results:
        lines += [
            "",
            f"Randomly initialised weights (timing does not depend on them); objective min recall; "
            f"rho = 100, 500 validation images per class; eval batch {EVAL_BATCH} (the default) "
            f"unless said otherwise. Medians over "
            f"{args.repeats} interleaved rounds; a round times {args.steps} consecutive "
            f"full-backbone steps of each kind, {max(10 * args.steps, 20)} frozen steps, one "
            f"feedback step of each mode and {SAMPLER_DRAWS} sampler draws. Ratios are medians of "
            "the per-round ratios. A SelMix step forwards and back-propagates 2B images (x1 and "
            "x2 of B pairs), a plain step B; images per second = 2 x the steps-per-second ratio. "
            "Feedback share at E = F / (F + E S), from the measured feedback time F and step time "
            "S. The one-off extraction is the first frozen feedback + first frozen step minus "
            "their steady-state medians.",
            "",
            *table(results, args),
        ]
    for result in precision_results:
        lines += [
            "",
            f"Precision and memory layout ({result['setup'].model}): medians over "
            f"{args.repeats} interleaved rounds of {args.steps} consecutive steps (one "
            "feedback step); each cell is the time and the speed-up over "
            f"{result['variants'][0][0]} / {result['variants'][0][1].replace('_', '-')} "
            "(median of the per-round ratios). The SelMix step and the feedback step are "
            "the Trainer's own, with its `precision` and `channels_last` settings.",
            "",
            *precision_table(result, args),
            "",
            f"`auto` here (precision and channels_last both auto, {BATCH_SIZE}-image training "
            "steps timed by selmix.engine.hardware in this run): "
            + result["auto"].describe(("auto", "auto")).removeprefix("selmix hardware: "),
        ]
    if frozen_results:
        lines += [
            "",
            "Frozen-backbone steps (the head on cached features, Trainer.train_step): the "
            "closed-form head step against the autograd step the Trainer took before it "
            "(module call, autograd, zero_grad, model.eval() every step), both in this run "
            f"on the same cached features; medians over {frozen_results[0]['rounds']} "
            f"alternating rounds of {FROZEN_CALLS} steps. The two give bit-identical weights "
            "(tests/test_finetune_precision.py).",
            "",
            *frozen_table(frozen_results),
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
