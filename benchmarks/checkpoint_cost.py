"""What a resume checkpoint costs next to the training steps between two of them.

Justifies ``FinetuneConfig.checkpoint_every`` (200 steps): builds the fine-tuning
:class:`selmix.finetune.Trainer` for ``--model`` (random weights, synthetic
``--image-size`` images of 10 classes; timing does not depend on either), times
``--steps`` full-backbone training steps of ``--batch-size`` pairs and ``--saves``
checkpoint writes (:meth:`Trainer.save_checkpoint`: state in memory, then an atomic write
with fsync), and prints the checkpoint's size and its cost as a share of the steps between
two checkpoints::

    python benchmarks/checkpoint_cost.py --model resnet32 --threads 1

On a GPU a step is ~50x faster while the write is not, so the share grows: see the
``every`` column for the interval that keeps it under 1%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from selmix.data import ImageTensorDataset
from selmix.finetune import FinetuneConfig, Trainer
from selmix.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    size = args.image_size
    labels = torch.arange(10).repeat_interleave(torch.tensor([100, 60, 36, 22, 13, 8, 5, 3, 2, 1]))
    images = torch.randint(0, 256, (labels.numel(), 3, size, size), generator=generator)
    train = ImageTensorDataset(images.to(torch.uint8), labels, num_classes=10)
    val_labels = torch.arange(10).repeat(20)
    val = ImageTensorDataset(images[: val_labels.numel()].to(torch.uint8), val_labels, 10)
    torch.manual_seed(0)
    model = create_model(args.model, 10, in_channels=3)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "finetune_state.pt"
        config = FinetuneConfig(
            steps=1000, batch_size=args.batch_size, device=args.device, progress=False,
            checkpoint_path=str(path), feedback_every=10**6,
        )  # fmt: skip
        trainer = Trainer(model, train, val, None, config)
        trainer.feedback()
        trainer.train_step()  # warm-up
        steps = []
        for _ in range(args.steps):
            started = time.perf_counter()
            trainer.train_step()
            if args.device != "cpu":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - started)
        trainer.best.offer(trainer.best.score, 0, trainer.model)  # a best copy, as in a run
        saves = []
        for _ in range(args.saves):
            started = time.perf_counter()
            trainer.save_checkpoint()
            saves.append(time.perf_counter() - started)
        megabytes = path.stat().st_size / 2**20
    step, save = statistics.median(steps), statistics.median(saves)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({parameters / 1e6:.2f} M parameters), batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.device}")  # fmt: skip
    print(f"step {step * 1e3:.1f} ms, checkpoint {save * 1e3:.1f} ms ({megabytes:.1f} MiB)")
    for every in (50, 100, 200, 500):
        print(f"every {every:4d} steps: checkpoints cost {100 * save / (every * step):.2f}% "
              "of the training time")  # fmt: skip


if __name__ == "__main__":
    main()
