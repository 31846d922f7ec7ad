"""Builds the packaged Fashion-MNIST-LT demo subset, src/selmix/assets/fashion_mnist_lt_demo.npz.

From the official Fashion-MNIST files: a long-tailed training set (N_1 = 1500, rho = 100,
3,720 images) and a balanced validation set (100 per class), disjoint, both from the
official training split, and a balanced test set (300 per class) from the official test
split, all drawn with a fixed seed. Images are stored as compressed uint8 (about 3 MB).
Fashion-MNIST is MIT-licensed; its notice is copied next to the file.

Usage:
    python scripts/make_demo_subset.py [--source ../shared/data/fashion-mnist]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from selmix.data import (  # noqa: E402  (the package is imported from the source tree)
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    long_tail_counts,
    long_tail_split,
)
from selmix.data.sources import DEMO_FILE  # noqa: E402

FIRST_CLASS = 1500
IMBALANCE = 100.0
VAL_PER_CLASS = 100
TEST_PER_CLASS = 300
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared/data/fashion-mnist")
    parser.add_argument("--out", type=Path, default=REPO / "src/selmix/assets")
    args = parser.parse_args()

    train = load_fashion_mnist(args.source, train=True)
    test = load_fashion_mnist(args.source, train=False)
    counts = long_tail_counts(FIRST_CLASS, train.num_classes, IMBALANCE)
    generator = torch.Generator().manual_seed(SEED)
    train_idx, val_idx = long_tail_split(train.labels, counts, VAL_PER_CLASS, generator)
    test_idx, _ = long_tail_split(test.labels, [TEST_PER_CLASS] * test.num_classes, 0, generator)

    info = {
        "source": "Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017), official IDX files",
        "first_class_count": FIRST_CLASS,
        "imbalance": IMBALANCE,
        "val_per_class": VAL_PER_CLASS,
        "test_per_class": TEST_PER_CLASS,
        "seed": SEED,
        "train_counts": counts,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / DEMO_FILE
    np.savez_compressed(
        path,
        train_images=train.images[train_idx].numpy(),
        train_labels=train.labels[train_idx].numpy().astype(np.uint8),
        val_images=train.images[val_idx].numpy(),
        val_labels=train.labels[val_idx].numpy().astype(np.uint8),
        test_images=test.images[test_idx].numpy(),
        test_labels=test.labels[test_idx].numpy().astype(np.uint8),
        # Positions in the official files, so the subset can be traced back.
        train_source_index=train_idx.numpy().astype(np.int32),
        val_source_index=val_idx.numpy().astype(np.int32),
        test_source_index=test_idx.numpy().astype(np.int32),
        classes=np.array(train.classes),
        mean=np.array(FASHION_MNIST_MEAN, dtype=np.float32),
        std=np.array(FASHION_MNIST_STD, dtype=np.float32),
        info=np.array(json.dumps(info)),
    )
    shutil.copyfile(args.source / "COPYRIGHT", args.out / "FASHION_MNIST_COPYRIGHT")
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): train {train_idx.numel()} "
        f"{counts}, val {val_idx.numel()}, test {test_idx.numel()}"
    )


if __name__ == "__main__":
    main()
