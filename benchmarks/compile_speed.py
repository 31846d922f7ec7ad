"""What ``FinetuneConfig(compile=True)`` costs and gains: ``torch.compile`` of ResNet-32's
feature extractor for a SelMix training step (forward and backward of 2B images).

Times, in one process: eager steps (median of ``--repeats``), the first compiled step
(the compile time, which a run pays once) and compiled steps (median), then prints the
break-even step count ``compile time / (eager - compiled)`` beside a typical run length
(1,000 steps, FinetuneConfig's default). Random CIFAR-shaped images; timing does not
depend on the weights.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py [--batch 128] [--repeats 3]
        [--precision fp32] [--out docs/results/compile_speed.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selmix.models import create_model, split_model
from selmix.precision import autocast


def step_function(model: torch.nn.Module, images: torch.Tensor, precision: str):
    split = split_model(model)
    labels = torch.arange(images.shape[0] // 2) % 10
    lam = torch.full((images.shape[0] // 2, 1), 0.8)

    def step() -> None:
        with autocast(precision, "cpu"):
            both = split.features(images)
            half = images.shape[0] // 2
            logits = split.head(lam * both[:half] + (1 - lam) * both[half:])
        loss = F.cross_entropy(logits.float(), labels)
        model.zero_grad(set_to_none=True)
        loss.backward()

    return step


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the compile workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed(function) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    function()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="pairs B (2B images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet32", 10).eval()
    images = torch.randn(2 * args.batch, 3, 32, 32)
    eager = step_function(model, images, args.precision)
    compiled_model = copy.deepcopy(model)
    split_model(compiled_model).features.compile()
    compiled = step_function(compiled_model, images, args.precision)
    eager_times = [timed(eager) for _ in range(args.repeats)]
    first = timed(compiled)
    compiled_times = [timed(compiled) for _ in range(args.repeats)]
    eager_wall = statistics.median(t[0] for t in eager_times)
    eager_cpu = statistics.median(t[1] for t in eager_times)
    comp_wall = statistics.median(t[0] for t in compiled_times)
    comp_cpu = statistics.median(t[1] for t in compiled_times)
    compile_cpu = first[1] - comp_cpu
    saved = eager_cpu - comp_cpu
    break_even = compile_cpu / saved if saved > 0 else float("inf")
    lines = [
        "# torch.compile of the feature extractor (ResNet-32, CPU)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python {shlex.join(sys.argv)}`",
        "",
        f"torch {torch.__version__}, 1 thread, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one SelMix step = forward "
        f"and backward of {2 * args.batch} images, {args.precision}; medians of "
        f"{args.repeats}. CPU = the CPU time of this process and its finished children, the "
        "compile workers (the machine is shared; compile workers still alive are not "
        "counted, so the compile cost is a lower bound).",
        "",
        "| | wall | CPU |",
        "|---|---:|---:|",
        f"| eager step | {eager_wall:.2f} s | {eager_cpu:.2f} s |",
        f"| compiled step | {comp_wall:.2f} s | {comp_cpu:.2f} s |",
        f"| first compiled step (includes compiling) | {first[0]:.1f} s | {first[1]:.1f} s |",
        f"| speed-up per step (CPU) | | {eager_cpu / comp_cpu:.2f}x |",
        f"| steps to pay back the compile time (CPU) | | {break_even:.0f} |",
        "",
        "A default run has 1,000 steps (frozen-backbone runs never call the compiled "
        "extractor after the one-off feature extraction).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
