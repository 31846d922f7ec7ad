"""Fine-tuning steps per second with 1 and 2 CPU processes (gloo, DistributedDataParallel).

Each configuration runs SelMix training steps (full backbone, ``small_cnn`` on 28x28 grey
images of 10 classes, the global batch split across processes) after a few warm-up
steps, and times them between barriers. The feedback step is left out: it is the same
work split across ranks plus one all-reduce of a K x K + K x d summary.

Usage::

    python benchmarks/distributed_speed.py [--steps 40] [--batch-size 128] [--warmup 5]

Prints a markdown table and the cost of one gradient all-reduce on its own.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

NUM_CLASSES = 10


def _data(seed: int = 0) -> tuple[Any, Any]:
    """Synthetic Fashion-MNIST-sized data: 28x28 grey images, long-tailed train."""
    from selmix.data import ImageTensorDataset

    generator = torch.Generator().manual_seed(seed)
    counts = [max(8, int(600 * 0.1 ** (k / (NUM_CLASSES - 1)))) for k in range(NUM_CLASSES)]
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    images = torch.randint(0, 256, (labels.numel(), 1, 28, 28), generator=generator)
    train = ImageTensorDataset(images.to(torch.uint8), labels)
    val_labels = torch.arange(NUM_CLASSES).repeat_interleave(20)
    val_images = torch.randint(0, 256, (val_labels.numel(), 1, 28, 28), generator=generator)
    val = ImageTensorDataset(val_images.to(torch.uint8), val_labels, train.mean, train.std)
    return train, val


def _time_steps(
    context: Any, threads: int, batch_size: int, steps: int, warmup: int
) -> dict[str, float]:
    from selmix.finetune import FinetuneConfig, Trainer
    from selmix.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train, val = _data()
    model = create_model("small_cnn", NUM_CLASSES, in_channels=1)
    config = FinetuneConfig(
        batch_size=batch_size, steps=steps + warmup, progress=False, feedback_every=10**6
    )
    trainer = Trainer(model, train, val, "min_recall", config, distributed=context)
    trainer.feedback()  # sets the policy
    for _ in range(warmup):
        trainer.train_step()
    if context is not None:
        context.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if context is not None:
        context.barrier()
    elapsed = time.perf_counter() - started
    result = {"steps_per_s": steps / elapsed}
    if context is not None:  # one gradient all-reduce alone, for the cost breakdown
        size = sum(p.numel() for p in model.parameters())
        flat = torch.zeros(size)
        for _ in range(3):
            context.all_reduce(flat)
        context.barrier()
        started = time.perf_counter()
        for _ in range(20):
            context.all_reduce(flat)
        result["allreduce_ms"] = (time.perf_counter() - started) / 20 * 1e3
        result["params"] = float(size)
    return result


def _worker(rank: int, world_size: int, port: int, out: str, options: dict[str, int]) -> None:
    from selmix.engine.distributed import init_from_env

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    context = init_from_env("cpu")
    try:
        result = _time_steps(context, **options)
        if context.is_main:
            torch.save(result, out)
    finally:
        context.destroy()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed(world_size: int, options: dict[str, int]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.pt")
        mp.start_processes(
            _worker, args=(world_size, _free_port(), out, options), nprocs=world_size,
            start_method="spawn",
        )  # fmt: skip
        return torch.load(out, weights_only=True)


def main() -> None:
    """Runs the configurations and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (pairs)")
    args = parser.parse_args()
    options = {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    rows = [
        ("1 (no torch.distributed)", 1, _time_steps(None, threads=1, **options)),
        ("1 (no torch.distributed)", 2, _time_steps(None, threads=2, **options)),
        ("1 (DDP, gloo)", 1, _distributed(1, {**options, "threads": 1})),
        ("2 (DDP, gloo)", 1, _distributed(2, {**options, "threads": 1})),
    ]
    base = rows[0][2]["steps_per_s"]
    cores = os.cpu_count()
    print(
        f"small_cnn, 28x28x1, K={NUM_CLASSES}, global batch {args.batch_size} pairs "
        f"({2 * args.batch_size} images per step), full backbone, {args.steps} timed steps; "
        f"{cores} CPU cores, load average {load:.1f} before the runs\n"
    )
    print("| processes | threads each | steps/s | pairs/s | vs 1 process, 1 thread |")
    print("|---|---|---|---|---|")
    for name, threads, result in rows:
        speed = result["steps_per_s"]
        print(
            f"| {name} | {threads} | {speed:.2f} | {speed * args.batch_size:.0f} "
            f"| {speed / base:.2f}x |"
        )
    two = rows[3][2]
    print(
        f"\nOne gloo all-reduce of the {int(two['params']):,} gradients (2 processes): "
        f"{two['allreduce_ms']:.2f} ms, {two['allreduce_ms'] * two['steps_per_s'] / 10:.1f}% "
        "of a step."
    )


if __name__ == "__main__":
    main()
