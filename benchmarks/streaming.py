"""Streaming image folders: loader throughput, peak memory and fine-tuning speed.

Makes an image tree (nothing is committed) of ``--images`` training JPEGs at 256 x 256,
upscaled (bilinear) from the CIFAR-10 JPEG copy in ``/work/shared/data``, 10 classes,
plus 100 test images per class, under ``--tree`` (reused when it is already there), then
measures:

1. **Loader throughput**: images per second of ``StreamingImageDataset.batch`` (256
   random training indices per batch, the ImageNet train transform: random-resized crop
   to 224 and flip, normalised float32 output) with 0, 1 and 2 worker processes; and of
   the in-memory path (``ImageTensorDataset.batch``: index, crop/flip, normalise) on the
   same images decoded at 256 x 256, for comparison.
2. **Peak memory** (``ru_maxrss``) of a fine-tuning run in a child process, streaming vs
   in memory, on the first ``--memory-images`` training images of the tree (the in-memory
   path decodes all of them first; with ``--memory-images`` below the tree size, say so).
   The streaming figure adds the largest worker's peak (workers are children of the run).
3. **Fine-tuning speed**: ``selmix.finetune`` (the library call ``selmix finetune``
   makes) with the frozen and the full backbone, ``small_cnn``, streamed with 2 workers,
   B pairs per step, on a long-tailed subset (``--max-per-class``); steps per second of
   the training loop (steps + feedback), with the frozen backbone's one-off feature
   extraction reported apart.

Prints a table and writes it to ``--out`` (docs/results/streaming.md).

Usage::

    PYTHONPATH=src python benchmarks/streaming.py --images 20000 --tree /tmp/selmix-stream-tree
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

CIFAR_ARCHIVE = Path("/work/shared/data/cifar10-jpeg.tar.gz")


def make_tree(root: Path, images: int, side: int = 256, test_per_class: int = 100) -> None:
    """CIFAR-10 JPEGs upscaled to ``side`` pixels: ``images`` training images (equal
    classes) and ``test_per_class`` test images per class."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{images} {side}":
        return
    per_class = images // 10
    wanted = {"train": per_class, "test": test_per_class}
    written: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_ARCHIVE, "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 4 or parts[-3] not in wanted:
                continue
            split, name = parts[-3], parts[-2]
            count = written.get((split, name), 0)
            if count >= wanted[split]:
                continue
            file = tar.extractfile(member)
            if file is None:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            with Image.open(io.BytesIO(file.read())) as image:
                big = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
                big.save(folder / f"{count:05d}.jpg", quality=90)
            written[(split, name)] = count + 1
            if sum(written.values()) == 10 * (per_class + test_per_class):
                break
    done.write_text(f"{images} {side}")


def make_link_tree(source: Path, root: Path, per_class: int, test_per_class: int) -> None:
    """A smaller tree of symbolic links to the first images of ``source``."""
    for split, count in (("train", per_class), ("test", test_per_class)):
        for folder in sorted((source / split).iterdir()):
            target = root / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir())[:count]:
                link = target / path.name
                if not link.exists():
                    link.symlink_to(path)


def loader_throughput(tree: Path, workers: int, batches: int, batch_size: int) -> float:
    from selmix.data import load_image_folder

    train = load_image_folder(tree, stream=True, num_workers=workers)["train"]
    generator = torch.Generator().manual_seed(0)
    train.batch(torch.randint(len(train), (batch_size,), generator=generator), True, generator)
    start = time.perf_counter()
    for _ in range(batches):
        index = torch.randint(len(train), (batch_size,), generator=generator)
        train.batch(index, augment=True, generator=generator)
    elapsed = time.perf_counter() - start
    train.pool.close()
    return batches * batch_size / elapsed


def in_memory_throughput(tree: Path, images: int, batches: int, batch_size: int) -> float:
    """The in-memory path on ``images`` training images decoded at 256 x 256 (its batches
    are one gather, whatever the number of images held)."""
    from selmix.data import ImageTensorDataset, load_image_folder
    from selmix.data.augment import PILToUint8

    streamed = load_image_folder(tree, stream=True, num_workers=0)["train"]
    chosen = torch.linspace(0, len(streamed) - 1, images).long()
    to_uint8 = PILToUint8()
    decoded = torch.stack(
        [to_uint8(streamed.reader.open(int(streamed.rows[i]))) for i in chosen.tolist()]
    )
    data = ImageTensorDataset(decoded, streamed.labels[chosen], num_classes=10)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(batches):
        index = torch.randint(len(data), (batch_size,), generator=generator)
        data.batch(index, augment=True, generator=generator)
    return batches * batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# child processes


CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from selmix.data import load_image_folder
from selmix.finetune import finetune
from selmix.models import create_model
tree, stream, limit, steps, batch, frozen, max_per_class, crop, eval_batch = sys.argv[1:10]
stream, frozen = stream == "1", frozen == "1"
limit, steps, batch, max_per_class, crop, eval_batch = map(
    int, (limit, steps, batch, max_per_class, crop, eval_batch))
start = time.perf_counter()
splits = load_image_folder(tree, stream=stream, num_workers=2, crop_size=crop)
train, test = splits["train"], splits["test"]
keep = torch.cat([(train.labels == k).nonzero().flatten()[: min(limit // 10, max_per_class)]
                  for k in range(train.num_classes)])
train = train.subset(keep)
val = test.subset(torch.cat([(test.labels == k).nonzero().flatten()[:20] for k in range(10)]))
load_seconds = time.perf_counter() - start
torch.manual_seed(0)
model = create_model("small_cnn", train.num_classes, in_channels=3)
records = []
def callback(record):
    records.append((record["step"], time.perf_counter()))
start = time.perf_counter()
# eval_batch 0: the default (sized from the activations and the memory)
result = finetune(model, train, val, steps=steps, batch_size=batch,
                  feedback_every=max(steps // 2, 1), frozen_backbone=frozen, select="last",
                  progress=False, eval_batch_size=eval_batch or None, augment=True,
                  callback=callback)
total = time.perf_counter() - start
def peak_mb(pid="self"):
    # VmHWM starts afresh at exec (ru_maxrss would carry the parent's peak over)
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
own = peak_mb()
workers = 0.0
iterator = getattr(train.pool._loader, "_iterator", None) if stream else None
for worker in getattr(iterator, "_workers", []):
    workers = max(workers, peak_mb(worker.pid))
print(json.dumps({
    "load_s": load_seconds, "total_s": total,
    # steady state: the last feedback interval (the frozen view extracts the training
    # features once, inside the first interval)
    "loop_s": records[-1][1] - records[-2][1], "loop_steps": records[-1][0] - records[-2][0],
    "first_s": records[0][1] - start, "train_images": len(keep),
    "maxrss_mb": own, "worker_maxrss_mb": workers,
    "eval_batch_size": result.config.eval_batch_size,
}))
"""


def child_run(tree: Path, stream: bool, limit: int, steps: int, batch: int, frozen: bool,
              max_per_class: int, crop: int, eval_batch: int = 128) -> dict:  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [str(tree), "1" if stream else "0", str(limit), str(steps), str(batch),
            "1" if frozen else "0", str(max_per_class), str(crop), str(eval_batch)]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_only(args: argparse.Namespace, began: float) -> None:
    """The peak resident memory of the default frozen-backbone run, streamed and in memory
    (the issue-27 configuration: the whole tree, small_cnn, 224-pixel crops)."""
    from selmix.engine.hardware import machine_description

    runs = []
    for eval_batch in args.memory_eval_batch:
        for stream in (True, False):
            result = child_run(
                args.tree, stream, args.images, args.memory_steps, 128, True, args.images,
                args.crop, eval_batch,
            )  # fmt: skip
            runs.append((stream, eval_batch, result))
            print(f"memory stream={stream} eval_batch={eval_batch}: {result}", flush=True)
    lines = [
        "# Peak memory of a frozen-backbone fine-tuning run, streamed and in memory",
        "",
        f"Command: `PYTHONPATH=src python {' '.join(sys.argv)}`",
        "",
        f"Machine: {machine_description()}, shared with other jobs; 1 torch thread per "
        f"process; total {time.perf_counter() - began:.0f} s. Tree: {args.images:,} training "
        "JPEGs at 256 x 256 (10 classes, upscaled from CIFAR-10; 200 test images used as "
        f"validation); `selmix.finetune` with the frozen backbone, small_cnn, "
        f"{args.memory_steps} steps of 128 pairs, {args.crop}-pixel crops when streamed "
        "(2 workers). Evaluation batch: the default (`eval_batch_size` unset: sized from the "
        "activations and the memory, selmix.engine.memory) or as given.",
        "",
        "| path | eval_batch_size | main process peak RSS (MB) | largest worker peak RSS "
        "(MB) | run (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for stream, eval_batch, result in runs:
        given = "default -> " if eval_batch == 0 else ""
        workers = f"{result['worker_maxrss_mb']:,.0f}" if stream else "-"
        lines.append(
            f"| {'streamed (disk)' if stream else 'in memory'} | {given}"
            f"{result['eval_batch_size']} | {result['maxrss_mb']:,.0f} | {workers} | "
            f"{result['total_s']:.0f} |"
        )
    lines += [
        "",
        "Peak RSS is VmHWM of the run's process (a worker's includes the pages it shares "
        "with the main process, forked).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    from selmix.engine.hardware import machine_description

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path("/tmp/selmix-stream-tree"))
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--memory-images", type=int, default=5000)
    parser.add_argument("--max-per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("docs/results/streaming.md"))
    parser.add_argument(
        "--memory-only", action="store_true",
        help="only the peak memory of a frozen-backbone run on the whole tree, streamed and "
        "in memory, with the default evaluation batch (and --memory-eval-batch N if not 0)",
    )  # fmt: skip
    parser.add_argument("--memory-steps", type=int, default=20)
    parser.add_argument("--memory-eval-batch", type=int, nargs="+", default=[0],
                        help="evaluation batches to compare (0: the default)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()

    start = time.perf_counter()
    make_tree(args.tree, args.images)
    print(f"tree: {args.tree} ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.memory_only:
        memory_only(args, began)
        return

    rows = []
    for workers in (0, 1, 2):
        rate = loader_throughput(args.tree, workers, args.batches, args.batch_size)
        rows.append((f"streamed, {workers} workers", rate))
        print(f"loader {workers} workers: {rate:.0f} images/s", flush=True)
    memory_rate = in_memory_throughput(args.tree, 2000, args.batches, args.batch_size)
    rows.append(("in memory (2,000 decoded 256x256 images)", memory_rate))
    print(f"in memory: {memory_rate:.0f} images/s", flush=True)

    memory_tree = args.tree.with_name(args.tree.name + f"-{args.memory_images}")
    make_link_tree(args.tree, memory_tree, args.memory_images // 10, 20)
    memory = {}
    for stream in (True, False):
        memory[stream] = child_run(
            memory_tree, stream, args.memory_images, 2, 2, False, args.memory_images, 224, 16
        )  # fmt: skip
        print(f"memory stream={stream}: {memory[stream]}", flush=True)

    speed = {}
    for frozen in (True, False):
        speed[frozen] = child_run(
            args.tree, True, args.images, args.steps, args.pairs, frozen, args.max_per_class,
            args.crop,
        )  # fmt: skip
        print(f"finetune frozen={frozen}: {speed[frozen]}", flush=True)

    cores = len(os.sched_getaffinity(0))
    lines = [
        "# Streaming image folders",
        "",
        f"Command: `PYTHONPATH=src python benchmarks/streaming.py --images {args.images} "
        f"--tree {args.tree}` ({machine_description()}, {cores} cores "
        f"shared with other jobs, torch {torch.__version__}, 1 torch thread per process; "
        f"total {time.perf_counter() - began:.0f} s).",
        "",
        f"Tree: {args.images:,} training JPEGs (10 classes) + 1,000 test JPEGs at 256 x 256, "
        "upscaled from the CIFAR-10 JPEG copy (generated by the script, not committed).",
        "",
        f"## Loader throughput (batches of {args.batch_size} random training indices, "
        f"{args.batches} timed batches after one warm-up)",
        "",
        "| path | images/s |",
        "|---|---:|",
        *[f"| {name} | {rate:,.0f} |" for name, rate in rows],
        "",
        "Streamed: decode JPEG, random-resized crop to 224, flip, normalise (ImageNet train "
        "transform). In memory: gather, random crop (padding 4) and flip of the decoded "
        "256 x 256 uint8 images, normalise.",
        "",
        f"## Peak memory of a fine-tuning run ({memory[True]['train_images']:,} training "
        "images, 2 full-backbone steps of 2 pairs, evaluation batches of 16; streamed: "
        "224-pixel crops, in memory: the 256-pixel images)",
        "",
        "| path | main process peak RSS (MB) | largest worker peak RSS (MB) | load time (s) |",
        "|---|---:|---:|---:|",
        f"| streamed, 2 workers | {memory[True]['maxrss_mb']:,.0f} | "
        f"{memory[True]['worker_maxrss_mb']:,.0f} | {memory[True]['load_s']:.1f} |",
        f"| in memory | {memory[False]['maxrss_mb']:,.0f} | - | {memory[False]['load_s']:.1f} |",
        "",
        f"The memory comparison uses a tree of links to the first {args.memory_images:,} "
        "training images (and 20 test images per class) of the big tree, so that the "
        "in-memory side (which decodes every image first) fits the time budget; its peak "
        "grows with the tree, about 196 KB per 256 x 256 image (3.9 GB for 20,000), while "
        "the streamed peak does not. Peak RSS is VmHWM; a worker's includes the pages it "
        "shares with the main process (forked).",
        "",
        f"## `selmix.finetune` speed (small_cnn, streamed with 2 workers, {args.pairs} pairs "
        f"per step, {args.crop}-pixel crops, {speed[True]['train_images']:,} training images)",
        "",
        "| backbone | steps/s (last feedback interval) | run total (s) |",
        "|---|---:|---:|",
        *[
            f"| {'frozen' if frozen else 'fine-tuned'} | "
            f"{result['loop_steps'] / max(result['loop_s'], 1e-9):.2f} | {result['total_s']:.1f} |"
            for frozen, result in speed.items()
        ],
        "",
        f"Steps/s: the steps of the last feedback interval (feedback every {args.steps // 2} "
        "steps) and its feedback pass over 200 test images (20 per class) used as "
        "validation, divided by its wall time; the run total includes the frozen "
        "backbone's one-off feature extraction of the training and validation images.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
