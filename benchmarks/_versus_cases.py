"""Cases with many classes and small validation sets, for ``benchmarks/versus_baselines.py``.

Two kinds, both cached under ``$SELMIX_ROBUST_CACHE`` (default ``/work/cache/robustness``):

* **Two image domains, K = 20** (``two_domain``): the CIFAR-10 JPEG copy's ten classes
  (labels 0-9) and Fashion-MNIST resized to 32 x 32 and repeated to three channels
  (labels 10-19), rho = 100, N_1 = 2000, the counts assigned to the classes by a seeded
  permutation (the *tail order*; seeds 1, 2, 3 are three different shuffled tails). 100
  images per class are held out for validation; a case with a smaller validation set
  uses the first n of them, so the cases of one start share it. The test sets are the two
  sources' own (1000 images per class). The start is a small CNN pre-trained with plain
  cross-entropy for 12 epochs (what a user gets from ``selmix pretrain``).
* **Synthetic class-conditional features, K = 100 and K = 1000** (``gauss``): the route of
  a user with an embeddings file. Class means are a shared super-class direction plus a
  class direction, ``mu_k = a z_{k mod S} + b u_k`` with z, u ~ N(0, I_d / d), and a
  sample of class y is ``mu_y + N(0, sigma^2 I_d / d)``, so confusions concentrate inside
  super-classes like those of real data. Training counts follow rho = 100; the test set
  has ``test_per_class`` samples of every class, large enough that its noise is small
  against the effects measured. The start is a linear head trained by SGD with plain
  cross-entropy on the imbalanced training features (biased towards the head classes).

Run ``python benchmarks/_versus_cases.py`` to build every start in advance.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _robust_cases import CACHE, DATA_ROOT  # noqa: E402
from selmix import create_model, load_model  # noqa: E402
from selmix.data import ImageTensorDataset, long_tail_counts, long_tail_split  # noqa: E402
from selmix.data.formats import FeatureTensorDataset  # noqa: E402
from selmix.data.sources import load_cifar10, load_fashion_mnist  # noqa: E402

TWO_DOMAIN_MAX_PER_CLASS = 2000
TWO_DOMAIN_HELD_OUT = 100  # validation images held out per class (cases use the first n)
TWO_DOMAIN_EPOCHS = 12
TWO_DOMAIN_MEAN = (0.379, 0.375, 0.359)  # CIFAR-10 and the 32 x 32 Fashion-MNIST, pooled
TWO_DOMAIN_STD = (0.317, 0.314, 0.316)


@dataclass(frozen=True)
class TwoDomainSpec:
    """A K = 20 start: tail order seed and pre-training seed."""

    order_seed: int
    seed: int = 0
    rho: float = 100.0

    @property
    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        text += f"|N1={TWO_DOMAIN_MAX_PER_CLASS}|val={TWO_DOMAIN_HELD_OUT}|e={TWO_DOMAIN_EPOCHS}"
        return (
            f"two_domain-o{self.order_seed}-s{self.seed}-"
            + hashlib.sha1(text.encode()).hexdigest()[:8]
        )


@dataclass(frozen=True)
class GaussSpec:
    """A synthetic features start."""

    num_classes: int
    dim: int
    max_per_class: int
    test_per_class: int
    held_out: int  # validation samples per class (cases use the first n)
    superclasses: int
    seed: int = 0
    rho: float = 100.0
    superclass_scale: float = 2.0
    class_scale: float = 2.4
    noise: float = 1.0

    @property
    def key(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"gauss-K{self.num_classes}-d{self.dim}-s{self.seed}-{digest}"


@dataclass
class CaseData:
    train: Any
    val: Any  # all held-out validation samples
    test: Any

    def val_subset(self, per_class: int) -> Any:
        """The first ``per_class`` validation samples of every class."""
        labels = self.val.labels
        keep = [(labels == k).nonzero().flatten()[:per_class] for k in range(self.val.num_classes)]
        return self.val.subset(torch.cat(keep).sort().values)


def two_domain_counts(spec: TwoDomainSpec) -> list[int]:
    counts = long_tail_counts(TWO_DOMAIN_MAX_PER_CLASS, 20, spec.rho)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(spec.order_seed))
    return [counts[int(p)] for p in order]


def _fmnist_as_rgb32(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, 28, 28] -> uint8 [N, 3, 32, 32] (bilinear resize, grey to RGB)."""
    resized = F.interpolate(images.float(), size=(32, 32), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _two_domain_pool(train: bool) -> ImageTensorDataset:
    path = CACHE / f"two_domain_{'train' if train else 'test'}.pt"
    if path.exists():
        images, labels = torch.load(path, weights_only=True)
    else:
        cifar = load_cifar10(
            DATA_ROOT / "cifar10-jpeg.tar.gz", train=train, cache_dir=CACHE / "decoded"
        )
        fmnist = load_fashion_mnist(DATA_ROOT / "fashion-mnist", train=train)
        images = torch.cat([cifar.images, _fmnist_as_rgb32(fmnist.images)])
        labels = torch.cat([cifar.labels, fmnist.labels + 10])
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((images, labels), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    names = [f"c10_{k}" for k in range(10)] + [f"fm_{k}" for k in range(10)]
    # one normalisation for train and test: the two domains' pooled statistics
    return ImageTensorDataset(images, labels, TWO_DOMAIN_MEAN, TWO_DOMAIN_STD, names)


def load_two_domain(spec: TwoDomainSpec) -> CaseData:
    full, test = _two_domain_pool(True), _two_domain_pool(False)
    train_idx, val_idx = long_tail_split(
        full.labels, two_domain_counts(spec), TWO_DOMAIN_HELD_OUT, spec.seed
    )
    return CaseData(full.subset(train_idx), full.subset(val_idx), test)


def _gauss_samples(
    spec: GaussSpec, means: torch.Tensor, counts: list[int], generator: torch.Generator
) -> FeatureTensorDataset:
    labels = torch.repeat_interleave(torch.arange(spec.num_classes), torch.tensor(counts))
    noise = torch.randn(labels.numel(), spec.dim, generator=generator)
    features = means[labels] + spec.noise * noise / math.sqrt(spec.dim)
    return FeatureTensorDataset(features, labels, spec.num_classes)


def load_gauss(spec: GaussSpec) -> CaseData:
    generator = torch.Generator().manual_seed(10_000 + spec.seed)
    scale = 1 / math.sqrt(spec.dim)
    supers = torch.randn(spec.superclasses, spec.dim, generator=generator) * scale
    own = torch.randn(spec.num_classes, spec.dim, generator=generator) * scale
    group = torch.arange(spec.num_classes) % spec.superclasses
    means = spec.superclass_scale * supers[group] + spec.class_scale * own
    counts = long_tail_counts(spec.max_per_class, spec.num_classes, spec.rho)
    order = torch.randperm(spec.num_classes, generator=generator)  # tail not by index
    counts = [counts[int(p)] for p in order]
    train = _gauss_samples(spec, means, counts, generator)
    val = _gauss_samples(spec, means, [spec.held_out] * spec.num_classes, generator)
    test = _gauss_samples(spec, means, [spec.test_per_class] * spec.num_classes, generator)
    return CaseData(train, val, test)


def start_path(spec: TwoDomainSpec | GaussSpec) -> Path:
    return CACHE / "starts" / f"{spec.key}.pt"


def train_linear_head(spec: GaussSpec, train: FeatureTensorDataset, epochs: int = 30) -> nn.Module:
    """Plain cross-entropy SGD on the imbalanced features (the start a user would have)."""
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    head = nn.Linear(spec.dim, spec.num_classes)
    optimiser = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    batch = 256
    steps = epochs * math.ceil(len(train) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(epochs):
        for index in torch.randperm(len(train), generator=generator).split(batch):
            loss = F.cross_entropy(head(train.features[index]), train.labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return nn.Sequential(nn.Identity(), head).eval()


def build_start(spec: TwoDomainSpec | GaussSpec, data: CaseData | None = None) -> Path:
    """Trains and caches the start of ``spec``; returns its path."""
    path = start_path(spec)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, GaussSpec):
        data = data or load_gauss(spec)
        model = train_linear_head(spec, data.train)
        torch.save(model.state_dict(), path.with_suffix(".tmp"))
    else:
        from selmix import pretrain

        data = data or load_two_domain(spec)
        torch.manual_seed(spec.seed)
        model = create_model("small_cnn", 20, in_channels=3)
        result = pretrain(
            model, data.train, None, epochs=TWO_DOMAIN_EPOCHS, lr=0.05, batch_size=128,
            warmup_epochs=1, seed=spec.seed, progress=False, loss="ce", mixup_alpha=0.0,
            # the layout the committed starts were built with (channels_last="auto" measures
            # the machine and may pick another, and the numbers then differ a little)
            channels_last=False,
        )  # fmt: skip
        result.save(path.with_suffix(".tmp"), {"start_spec": asdict(spec)})
    path.with_suffix(".tmp").rename(path)
    return path


def load_start(spec: TwoDomainSpec | GaussSpec) -> nn.Module:
    if isinstance(spec, GaussSpec):
        model = nn.Sequential(nn.Identity(), nn.Linear(spec.dim, spec.num_classes))
        model.load_state_dict(torch.load(start_path(spec), weights_only=True))
        return model.eval()
    model, _ = load_model(start_path(spec))
    return model.eval()


def load_case_data(spec: TwoDomainSpec | GaussSpec) -> CaseData:
    return load_gauss(spec) if isinstance(spec, GaussSpec) else load_two_domain(spec)


# noise chosen so that the cross-entropy starts sit at 60-70% test mean recall with the
# rarest classes near 0 (start metrics: docs/results/versus_baselines.md)
GAUSS_100 = GaussSpec(100, 64, max_per_class=500, test_per_class=1000, held_out=100,
                      superclasses=20, noise=6.0)  # fmt: skip
GAUSS_1000 = GaussSpec(1000, 128, max_per_class=200, test_per_class=200, held_out=50,
                       superclasses=100, noise=5.0)  # fmt: skip
TWO_DOMAIN_STARTS = [TwoDomainSpec(order) for order in (1, 2, 3)]


def main() -> None:
    torch.set_num_threads(1)
    for spec in [*TWO_DOMAIN_STARTS, GAUSS_100, GAUSS_1000]:
        started = time.perf_counter()
        path = build_start(spec)
        print(f"{spec.key}: {path} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
