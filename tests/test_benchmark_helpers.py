"""The benchmark scripts' shared helpers whose numbers appear in docs/RESULTS.md."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import coverage_floor  # noqa: E402


def test_coverage_floor_of_a_perfect_classifier_has_no_noise():
    # Every prediction right: every measured coverage is exactly 1/K, whatever the sizes.
    mean, low, below = coverage_floor(50, 4, rates=torch.eye(4), val_per_class=20, draws=200)
    assert mean == pytest.approx(0.25) and low == pytest.approx(0.25) and below == 0.0


def test_coverage_floor_matches_the_binomial_expectation():
    # K = 2, uniform rates: class 0's predictions on 2n test images are Binomial(2n, 1/2),
    # so the min coverage is min(X, 2n - X) / 2n, whose mean is computed exactly here.
    n = 20
    exact = sum(
        math.comb(2 * n, x) * 0.5 ** (2 * n) * min(x, 2 * n - x) / (2 * n) for x in range(2 * n + 1)
    )
    mean, _, _ = coverage_floor(n, 2, draws=20000, seed=1)
    assert mean == pytest.approx(exact, abs=0.002)


def test_coverage_floor_validation_noise_lowers_the_floor():
    rates = 0.7 * torch.eye(10) + 0.03
    test_only = coverage_floor(1000, 10, rates=rates, draws=500)[0]
    small_val = coverage_floor(1000, 10, rates=rates, val_per_class=100, draws=500)[0]
    large_val = coverage_floor(1000, 10, rates=rates, val_per_class=5000, draws=500)[0]
    assert small_val < large_val < test_only < 0.1


def test_coverage_floor_rejects_a_class_without_images():
    rates = torch.eye(3)
    rates[1] = 0
    with pytest.raises(ValueError, match="positive sum"):
        coverage_floor(10, 3, rates=rates)
