"""The pair sampler draws pairs with the policy's frequencies and within-class uniformity."""

import math

import pytest
import torch

from selmix.core.sampler import ClassPools, PairSampler


def _chi_square_upper(dof: int) -> float:
    # Wilson-Hilferty approximation of the 0.999 quantile of chi-square(dof)
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_pair_frequencies_follow_the_distribution():
    num_classes = 4
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 7 + [3] * 3)
    generator = torch.Generator().manual_seed(0)
    sampler = PairSampler(labels, None, num_classes, generator)
    distribution = torch.rand(num_classes, num_classes, generator=generator)
    distribution[1, 2] = 0.0  # a pair that must never be drawn
    distribution /= distribution.sum()
    draws = 40_000
    first, second, _, label = sampler.sample(distribution, draws)
    assert torch.equal(labels[first], label)
    observed = torch.zeros(num_classes, num_classes)
    observed.index_put_((labels[first], labels[second]), torch.ones(draws), accumulate=True)
    assert observed[1, 2] == 0
    expected = distribution * draws
    keep = expected > 0
    chi2 = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    assert chi2 < _chi_square_upper(int(keep.sum()) - 1)


def test_draws_within_a_class_are_uniform():
    labels = torch.tensor([0] * 6 + [1] * 4 + [0] * 4)  # class 0 is not contiguous
    pools = ClassPools(labels, 2)
    generator = torch.Generator().manual_seed(1)
    drawn = pools.draw(torch.zeros(30_000, dtype=torch.long), generator)
    assert (labels[drawn] == 0).all()
    counts = torch.bincount(drawn, minlength=labels.numel())[labels == 0].double()
    expected = 30_000 / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi_square_upper(9)


def test_second_pool_uses_pseudo_labels_and_falls_back():
    labelled = torch.tensor([0, 0, 1, 1, 2, 2])
    pseudo = torch.tensor([0, 1, 1, 0, 1])  # no unlabelled sample is pseudo-labelled 2
    generator = torch.Generator().manual_seed(2)
    sampler = PairSampler(labelled, pseudo, 3, generator)
    distribution = torch.zeros(3, 3)
    distribution[0, 1] = 0.5
    distribution[1, 2] = 0.5
    first, second, from_second, label = sampler.sample(distribution, 2000)
    partner_is_one = label == 0
    assert from_second[partner_is_one].all()
    assert (pseudo[second[partner_is_one]] == 1).all()
    # class 2 has no pseudo-labelled sample: the labelled pool serves it
    assert not from_second[~partner_is_one].any()
    assert (labelled[second[~partner_is_one]] == 2).all()


def test_same_seed_same_pairs():
    labels = torch.randint(0, 5, (100,), generator=torch.Generator().manual_seed(3))
    labels[:5] = torch.arange(5)
    distribution = torch.full((5, 5), 1 / 25)
    draws = [
        PairSampler(labels, None, 5, torch.Generator().manual_seed(7)).sample(distribution, 64)
        for _ in range(2)
    ]
    for a, b in zip(draws[0], draws[1], strict=True):
        assert torch.equal(a, b)


def test_missing_training_class_is_named():
    with pytest.raises(ValueError, match=r"no samples of class\(es\) \[2\]"):
        PairSampler(torch.tensor([0, 1, 1]), None, 3, torch.Generator())


def test_label_out_of_range():
    with pytest.raises(ValueError, match="must lie in"):
        ClassPools(torch.tensor([0, 5]), 3)


def test_a_distribution_changed_in_place_is_noticed():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    sampler = PairSampler(labels, None, 3, torch.Generator().manual_seed(4))
    distribution = torch.zeros(3, 3)
    distribution[0, 1] = 1.0
    _, second, _, label = sampler.sample(distribution, 50)
    assert (label == 0).all() and (labels[second] == 1).all()
    distribution.zero_()
    distribution[2, 0] = 1.0  # same tensor, new values: the cached CDF must be rebuilt
    _, second, _, label = sampler.sample(distribution, 50)
    assert (label == 2).all() and (labels[second] == 0).all()


def test_partner_draws_from_the_second_pool_are_uniform_within_a_class():
    labelled = torch.tensor([0, 1])
    pseudo = torch.tensor([1, 0, 1, 1, 0, 1])  # class 1 has 4 unlabelled members
    sampler = PairSampler(labelled, pseudo, 2, torch.Generator().manual_seed(5))
    distribution = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    _, second, from_second, _ = sampler.sample(distribution, 20_000)
    assert from_second.all()
    counts = torch.bincount(second, minlength=6)[pseudo == 1].double()
    expected = 20_000 / 4
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi_square_upper(3)


@pytest.mark.parametrize(
    ("distribution", "message"),
    [
        (torch.ones(2, 3), r"must be Tensor\[3, 3\]"),
        (torch.zeros(3, 3), "positive sum"),
        (torch.full((3, 3), -1.0), "non-negative"),
    ],
)
def test_bad_distribution_is_named(distribution, message):
    sampler = PairSampler(torch.tensor([0, 1, 2]), None, 3, torch.Generator())
    with pytest.raises(ValueError, match=message):
        sampler.sample(distribution, 4)


def _reference_sample(first, second, num_classes, generator, distribution, batch_size):
    # the straightforward draw sequence PairSampler must reproduce bit for bit
    flat = distribution.flatten().double()
    pairs = torch.multinomial(flat, batch_size, replacement=True, generator=generator)
    first_class, second_class = pairs // num_classes, pairs % num_classes
    first_index = first.draw(first_class, generator)
    if second is None:
        return first_index, first.draw(second_class, generator), first_class
    serves = (second.sizes > 0)[second_class]
    second_index = torch.empty(batch_size, dtype=torch.long)
    if serves.any():
        second_index[serves] = second.draw(second_class[serves], generator)
    if (~serves).any():
        second_index[~serves] = first.draw(second_class[~serves], generator)
    return first_index, second_index, first_class


@pytest.mark.parametrize("with_second_pool", [False, True])
def test_draws_equal_the_reference_sequence(with_second_pool):
    generator = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 6, (200,), generator=generator)
    labels[:6] = torch.arange(6)
    pseudo = torch.randint(0, 5, (90,), generator=generator) if with_second_pool else None
    distribution = torch.rand(6, 6, generator=generator)
    distribution /= distribution.sum()
    sampler = PairSampler(labels, pseudo, 6, torch.Generator().manual_seed(9))
    reference = torch.Generator().manual_seed(9)
    first_pool = ClassPools(labels, 6)
    second_pool = None if pseudo is None else ClassPools(pseudo, 6)
    for batch_size in (1, 37, 128):
        drawn = sampler.sample(distribution, batch_size)
        expected = _reference_sample(first_pool, second_pool, 6, reference, distribution,
                                     batch_size)  # fmt: skip
        assert torch.equal(drawn[0], expected[0])
        assert torch.equal(drawn[1], expected[1])
        assert torch.equal(drawn[3], expected[2])
