"""The mixup sampling policy (MATH.md section 4) against numpy, and its diagnostics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import selmix
from selmix.core import effective_pairs, mixup_distribution, policy_entropy


def random_gain(num_classes: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, num_classes, dtype=torch.float64, generator=generator) + shift


def np_selmix(gain: np.ndarray, scale: float) -> np.ndarray:
    positive = gain > 0
    weights = np.zeros_like(gain)
    top = gain[positive].max()
    weights[positive] = np.exp(scale * (gain[positive] - top))
    return weights / weights.sum()


@pytest.mark.parametrize("scale", [0.5, 2.0, 10.0])
@pytest.mark.parametrize(("num_classes", "seed"), [(2, 0), (5, 1), (30, 2)])
def test_selmix_policy_is_exp_gain_on_positive_pairs(scale, num_classes, seed):
    gain = random_gain(num_classes, seed)
    distribution = mixup_distribution(gain, scale=scale)
    expected = np_selmix(gain.numpy(), scale)
    assert distribution.shape == gain.shape and distribution.dtype == gain.dtype
    np.testing.assert_allclose(distribution.numpy(), expected, rtol=1e-10, atol=1e-300)
    assert float(distribution.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (distribution[gain <= 0] == 0).all()
    assert (distribution[gain > 0] > 0).all()


def test_selmix_policy_default_scale_is_ten():
    gain = random_gain(6, 3)
    np.testing.assert_allclose(
        mixup_distribution(gain).numpy(), np_selmix(gain.numpy(), 10.0), rtol=1e-10
    )


def test_selmix_policy_is_stable_for_large_gains():
    gain = random_gain(8, 4) * 500.0
    distribution = mixup_distribution(gain, scale=10.0)
    assert torch.isfinite(distribution).all()
    np.testing.assert_allclose(distribution.numpy(), np_selmix(gain.numpy(), 10.0), atol=1e-12)


def test_selmix_policy_exact_zero_gain_gets_no_mass():
    gain = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    distribution = mixup_distribution(gain, scale=1.0)
    e1, e05 = math.exp(1.0), math.exp(0.5)
    expected = torch.tensor([[0.0, e1 / (e1 + e05)], [0.0, e05 / (e1 + e05)]])
    torch.testing.assert_close(distribution, expected)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_normalised_gain_policy(scale):
    gain = random_gain(7, 5) * 37.0
    distribution = mixup_distribution(gain, scale=scale, normalize_gain=True)
    expected = np_selmix(gain.numpy() / np.abs(gain.numpy()).max(), scale)
    np.testing.assert_allclose(distribution.numpy(), expected, rtol=1e-10, atol=1e-300)
    # scale-free: multiplying the gain by a constant changes nothing
    rescaled = mixup_distribution(gain * 1e-3, scale=scale, normalize_gain=True)
    np.testing.assert_allclose(rescaled.numpy(), expected, rtol=1e-10, atol=1e-300)
    # while the paper's form does change
    plain = mixup_distribution(gain, scale=scale)
    assert not np.allclose(plain.numpy(), expected, atol=1e-3)


def test_normalisation_uses_the_largest_absolute_gain_even_if_negative():
    gain = torch.tensor([[-4.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    distribution = mixup_distribution(gain, scale=4.0, normalize_gain=True)
    # gains / 4 = 0.25 and 0.5, times s = 4 -> exp(1) and exp(2)
    total = math.exp(1.0) + math.exp(2.0)
    expected = torch.tensor([[0.0, math.exp(1.0) / total], [math.exp(2.0) / total, 0.0]])
    torch.testing.assert_close(distribution, expected.double())


@pytest.mark.parametrize("num_classes", [2, 7])
def test_uniform_policy(num_classes):
    distribution = mixup_distribution(random_gain(num_classes, 6), policy="uniform")
    expected = torch.full((num_classes, num_classes), 1 / num_classes**2, dtype=torch.float64)
    torch.testing.assert_close(distribution, expected)


def test_greedy_policy_on_a_non_contiguous_gain():
    # gain matrices often come out of a matrix product as a transposed view
    gain = torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64).t()
    assert not gain.is_contiguous()
    distribution = mixup_distribution(gain, policy="greedy")
    row, col = divmod(int(gain.reshape(-1).argmax()), 5)
    assert distribution[row, col] == 1.0 and float(distribution.sum()) == 1.0
    assert float(gain[row, col]) == float(gain.max())


def test_greedy_policy_is_one_hot_at_argmax():
    gain = random_gain(6, 7)
    distribution = mixup_distribution(gain, policy="greedy")
    i, j = np.unravel_index(np.argmax(gain.numpy()), (6, 6))
    expected = np.zeros((6, 6))
    expected[i, j] = 1.0
    np.testing.assert_array_equal(distribution.numpy(), expected)
    # greedy also works where no gain is positive (it takes the least negative)
    negative = -gain.abs() - 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy = mixup_distribution(negative, policy="greedy")
    assert int(greedy.argmax()) == int(negative.argmax()) and float(greedy.sum()) == 1.0


@pytest.mark.parametrize("gain", [-torch.rand(4, 4) - 0.01, torch.zeros(3, 3)])
def test_no_positive_gain_falls_back_to_uniform_with_a_warning(gain):
    num_classes = gain.shape[0]
    with pytest.warns(selmix.core.StationaryPointWarning, match="stationary point"):
        distribution = mixup_distribution(gain)
    torch.testing.assert_close(
        distribution, torch.full((num_classes, num_classes), 1 / num_classes**2)
    )


def test_policy_accepts_a_float32_gain_and_keeps_its_dtype():
    gain = random_gain(5, 8).float()
    distribution = mixup_distribution(gain, scale=3.0)
    assert distribution.dtype == torch.float32
    np.testing.assert_allclose(
        distribution.numpy(), np_selmix(gain.double().numpy(), 3.0), rtol=1e-5, atol=1e-7
    )


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_rejects_non_positive_scale(scale):
    with pytest.raises(ValueError, match=r"`scale` must be > 0"):
        mixup_distribution(random_gain(3, 0), scale=scale)


def test_rejects_unknown_policy_listing_the_known_ones():
    with pytest.raises(ValueError, match="softmax") as info:
        mixup_distribution(random_gain(3, 0), policy="softmax")
    for known in ("'selmix'", "'uniform'", "'greedy'"):
        assert known in str(info.value)


def test_rejects_non_square_and_nan_gain():
    with pytest.raises(ValueError, match=r"`gain` must be a square K x K tensor.*\(3, 4\)"):
        mixup_distribution(torch.randn(3, 4))
    with pytest.raises(ValueError, match="square"):
        mixup_distribution(torch.randn(9))
    bad = random_gain(3, 0)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="`gain` must be finite"):
        mixup_distribution(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        mixup_distribution(bad, policy="uniform")


# -- diagnostics -------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 10, 31, 300])
def test_uniform_policy_spreads_over_k_squared_pairs(num_classes):
    distribution = mixup_distribution(random_gain(num_classes, 9), policy="uniform")
    assert policy_entropy(distribution) == pytest.approx(2 * math.log(num_classes), rel=1e-12)
    assert effective_pairs(distribution) == pytest.approx(num_classes**2, rel=1e-12)


def test_entropy_and_effective_pairs_by_hand():
    distribution = torch.tensor([[0.5, 0.25], [0.25, 0.0]])
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert policy_entropy(distribution) == pytest.approx(entropy, rel=1e-12)
    assert effective_pairs(distribution) == pytest.approx(math.exp(entropy), rel=1e-12)
    one_hot = torch.zeros(4, 4)
    one_hot[2, 1] = 1.0
    assert policy_entropy(one_hot) == 0.0
    assert effective_pairs(one_hot) == pytest.approx(1.0)
    gain = random_gain(6, 10)
    selmix_policy = mixup_distribution(gain, scale=2.0).numpy()
    p = selmix_policy[selmix_policy > 0]
    assert policy_entropy(torch.from_numpy(selmix_policy)) == pytest.approx(
        -np.sum(p * np.log(p)), rel=1e-12
    )


@pytest.mark.parametrize("policy", ["selmix", "greedy", "uniform"])
def test_uniform_mix_keeps_every_pair_at_eps_over_k2(policy):
    gain = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.0, 4.0], [-2.0, -2.0, 1.0]])
    eps = 0.2
    plain = mixup_distribution(gain, scale=5.0, policy=policy)
    mixed = mixup_distribution(gain, scale=5.0, policy=policy, uniform_mix=eps)
    torch.testing.assert_close(mixed, (1 - eps) * plain + eps / 9)
    assert float(mixed.min()) >= eps / 9 - 1e-12
    assert float(mixed.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_uniform_mix_is_validated(eps):
    with pytest.raises(ValueError, match="uniform_mix"):
        mixup_distribution(torch.eye(3), uniform_mix=eps)


@pytest.mark.parametrize(("per_class", "expected"), [(5, 0.5), (40, 0.5), (100, 0.5), (200, 0.25),
                                                      (500, 0.1), (1000, 0.05)])  # fmt: skip
def test_min_recall_uniform_mix_falls_with_the_variance_of_the_recalls(per_class, expected):
    from selmix.core.objectives import MinRecall
    from selmix.core.policy import min_recall_uniform_mix

    # the recall's variance at recall 0.5 is 0.25 / n; half the pairs while it is
    # >= 0.25 / 100, then in proportion to it
    spread = MinRecall().recall_spread(torch.tensor([per_class, 3 * per_class]))
    assert spread == pytest.approx(0.5 / math.sqrt(per_class))
    assert min_recall_uniform_mix(spread) == pytest.approx(expected)


def test_min_recall_uniform_mix_without_a_spread_is_half_and_rejects_a_bad_one():
    from selmix.core.policy import min_recall_uniform_mix

    assert min_recall_uniform_mix(None) == 0.5
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="`spread` must be"):
            min_recall_uniform_mix(bad)
