"""Cases of the robustness suite and their cached starting models (not part of the library).

A case is one (data, tail, class order, starting model, validation size, backbone mode,
objective). Its starting model depends only on (data, tail, order, start loss, seed) and is
built once and cached under ``/work/cache/robustness/`` (or ``$SELMIX_ROBUST_CACHE``),
keyed by those settings. The validation set always holds out 500 images per class from the
training split; a case with fewer validation images uses the first ``val_per_class`` of
them, so cases that differ only in validation size share their start.

Class order decides which class gets which training count: ``standard`` gives class k the
k-th largest count, ``reversed`` the k-th smallest, ``shuffled`` a fixed random
assignment. The ImageFolder source is a PNG tree of Fashion-MNIST-LT written once, with
class folders named after the classes (alphabetical order, so the class index is not the
frequency rank), read back by :func:`selmix.data.load_image_folder` like a user's tree.

Run ``python benchmarks/_robust_cases.py`` (1 thread) to build every start in advance.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from selmix import create_model, load_model
from selmix.data import ImageTensorDataset, long_tail_counts, long_tail_split
from selmix.data.sources import load_cifar10, load_fashion_mnist, load_image_folder

DATA_ROOT = Path(os.environ.get("SELMIX_DATA", "/work/shared/data"))
CACHE = Path(os.environ.get("SELMIX_ROBUST_CACHE", "/work/cache/robustness"))
HELD_OUT_VAL = 500  # validation images held out per class (cases use the first n of them)
MAX_PER_CLASS = 2000  # N_1: the head class's training count (small, so starts are cheap)
FMNIST_NAMES = [
    "tshirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]  # fmt: skip


@dataclass(frozen=True)
class StartSpec:
    """What a starting model depends on."""

    data: str  # "fmnist", "cifar10" or "fmnist_folder"
    rho: float
    order: str  # "standard", "reversed", "shuffled"
    loss: str  # "ce", "la" (logit-adjusted) or "mixup"
    epochs: int
    seed: int = 0

    @property
    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + f"|N1={MAX_PER_CLASS}|val={HELD_OUT_VAL}"
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        return f"{self.data}-r{self.rho:g}-{self.order}-{self.loss}-e{self.epochs}-{digest}"


@dataclass(frozen=True)
class Case:
    """One row of the suite."""

    name: str
    start: StartSpec
    val_per_class: int
    frozen: bool
    objective: str


@dataclass
class CaseData:
    train: ImageTensorDataset
    val: ImageTensorDataset  # all held-out validation images
    test: ImageTensorDataset

    def val_subset(self, per_class: int) -> ImageTensorDataset:
        """The first ``per_class`` validation images of every class."""
        labels = self.val.labels
        keep = []
        for k in range(self.val.num_classes):
            keep.append((labels == k).nonzero().flatten()[:per_class])
        return self.val.subset(torch.cat(keep).sort().values)


def _fm(rho: float, order: str, loss: str, epochs: int = 8) -> StartSpec:
    return StartSpec("fmnist", rho, order, loss, epochs)


def _c10(rho: float, order: str, loss: str, epochs: int = 12) -> StartSpec:
    return StartSpec("cifar10", rho, order, loss, epochs)


def _folder(rho: float, loss: str, epochs: int = 8) -> StartSpec:
    return StartSpec("fmnist_folder", rho, "alphabetical", loss, epochs)


CASES: list[Case] = [
    Case("fm-r100-ce-v100-frozen-minrec", _fm(100, "standard", "ce"), 100, True, "min_recall"),
    Case("fm-r100-ce-v100-frozen-hmean", _fm(100, "standard", "ce"), 100, True, "h_mean"),
    Case(
        "fm-r100-ce-v500-frozen-mrcov",
        _fm(100, "standard", "ce"),
        500,
        True,
        "mean_recall_min_coverage",
    ),  # fmt: skip
    Case("fm-r200-shuf-ce-v20-frozen-minrec", _fm(200, "shuffled", "ce"), 20, True, "min_recall"),
    Case(
        "fm-r10-rev-mix-v500-frozen-minrec", _fm(10, "reversed", "mixup"), 500, True, "min_recall"
    ),
    Case("fm-r100-la-v100-tuned-minrec", _fm(100, "standard", "la"), 100, False, "min_recall"),
    Case("folder-r100-ce-v100-frozen-minrec", _folder(100, "ce"), 100, True, "min_recall"),
    Case("folder-r100-ce-v100-frozen-hmean", _folder(100, "ce"), 100, True, "h_mean"),
    Case("c10-r100-la-v100-frozen-minrec", _c10(100, "standard", "la"), 100, True, "min_recall"),
    Case("c10-r100-la-v100-tuned-minrec", _c10(100, "standard", "la"), 100, False, "min_recall"),
    Case(
        "c10-r200-rev-ce-v100-frozen-minrec", _c10(200, "reversed", "ce"), 100, True, "min_recall"
    ),
    Case(
        "c10-r200-rev-ce-v500-frozen-mrcov",
        _c10(200, "reversed", "ce"),
        500,
        True,
        "mean_recall_min_coverage",
    ),  # fmt: skip
    Case("c10-r10-shuf-mix-v20-frozen-hmean", _c10(10, "shuffled", "mixup"), 20, True, "h_mean"),
    Case(
        "c10-r100-mix-v100-frozen-minrec", _c10(100, "standard", "mixup"), 100, True, "min_recall"
    ),
]


def class_counts(rho: float, order: str, num_classes: int = 10) -> list[int]:
    """Training images per class for the given tail and class order."""
    counts = long_tail_counts(MAX_PER_CLASS, num_classes, float(rho))
    if order == "reversed":
        return counts[::-1]
    if order == "shuffled":
        perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(1234))
        return [counts[int(p)] for p in perm]
    return counts


def _source(data: str) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    if data.startswith("fmnist"):
        root = DATA_ROOT / "fashion-mnist"
        return load_fashion_mnist(root, train=True), load_fashion_mnist(root, train=False)
    archive = DATA_ROOT / "cifar10-jpeg.tar.gz"
    decoded = CACHE / "decoded"
    return (
        load_cifar10(archive, train=True, cache_dir=decoded),
        load_cifar10(archive, train=False, cache_dir=decoded),
    )


def _write_folder(root: Path, spec: StartSpec) -> None:
    """The Fashion-MNIST-LT split of ``spec`` as a PNG tree (train/, val/, test/)."""
    from PIL import Image

    full, test = _source("fmnist")
    counts = class_counts(spec.rho, "standard")
    train_idx, val_idx = long_tail_split(full.labels, counts, HELD_OUT_VAL, spec.seed)
    partial = root.with_suffix(".partial")
    for split, images, labels in (
        ("train", full.images[train_idx], full.labels[train_idx]),
        ("val", full.images[val_idx], full.labels[val_idx]),
        ("test", test.images, test.labels),
    ):
        for n, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = partial / split / FMNIST_NAMES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{n:05d}.png")
    partial.rename(root)


def load_case_data(spec: StartSpec) -> CaseData:
    """Train / held-out validation / test sets of a start (the same split every time)."""
    if spec.data == "fmnist_folder":
        root = CACHE / f"folder-fmnist-r{spec.rho:g}-s{spec.seed}"
        if not root.exists():
            _write_folder(root, spec)
        splits = load_image_folder(root, cache_dir=CACHE / "decoded")
        return CaseData(splits["train"], splits["val"], splits["test"])
    full, test = _source(spec.data)
    counts = class_counts(spec.rho, spec.order, full.num_classes)
    train_idx, val_idx = long_tail_split(full.labels, counts, HELD_OUT_VAL, spec.seed)
    return CaseData(full.subset(train_idx), full.subset(val_idx), test)


def start_path(spec: StartSpec) -> Path:
    return CACHE / "starts" / f"{spec.key}.pt"


def build_start(spec: StartSpec, data: CaseData | None = None) -> Path:
    """Pre-trains (small_cnn) and caches the start of ``spec``; returns its path."""
    from selmix import pretrain

    path = start_path(spec)
    if path.exists():
        return path
    data = data or load_case_data(spec)
    torch.manual_seed(spec.seed)
    model = create_model(
        "small_cnn", data.train.num_classes, in_channels=data.train.images.shape[1]
    )
    settings: dict[str, Any] = {"loss": "ce", "mixup_alpha": 0.0}
    if spec.loss == "la":
        settings["loss"] = "logit_adjusted"
    elif spec.loss == "mixup":
        settings["mixup_alpha"] = 1.0
    # channels_last=False: the layout the committed starts were built with ("auto" measures
    # the machine and may pick another, and the numbers then differ a little)
    result = pretrain(
        model, data.train, None, epochs=spec.epochs, lr=0.05, batch_size=128,
        warmup_epochs=1, seed=spec.seed, progress=False, channels_last=False, **settings,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path.with_suffix(".tmp"), {"start_spec": asdict(spec)})
    path.with_suffix(".tmp").rename(path)
    return path


def load_start(spec: StartSpec) -> torch.nn.Module:
    model, _ = load_model(start_path(spec))
    return model.eval()


def main() -> None:
    torch.set_num_threads(1)
    wanted = sys.argv[1:]
    specs = list(dict.fromkeys(case.start for case in CASES))
    for spec in specs:
        if wanted and not any(w in spec.key for w in wanted):
            continue
        started = time.perf_counter()
        path = build_start(spec)
        print(f"{spec.key}: {path} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
