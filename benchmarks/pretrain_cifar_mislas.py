"""Pre-trains ResNet-32 on CIFAR-10-LT with the MiSLAS stage-1 recipe, resumably.

The starting model of the paper's supervised CIFAR-10-LT results (docs/maths.md section 8:
"MiSLAS stage 1 (start)", test mean recall 72.7, min recall 45.6).

Data (the CIFAR-10 JPEG copy in ``../shared/data``): rho = 100 with N_1 = 5000 *before* the
validation split, the long-tail profile of MiSLAS and the paper (class k keeps
``long_tail_counts(5000, 10, 100)[k]`` = 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50
images). The validation set is built as SelMix builds it (its ``datasets/cifar.py``: a
balanced set of 500 images per class from the official training split, disjoint from
training); the test set is the official one. Only class 0 is short: CIFAR-10 has 5000
images per class, so with 500 held out it keeps 4500 (11,906 training images; rho = 90
between class 0 and class 9, every other count exactly the standard one). Per class, one
seeded permutation gives the validation images first and the training images next
(:func:`selmix.data.long_tail_split`, as :func:`selmix.data.load_data` draws its splits).

Recipe (MiSLAS ``config/cifar10/cifar10_imb001_stage1_mixup.yaml``): input mixup
alpha = 1, 200 epochs, SGD lr 0.1, batch 128, momentum 0.9, weight decay 2e-4, random
crop (padding 4) and flip. MiSLAS's CIFAR config sets ``cos: False`` (5 warm-up epochs,
then lr x0.1 at epoch 160 and x0.01 at 180); this run uses the cosine schedule with the
same 5 linear warm-up epochs, as the issue asks. Precision bf16, one CPU thread.

Every epoch writes a checkpoint to ``--ckpt-dir`` (``last.pt``, atomic) and a line to
``--ckpt-dir/log.txt``; running the same command again resumes from it, bit-identically.
When all epochs are done the model, ``config.yaml``, ``metrics.json`` (val and test,
evaluated in float32) and ``time.txt`` go to ``--out``.

``--measure-steps N`` only times N training steps in each precision and layout (bf16 and
fp32, contiguous and channels-last), interleaved, and prints the per-step medians and the
implied epoch times; nothing is trained or written.

Usage (from the project root)::

    OMP_NUM_THREADS=1 nohup python benchmarks/pretrain_cifar_mislas.py \\
        > /work/ckpt/cifar_mislas/stdout.txt 2>&1 &
    python benchmarks/pretrain_cifar_mislas.py --measure-steps 6
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from selmix import create_model
from selmix.data import load_cifar10, long_tail_counts, long_tail_split
from selmix.engine.evaluate import evaluate
from selmix.engine.hardware import machine_description
from selmix.engine.precision import configure_threads
from selmix.engine.pretrain import PretrainConfig, pretrain
from selmix.models.checkpoint import save_model

HEAD_CLASSES = list(range(9))  # as the other CIFAR-10-LT starting model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="CIFAR-10 source")
    parser.add_argument("--cache-dir", default=None, help="decoded-image cache folder")
    parser.add_argument("--ckpt-dir", default="/work/ckpt/cifar_mislas")
    parser.add_argument("--out", default="benchmarks/models/cifar10_lt_resnet32_mislas_s0")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--max-per-class", type=int, default=5000, help="N_1")
    parser.add_argument("--imbalance", type=float, default=100.0, help="rho")
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=2e-4)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument(
        "--lr-schedule", default="cosine", choices=("cosine", "step"),
        help="cosine, or MiSLAS's step schedule (x0.1 at 80%%, x0.01 at 90%% of the epochs)",
    )  # fmt: skip
    parser.add_argument(
        "--head-val-per-class", type=int, default=None,
        help="validation images of class 0 (default: --val-per-class). Smaller values "
        "leave class 0 more of its 5000 images (50: 4950 for training)",
    )  # fmt: skip
    parser.add_argument("--mixup", type=float, default=1.0)
    parser.add_argument(
        "--jpeg-second-dose",
        action="store_true",
        help="degrade every image once more: JPEG quality 50 and chroma at a quarter size",
    )
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-steps", type=int, default=0)
    parser.add_argument("--measure-rounds", type=int, default=3)
    return parser.parse_args(argv)


#: the second dose's JPEG quality: IJG tables scale as 200 - 2 * quality, so quality 50's
#: quantisation steps are twice quality 75's
SECOND_DOSE_QUALITY = 50


def second_jpeg_dose(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W], C = 1 or 3 -> the images after a second, larger dose of the
    copy's JPEG loss.

    The CIFAR-10 copy was encoded at quality 75 with 4:2:0 chroma subsampling (colour at
    half the width and height). The second dose doubles both losses: quantisation at quality
    :data:`SECOND_DOSE_QUALITY` (twice the steps) and, for colour images, chroma at a
    quarter of the width and height (box-filtered, then bilinearly enlarged before a 4:2:0
    encoding). Grey images only get the quantisation.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.dtype != torch.uint8:
        raise ValueError(
            f"`images` must be uint8 [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}"
        )
    out = torch.empty_like(images)
    height, width = images.shape[2:]
    for n, image in enumerate(images):
        if image.shape[0] == 1:
            picture = Image.fromarray(image[0].numpy(), mode="L")
        else:
            luma, blue, red = (
                Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB").convert("YCbCr").split()
            )
            small = (max(width // 4, 1), max(height // 4, 1))
            blue, red = (
                channel.resize(small, Image.BOX).resize((width, height), Image.BILINEAR)
                for channel in (blue, red)
            )
            picture = Image.merge("YCbCr", (luma, blue, red)).convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=SECOND_DOSE_QUALITY, subsampling=2)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert(picture.mode))
        out[n] = torch.from_numpy(
            decoded[None].copy() if decoded.ndim == 2 else decoded.transpose(2, 0, 1).copy()
        )
    return out


def mislas_split(
    source: str, seed: int, max_per_class: int, imbalance: float, val_per_class: int,
    cache_dir: str | None = None, head_val_per_class: int | None = None,
    jpeg_second_dose: bool = False,
) -> tuple[Any, Any, Any, list[int]]:  # fmt: skip
    """``(train, val, test, train_counts)``: N_1 counts first, then the validation split.

    ``head_val_per_class`` (default ``val_per_class``): validation images of class 0, the
    only class whose validation images come out of its long-tail count (the rarer classes
    take theirs from the images the profile leaves unused). The default keeps the split
    every committed CIFAR start was trained on. ``jpeg_second_dose`` degrades every image
    (training, validation and test) once more with :func:`second_jpeg_dose`: twice
    the copy's own JPEG loss, to estimate what that loss costs (issue 23).
    """
    full = load_cifar10(source, train=True, cache_dir=cache_dir)
    test = load_cifar10(source, train=False, cache_dir=cache_dir)
    if jpeg_second_dose:
        full.images, test.images = second_jpeg_dose(full.images), second_jpeg_dose(test.images)
    wanted = long_tail_counts(max_per_class, full.num_classes, imbalance)
    generator = torch.Generator().manual_seed(seed)
    head_val = val_per_class if head_val_per_class is None else head_val_per_class
    per_class_val = [head_val] + [val_per_class] * (full.num_classes - 1)
    available = [
        int(n) - v for n, v in zip(full.class_counts().tolist(), per_class_val, strict=True)
    ]
    counts = [min(w, a) for w, a in zip(wanted, available, strict=True)]
    train_idx, val_idx = long_tail_split(full.labels, counts, per_class_val, generator)
    return full.subset(train_idx), full.subset(val_idx), test, counts


def config_of(args: argparse.Namespace) -> PretrainConfig:
    return PretrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, loss="ce", mixup_alpha=args.mixup, augment=True,
        warmup_epochs=args.warmup_epochs, lr_schedule=args.lr_schedule, seed=args.seed,
        device="cpu", progress=False,
        precision=args.precision, threads=args.threads, channels_last=args.channels_last,
        eval_batch_size=500,
    )  # fmt: skip


def measure(args: argparse.Namespace, train: Any) -> None:
    """Times ``--measure-steps`` steps per setting, interleaved over rounds."""
    steps = args.measure_steps
    settings = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
    per_step: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    generator = torch.Generator().manual_seed(args.seed)
    for round_ in range(args.measure_rounds):
        order = settings[round_ % len(settings) :] + settings[: round_ % len(settings)]
        for precision, channels_last in order:
            index = torch.randperm(len(train), generator=generator)[: steps * args.batch_size]
            subset = train.subset(index)
            torch.manual_seed(args.seed)
            model = create_model("resnet32", 10, in_channels=3)
            config = config_of(args).replace(
                epochs=1, warmup_epochs=0, precision=precision, channels_last=channels_last
            )
            # one warm-up step (allocations, oneDNN kernel selection) outside the clock
            pretrain(model, train.subset(index[: args.batch_size]), None, config)
            started = time.perf_counter()
            pretrain(model, subset, None, config)
            per_step[(precision, channels_last)].append((time.perf_counter() - started) / steps)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    print(
        f"ResNet-32, B = {args.batch_size}, {steps} steps x {args.measure_rounds} rounds, "
        f"{torch.get_num_threads()} thread(s), {len(train)} training images "
        f"({steps_per_epoch} steps per epoch), mixup {args.mixup}, torch {torch.__version__}"
    )
    base = statistics.median(per_step[("fp32", False)])
    print("| precision | layout | step (median) | epoch (implied) | speed-up vs fp32 |")
    print("|---|---|---|---|---|")
    for precision, channels_last in settings:
        median = statistics.median(per_step[(precision, channels_last)])
        layout = "channels-last" if channels_last else "contiguous"
        print(f"| {precision} | {layout} | {median * 1000:.0f} ms | "
              f"{median * steps_per_epoch:.0f} s | {base / median:.2f}x |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)
    train, val, test, counts = mislas_split(
        args.data, args.seed, args.max_per_class, args.imbalance, args.val_per_class,
        args.cache_dir, args.head_val_per_class, args.jpeg_second_dose,
    )  # fmt: skip
    if args.measure_steps:
        measure(args, train)
        return 0

    ckpt_dir = Path(args.ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = ckpt_dir / "last.pt"
    log_path = ckpt_dir / "log.txt"
    config = config_of(args).replace(checkpoint_path=str(checkpoint), checkpoint_every=1)
    resume = checkpoint if checkpoint.is_file() else None

    def log(line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        with log_path.open("a") as file:
            file.write(f"{stamp} {line}\n")

    log(f"start pid {os.getpid()} resume={resume} command: "
        f"{shlex.join([sys.executable, *sys.argv])}")  # fmt: skip
    log(f"train counts {counts} ({sum(counts)} images), val {len(val)}, test {len(test)}")
    clock = {"wall": time.perf_counter(), "cpu": time.process_time()}

    def on_epoch(record: dict[str, Any]) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        wall_s, cpu_s = now - clock["wall"], cpu - clock["cpu"]
        clock.update(wall=now, cpu=cpu)
        val_metrics = record["val"]
        log(
            f"epoch {record['epoch']} loss {record['loss']:.4f} "
            f"val_mean_recall {val_metrics['mean_recall']:.4f} "
            f"val_min_recall {val_metrics['min_recall']:.4f} "
            f"seconds {wall_s:.1f} cpu_seconds {cpu_s:.1f}"
        )
        # kept in the checkpoint's history, so the total survives resumption
        record["seconds"], record["cpu_seconds"] = wall_s, cpu_s

    torch.manual_seed(args.seed)  # the initial weights (overwritten when resuming)
    model = create_model("resnet32", 10, in_channels=3)
    result = pretrain(model, train, val, config, callback=on_epoch, resume=resume)
    log("training done; evaluating in float32")

    metrics = {
        name: evaluate(result.model, split, "cpu", 500).metrics(HEAD_CLASSES)
        for name, split in (("test", test), ("val", val))
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    history = result.history
    wall = sum(record.get("seconds", 0.0) for record in history)
    cpu = sum(record.get("cpu_seconds", 0.0) for record in history)
    settings = {
        "data": f"cifar10:{args.data}",
        "imbalance": args.imbalance,
        "max_per_class": args.max_per_class,
        "val_per_class": args.val_per_class,
        "train_counts": counts,
        "split": "long_tail_counts(max_per_class) capped at the images left after "
        f"val_per_class (class 0: head_val_per_class) are held out (class 0: {counts[0]}); "
        "benchmarks/pretrain_cifar_mislas.py::mislas_split",
        "cache_dir": args.cache_dir,
        "model": "resnet32",
        "out": str(out),
        "model_kwargs": {},
        "epochs": args.epochs,
        "loss": "ce",
        "la_tau": 1.0,
        "mixup": args.mixup,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "lr_schedule": args.lr_schedule,
        "schedule": "linear warm-up (per step), then "
        + ("cosine, per step" if args.lr_schedule == "cosine" else "x0.1 / x0.01 at 80% / 90%"),
        "head_val_per_class": args.head_val_per_class,
        "jpeg_second_dose": args.jpeg_second_dose,
        "augment": True,
        "eval_batch_size": 500,
        "head_classes": HEAD_CLASSES,
        "precision": args.precision,
        "threads": args.threads,
        "channels_last": args.channels_last,
        "progress": False,
        "seed": args.seed,
        "device": "cpu",
        "command": shlex.join(["python", "benchmarks/pretrain_cifar_mislas.py", *sys.argv[1:]]),
        "machine": machine_description(),
    }
    meta = {
        "classes": list(train.classes),
        "pretrain_config": result.config.to_dict(),
        "epochs_trained": len(history),
    }
    save_model(out / "model.pt", result.model, meta)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (out / "time.txt").write_text(
        f"{wall:.2f} s wall {cpu:.2f} s cpu (sum over {len(history)} epochs, "
        f"{args.threads} thread(s), {args.precision})\n"
    )
    summary = {name: {k: round(v, 4) for k, v in all_metrics_short(m).items()}
               for name, m in metrics.items()}  # fmt: skip
    log(f"wrote {out}: {json.dumps(summary)}")
    print(json.dumps(summary))
    return 0


def all_metrics_short(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: metrics[key] for key in ("mean_recall", "min_recall", "g_mean", "h_mean")}


if __name__ == "__main__":
    sys.exit(main())
