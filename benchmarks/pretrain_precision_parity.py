"""Pre-training accuracy and time in float32 and bf16, side by side (Fashion-MNIST-LT).

The recipe of ``benchmarks/models/fmnist_lt_small_cnn_ce_s*`` (small CNN, rho = 100,
N_1 = 5000, 500 validation images per class, 20 epochs, SGD lr 0.05, cosine, batch 128,
crop and flip, cross-entropy), once per precision and seed, alternating precisions. Prints
a markdown table of test mean / min recall and the process CPU time of each run, and the
mean and spread (min-max) over seeds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/pretrain_precision_parity.py \\
        --data fashion-mnist:../shared/data/fashion-mnist [--seeds 0 1 2] [--epochs 20]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from selmix import create_model
from selmix.data import load_data
from selmix.evaluate import evaluate
from selmix.pretrain import pretrain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist:../shared/data/fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[tuple[float, float, float]]] = {p: [] for p in args.precisions}
    for seed in args.seeds:
        data = load_data(args.data, imbalance=100, max_per_class=5000, val_per_class=500,
                         seed=seed)  # fmt: skip
        for precision in args.precisions:
            torch.manual_seed(seed)
            model = create_model("small_cnn", data.num_classes, in_channels=1)
            started = time.process_time()
            pretrain(model, data.train, None, epochs=args.epochs, lr=0.05, seed=seed,
                     precision=precision, channels_last=args.channels_last, threads=1,
                     progress=False)  # fmt: skip
            cpu = time.process_time() - started
            metrics = evaluate(model, data.test, "cpu").metrics()  # float32 evaluation
            rows[precision].append((metrics["mean_recall"], metrics["min_recall"], cpu))
            print(f"seed {seed} {precision}: test mean recall {metrics['mean_recall']:.4f} "
                  f"min recall {metrics['min_recall']:.4f}, {cpu:.0f} s CPU", file=sys.stderr,
                  flush=True)  # fmt: skip
    layout = "channels-last" if args.channels_last else "contiguous"
    lines = [
        f"Command: `python {shlex.join(sys.argv)}` (torch {torch.__version__}, 1 thread, "
        f"{layout}; test metrics evaluated in float32)",
        "",
        "| precision | seed | test mean recall | test min recall | CPU time |",
        "|---|---|---:|---:|---:|",
    ]
    for precision, values in rows.items():
        for seed, (mean_recall, min_recall, cpu) in zip(args.seeds, values, strict=True):
            lines.append(f"| {precision} | {seed} | {mean_recall * 100:.1f} | "
                         f"{min_recall * 100:.1f} | {cpu:.0f} s |")  # fmt: skip
    for precision, values in rows.items():
        columns = list(zip(*values, strict=True))
        cells = []
        for column, scale, unit in ((columns[0], 100, ""), (columns[1], 100, ""),
                                    (columns[2], 1, " s")):  # fmt: skip
            cells.append(f"{statistics.mean(column) * scale:.1f}{unit} "
                         f"({min(column) * scale:.1f}-{max(column) * scale:.1f})")  # fmt: skip
        lines.append(f"| {precision} | mean (min-max) | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
