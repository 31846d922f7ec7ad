"""Helpers shared by the benchmark scripts (not part of the library).

* :func:`load_start` rebuilds a starting model saved by ``selmix pretrain --out DIR`` and
  the exact data split it was trained on (from the ``config.yaml`` beside it).
* :class:`FeatureSet` and :func:`feature_space` turn a model into "identity backbone +
  linear head" over features computed once (by the library's frozen view,
  :class:`selmix.engine.views.FrozenFeatures`), so that every frozen-backbone method (SelMix,
  uniform and greedy mixup, post-hoc logit adjustment, cRT, logit-adjusted fine-tuning)
  shares one feature extraction instead of redoing it per run.
"""

from __future__ import annotations

import copy
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from selmix import load_model, split_model
from selmix.data import DataSplits, load_data
from selmix.engine.views import FrozenFeatures

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_cifar_mislas import mislas_split  # noqa: E402

METRIC_COLUMNS = ("mean_recall", "min_recall", "g_mean", "h_mean", "min_coverage")
METRIC_NAMES = {
    "mean_recall": "mean rec",
    "min_recall": "min rec",
    "g_mean": "G-mean",
    "h_mean": "H-mean",
    "min_coverage": "min cov",
}


@dataclass
class Start:
    """A starting model with the data split it was trained on."""

    directory: Path
    model: nn.Module
    data: Any
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.directory.name


def load_start(
    directory: str | Path, cache_dir: str | None = None, data: str | None = None
) -> Start:
    """The model of a ``selmix pretrain`` output folder and its data split (same seed);
    ``data`` overrides the folder's data source (the same data elsewhere)."""
    directory = Path(directory)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    model, _ = load_model(directory / "model.pt")
    if config.get("train_counts"):
        # the MiSLAS start: N_1 counted before the validation split, capped at the images
        # left (benchmarks/pretrain_cifar_mislas.py), which load_data refuses on purpose
        source = data or config["data"]
        train, val, test, counts = mislas_split(
            source.removeprefix("cifar10:"), config.get("seed", 0), config["max_per_class"],
            config["imbalance"], config["val_per_class"], cache_dir or config.get("cache_dir"),
            config.get("head_val_per_class"),
        )  # fmt: skip
        if counts != list(config["train_counts"]):
            raise ValueError(f"{directory}: split counts {counts} != {config['train_counts']}")
        return Start(directory, model.eval(), DataSplits(train, val, test), config)
    data = load_data(
        data or config["data"], imbalance=config.get("imbalance"),
        max_per_class=config.get("max_per_class"), val_per_class=config.get("val_per_class"),
        seed=config.get("seed", 0), cache_dir=cache_dir or config.get("cache_dir"),
    )  # fmt: skip
    return Start(directory, model.eval(), data, config)


class FeatureSet:
    """Pre-computed features with selmix's data-set interface (``labels``, ``batch``)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        self.features = features
        self.labels = labels.long()
        self.num_classes = num_classes
        self.classes = [str(k) for k in range(num_classes)]

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], int(self.labels[index])

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def batch(
        self,
        indices: Any,
        augment: bool = False,
        generator: torch.Generator | None = None,
        device: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        features, labels = self.features[index], self.labels[index]
        if device is not None:
            features, labels = features.to(device), labels.to(device)
        return features, labels

    def subset(self, indices: Any) -> FeatureSet:
        index = torch.as_tensor(indices, dtype=torch.long)
        return FeatureSet(self.features[index], self.labels[index], self.num_classes)


@dataclass
class FeatureSpace:
    """A head-only copy of a model and its train / val / test features."""

    model: nn.Module
    train: FeatureSet
    val: FeatureSet
    test: FeatureSet

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.model)


def feature_space(model: nn.Module, data: Any, device: str = "cpu") -> FeatureSpace:
    """Extracts the features of ``data.train/val/test`` once (eval mode, no augmentation),
    with the library's frozen view (:class:`selmix.engine.views.FrozenFeatures`)."""
    split = split_model(model)
    model.eval()
    num_classes = split.head.out_features
    view = FrozenFeatures(split, torch.device(device))
    sets = []
    for dataset in (data.train, data.val, data.test):
        features = view.features(dataset)
        sets.append(FeatureSet(features.cpu(), torch.as_tensor(dataset.labels), num_classes))
    head_model = nn.Sequential(nn.Identity(), copy.deepcopy(split.head)).eval()
    return FeatureSpace(head_model, *sets)


def mean_spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± population std`` of the values (times ``scale``)."""
    mean = scale * statistics.fmean(values)
    spread = scale * statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def percent_cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (times ``scale``: % by default) for several seeds; the bare value for a
    single run."""
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return mean_spread(values, scale, digits)


def format_metric(column: str, values: list[float]) -> str:
    if column == "min_coverage":
        return mean_spread(values, scale=1.0, digits=4)
    return mean_spread(values)


def machine_line(threads: int) -> str:
    """The CPU (model, cores, bf16 / AMX flags), torch and the thread count of a run."""
    from selmix.engine.hardware import machine_description

    return f"{machine_description()}, {threads} torch thread(s)"


def run_record(started: float) -> dict[str, Any]:
    """The wall time since ``started``, the machine and the command line of this run."""
    return {
        "seconds": time.perf_counter() - started,
        "machine": machine_line(torch.get_num_threads()),
        "commands": ["python " + shlex.join(sys.argv)],
    }


def write_payload(path: str, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Writes ``{"meta": ..., "runs": ...}`` as JSON, the input of the scripts' ``--merge``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))


COVERAGE_TARGET = 0.095
"""The issues' bar for mean recall s.t. coverage: test min coverage >= 0.95 / K, K = 10."""


def coverage_floor(
    test_per_class: int,
    num_classes: int,
    *,
    rates: torch.Tensor | None = None,
    val_per_class: int = 0,
    draws: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """What sampling noise alone does to a balanced classifier's measured test min coverage.

    Monte Carlo with a fixed seed. Each class's ``test_per_class`` test images are predicted
    by independent draws from ``rates[y]`` = P(prediction | class y) (default: uniform, a
    classifier whose every prediction is a fair die). The classifier is exactly balanced
    in the population (coverage 1/K for every class) when ``val_per_class`` is 0. With
    ``val_per_class`` > 0 it is instead exactly balanced on a validation set of that size
    drawn from the same rates, so it inherits the validation set's error, to first order:
    population coverage = 1/K - (validation coverage - population coverage). That is the
    best any method tuned on that validation set can do; the test set's noise comes on top.

    Args:
        test_per_class: test images per class.
        num_classes: K.
        rates: Tensor[K, K] of non-negative rows (normalised here), e.g. a model's confusion
            counts on held-out images; default all 1/K.
        val_per_class: validation images per class (0: the classifier is balanced exactly).
        draws: Monte Carlo draws of the test (and validation) sets.
        seed: seed of the draws.

    Returns:
        ``(mean, 5th percentile, share of draws below COVERAGE_TARGET)`` of the measured
        test min coverage.
    """
    generator = torch.Generator().manual_seed(seed)
    if rates is None:
        rates = torch.ones(num_classes, num_classes)
    rates = rates.double()
    if rates.shape != (num_classes, num_classes) or bool((rates < 0).any()):
        raise ValueError(f"`rates` must be a non-negative {num_classes} x {num_classes} tensor")
    if bool((rates.sum(1) == 0).any()):
        raise ValueError("every row of `rates` must have a positive sum (a class with no image)")
    rates = rates / rates.sum(1, keepdim=True)
    population = rates.mean(0)
    offsets = (torch.arange(draws) * num_classes).unsqueeze(1)

    def measured(per_class: int) -> torch.Tensor:
        """Tensor[draws, K]: coverage measured on a balanced set of ``per_class`` per class."""
        counts = torch.zeros(draws * num_classes, dtype=torch.float64)
        for row in rates:
            picks = torch.multinomial(row, draws * per_class, replacement=True, generator=generator)
            counts += torch.bincount(
                (picks.view(draws, per_class) + offsets).flatten(), minlength=draws * num_classes
            ).double()
        return counts.view(draws, num_classes) / (per_class * num_classes)

    test = measured(test_per_class) - population + 1.0 / num_classes
    if val_per_class:
        test -= measured(val_per_class) - population
    minima = test.min(1).values
    below = float((minima < COVERAGE_TARGET).double().mean())
    return float(minima.mean()), float(minima.quantile(0.05)), below
