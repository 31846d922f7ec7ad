"""Semi-supervised splits, hidden labels, FixMatch(LA) losses and semi-supervised SelMix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selmix.data import (
    UNLABELLED_DISTRIBUTIONS,
    ImageTensorDataset,
    UnlabelledDataset,
    load_fashion_mnist,
    long_tail_counts,
    long_tail_split,
    semi_supervised_data,
    semi_supervised_split,
    unlabelled_distribution,
)
from selmix.engine.pretrain import logit_adjustment, pretrain
from selmix.engine.semisup import (
    FixMatchConfig,
    cutout,
    fixmatch_loss,
    fixmatch_pretrain,
    pseudo_label_report,
    pseudo_labels,
    strong_augment,
)
from selmix.finetune import FinetuneConfig, Trainer, finetune
from selmix.models import create_model
from selmix.models.checkpoint import load_model

FASHION_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not in ../shared/data/fashion-mnist",
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fmnist() -> ImageTensorDataset:
    return load_fashion_mnist(FASHION_MNIST, train=True)


def tiny_images(n: int, seed: int = 0, size: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=generator)


# ---------------------------------------------------------------------------------------
# Splits


@needs_fashion_mnist
@pytest.mark.parametrize("distribution", UNLABELLED_DISTRIBUTIONS)
def test_split_sizes_disjointness_and_determinism(fmnist, distribution):
    labels = fmnist.labels
    kwargs = unlabelled_distribution(distribution, 100)
    split = semi_supervised_split(labels, 1500, 100, **kwargs, val_per_class=200, seed=3)
    labelled_counts = long_tail_counts(1500, 10, 100)
    assert split.labelled_counts == labelled_counts
    assert torch.bincount(labels[split.labelled], minlength=10).tolist() == labelled_counts
    assert torch.bincount(labels[split.val], minlength=10).tolist() == [200] * 10
    unlabelled_counts = torch.bincount(labels[split.unlabelled], minlength=10).tolist()
    assert unlabelled_counts == split.unlabelled_counts
    expected = {
        "matched": long_tail_counts(3000, 10, 100),
        "uniform": [3000] * 10,
        "inverted": long_tail_counts(30, 10, 0.01),
        "unknown": [6000 - 200 - n for n in labelled_counts],
    }[distribution]
    assert unlabelled_counts == expected
    if distribution == "inverted":  # the unlabelled head is the labelled tail
        assert unlabelled_counts[0] == 30 and unlabelled_counts[-1] == 3000
        assert unlabelled_counts == sorted(unlabelled_counts)
    # disjoint, and together no larger than the training set
    parts = [split.labelled, split.unlabelled, split.val]
    union = torch.cat(parts)
    assert union.unique().numel() == union.numel()
    for part in parts:
        assert torch.equal(part, part.sort().values)
    # labelled / val are exactly long_tail_split's with the same seed
    labelled, val = long_tail_split(labels, labelled_counts, 200, 3)
    assert torch.equal(split.labelled, labelled) and torch.equal(split.val, val)
    # deterministic given the seed, different for another seed
    again = semi_supervised_split(labels, 1500, 100, **kwargs, val_per_class=200, seed=3)
    other = semi_supervised_split(labels, 1500, 100, **kwargs, val_per_class=200, seed=4)
    for name in ("labelled", "unlabelled", "val"):
        assert torch.equal(getattr(split, name), getattr(again, name))
    assert not torch.equal(split.labelled, other.labelled)
    if distribution != "unknown":
        assert not torch.equal(split.unlabelled, other.unlabelled)


def test_unlabelled_distribution_settings():
    assert unlabelled_distribution("matched", 100) == {
        "unlabelled_max": 3000,
        "unlabelled_imbalance": 100.0,
    }
    assert unlabelled_distribution("uniform", 50)["unlabelled_imbalance"] == 1.0
    assert unlabelled_distribution("inverted", 100) == {
        "unlabelled_max": 30,
        "unlabelled_imbalance": 0.01,
    }
    assert unlabelled_distribution("unknown") == {
        "unlabelled_max": None,
        "unlabelled_imbalance": None,
    }
    with pytest.raises(ValueError, match="distribution"):
        unlabelled_distribution("shuffled")
    with pytest.raises(ValueError, match="unlabelled_max"):
        unlabelled_distribution("unknown", unlabelled_max=10)


def test_split_argument_errors():
    labels = torch.arange(10).repeat(20)  # 20 per class
    with pytest.raises(ValueError, match="unlabelled_imbalance"):
        semi_supervised_split(labels, 10, 10, unlabelled_max=5)
    with pytest.raises(ValueError, match="unlabelled_max"):
        semi_supervised_split(labels, 10, 10, unlabelled_max=50, unlabelled_imbalance=1)
    with pytest.raises(ValueError, match="labelled_imbalance"):
        semi_supervised_split(labels, 10, -1)
    with pytest.raises(ValueError, match="val_per_class"):
        semi_supervised_split(labels, 10, 10, val_per_class=15)
    with pytest.raises(ValueError, match="labels"):
        semi_supervised_split(labels.float(), 10, 10)


def test_unlabelled_dataset_hides_its_labels():
    images = tiny_images(6)
    truth = torch.tensor([0, 1, 2, 0, 1, 2])
    data = ImageTensorDataset(images, truth, 0.5, 0.25, num_classes=3)
    pool = UnlabelledDataset.from_dataset(data, [1, 3, 5])
    assert len(pool) == 3 and pool.num_classes == 3
    assert pool.labels.tolist() == [-1, -1, -1]
    assert pool.hidden_labels.tolist() == [1, 0, 2]
    x, y = pool.batch(torch.tensor([2, 0]), augment=True, generator=torch.Generator())
    assert x.shape == (2, 1, 12, 12) and y.tolist() == [-1, -1]
    plain, _ = pool.batch([0, 1, 2])
    reference, _ = data.batch([1, 3, 5])
    assert torch.equal(plain, reference)
    assert pool[0][1] == -1
    assert pool.subset([2]).hidden_labels.tolist() == [2]
    assert UnlabelledDataset(images, 0.5, 0.25, 3).hidden_labels is None
    with pytest.raises(ValueError, match="hidden_labels"):
        UnlabelledDataset(images, 0.5, 0.25, 3, hidden_labels=[0, 1])


# ---------------------------------------------------------------------------------------
# FixMatch loss: threshold and logit adjustment on hand-made logits


def test_mask_keeps_only_confident_pseudo_labels():
    # softmax of [log 0.96, log 0.04] is (0.96, 0.04); of [log 0.94, log 0.06] is (0.94, 0.06)
    logits_weak = torch.tensor(
        [
            [math.log(0.96), math.log(0.04)],  # confident: class 0
            [math.log(0.06), math.log(0.94)],  # not confident enough
            [math.log(0.049), math.log(0.951)],  # just above the threshold: class 1
            [0.0, 0.0],  # 0.5 / 0.5
        ]
    )
    labels, mask, confidence = pseudo_labels(logits_weak, threshold=0.95)
    assert mask.tolist() == [True, False, True, False]
    assert labels[[0, 2]].tolist() == [0, 1]
    torch.testing.assert_close(confidence[:3], torch.tensor([0.96, 0.94, 0.951]))
    # a confidence equal to the threshold is kept (>=)
    _, at_threshold, _ = pseudo_labels(logits_weak, threshold=float(confidence[1]))
    assert at_threshold.tolist() == [True, True, True, False]

    logits_strong = torch.tensor([[0.3, -0.2], [2.0, 1.0], [-1.0, 0.5], [4.0, -4.0]])
    logits_strong.requires_grad_(True)
    weak = logits_weak.clone().requires_grad_(True)
    logits_l = torch.tensor([[1.0, 0.0]], requires_grad=True)
    result = fixmatch_loss(logits_l, torch.tensor([0]), weak, logits_strong, lambda_u=2.0)
    by_hand = (
        F.cross_entropy(logits_strong[0:1], torch.tensor([0]))
        + F.cross_entropy(logits_strong[2:3], torch.tensor([1]))
    ) / 4  # averaged over all mu * B images, masked ones count as 0
    torch.testing.assert_close(result.unlabelled, by_hand)
    torch.testing.assert_close(result.labelled, F.cross_entropy(logits_l, torch.tensor([0])))
    torch.testing.assert_close(result.total, result.labelled + 2.0 * by_hand)
    result.total.backward()
    # only the confident samples' strong views get a gradient; the weak views get none
    grad = logits_strong.grad.abs().sum(dim=1)
    assert grad[0] > 0 and grad[2] > 0 and grad[1] == 0 and grad[3] == 0
    assert weak.grad is None


def test_logit_adjustment_on_hand_made_counts():
    counts = [90, 9, 1]
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    adjustment = logit_adjustment(labels, 3, tau=1.0)
    torch.testing.assert_close(adjustment, torch.tensor([0.9, 0.09, 0.01]).log())
    # tau scales it
    torch.testing.assert_close(logit_adjustment(labels, 3, tau=0.5), 0.5 * adjustment)

    # labelled term: CE(z + tau log prior, y)
    logits_l = torch.tensor([[0.2, 0.1, -0.3], [-1.0, 0.5, 2.0]])
    targets = torch.tensor([2, 2])
    empty = torch.zeros(0, 3)
    result = fixmatch_loss(logits_l, targets, empty, empty, adjustment=adjustment)
    torch.testing.assert_close(result.labelled, F.cross_entropy(logits_l + adjustment, targets))
    plain = fixmatch_loss(logits_l, targets, empty, empty)
    assert result.labelled > plain.labelled  # the tail target is penalised by its prior

    # pseudo-labels: z itself is the balanced posterior of an LA model (debiased); z + a
    # is the long-tailed one. Raw logits favour class 2 (p = 0.95), adjusted ones class 0.
    z = torch.tensor([[0.0, 0.0, math.log(0.95 / 0.025)]])  # softmax: (.025, .025, .95)
    debiased, mask, confidence = pseudo_labels(z, 0.95, adjustment, debias=True)
    assert debiased.tolist() == [2] and mask.tolist() == [True]
    torch.testing.assert_close(confidence, torch.tensor([0.95]))
    biased, mask_biased, _ = pseudo_labels(z, 0.95, adjustment, debias=False)
    assert biased.tolist() == [0] and mask_biased.tolist() == [False]
    # by hand: softmax(z + a) = (.025*.9, .025*.09, .95*.01) / total
    by_hand = torch.tensor([0.025 * 0.9, 0.025 * 0.09, 0.95 * 0.01])
    _, _, confidence_biased = pseudo_labels(z, 0.0, adjustment, debias=False)
    torch.testing.assert_close(confidence_biased, (by_hand.max() / by_hand.sum()).reshape(1))
    with pytest.raises(ValueError, match="adjustment"):
        pseudo_labels(z, 0.95, torch.zeros(4), debias=False)

    # the unlabelled term: CE(z_strong, yhat), or CE(z_strong + a, yhat) when asked
    strong = torch.tensor([[0.5, 0.2, 0.1]])
    plain_u = fixmatch_loss(logits_l, targets, z, strong, adjustment=adjustment)
    torch.testing.assert_close(plain_u.unlabelled, F.cross_entropy(strong, torch.tensor([2])))
    margin_u = fixmatch_loss(
        logits_l, targets, z, strong, adjustment=adjustment, adjust_unlabelled_loss=True
    )
    torch.testing.assert_close(
        margin_u.unlabelled, F.cross_entropy(strong + adjustment, torch.tensor([2]))
    )


def test_cutout_and_strong_augment():
    images = torch.full((3, 1, 10, 10), 200, dtype=torch.uint8)
    out = cutout(images, 0.4, torch.Generator().manual_seed(0), fill=7)
    painted = (out == 7).sum(dim=(1, 2, 3))
    assert (painted <= 16).all() and (painted > 0).all()  # a 4x4 square, maybe clipped
    assert torch.equal(images, torch.full_like(images, 200))  # input untouched

    batch = tiny_images(20, size=16)
    state = torch.get_rng_state()
    first = strong_augment(batch, torch.Generator().manual_seed(5), group_size=4)
    second = strong_augment(batch, torch.Generator().manual_seed(5), group_size=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(first, second) and first.dtype == torch.uint8
    assert first.shape == batch.shape
    other = strong_augment(batch, torch.Generator().manual_seed(6), group_size=1)
    assert not torch.equal(first, other)
    with pytest.raises(ValueError, match="images"):
        strong_augment(batch.float(), torch.Generator())


def test_fixmatch_pretrain_records_and_checkpoints(tmp_path):
    labels = torch.tensor([0, 1, 2] * 8)
    labelled = ImageTensorDataset(tiny_images(24, seed=1), labels, 0.5, 0.25, num_classes=3)
    val = ImageTensorDataset(tiny_images(9, seed=2), labels[:9], 0.5, 0.25, num_classes=3)
    pool = UnlabelledDataset(tiny_images(20, seed=3), 0.5, 0.25, 3)
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, 1)
    path = tmp_path / "fixmatch.pt"
    seen = []
    result = fixmatch_pretrain(
        model, labelled, pool, val, loss="logit_adjusted", steps=4, batch_size=4, mu=2,
        eval_every=2, progress=False, checkpoint_path=str(path), callback=seen.append,
    )  # fmt: skip
    assert [r["step"] for r in result.history] == [2, 4] and seen == result.history
    record = result.history[-1]
    assert set(record) >= {"loss", "labelled_loss", "unlabelled_loss", "mask_rate", "val"}
    assert 0.0 <= record["mask_rate"] <= 1.0 and record["lr"] == pytest.approx(0.0)
    assert record["val"]["per_class_recall"] is not None
    loaded, meta = load_model(path)
    assert meta["step"] == 4 and meta["fixmatch_config"]["loss"] == "logit_adjusted"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert not model.training


def test_fixmatch_argument_errors():
    with pytest.raises(ValueError, match="mu"):
        FixMatchConfig(mu=-1)
    with pytest.raises(ValueError, match="threshold"):
        FixMatchConfig(threshold=1.5)
    with pytest.raises(ValueError, match="loss"):
        FixMatchConfig(loss="focal")
    with pytest.raises(ValueError, match="randaugment_max_magnitude"):
        FixMatchConfig(randaugment_max_magnitude=31)
    with pytest.raises(ValueError, match="unknown FixMatch setting"):
        FixMatchConfig.from_dict({"steps": 3, "epochs": 2})
    labelled = ImageTensorDataset(tiny_images(6), torch.tensor([0, 1] * 3), 0.5, 0.25,
                                  num_classes=3)  # fmt: skip
    model = create_model("small_cnn", 3, 1)
    with pytest.raises(TypeError, match="unlabelled"):
        fixmatch_pretrain(model, labelled, [1, 2, 3], steps=1, progress=False)
    pool = UnlabelledDataset(tiny_images(4), 0.5, 0.25, 3)
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        fixmatch_pretrain(model, labelled, pool, loss="logit_adjusted", steps=1, progress=False)


# ---------------------------------------------------------------------------------------
# Training: hidden labels, pseudo-label refresh, a short semi-supervised run


def small_semi_supervised(fmnist: ImageTensorDataset, seed: int = 0):
    split = semi_supervised_split(
        fmnist.labels, 150, 10, unlabelled_max=100, unlabelled_imbalance=1.0,
        val_per_class=30, seed=seed,
    )  # fmt: skip
    return semi_supervised_data(fmnist, split)


@needs_fashion_mnist
@pytest.mark.filterwarnings("ignore::selmix.core.policy.StationaryPointWarning")
def test_hidden_labels_never_reach_training(fmnist):
    data = small_semi_supervised(fmnist)
    pool = data.unlabelled.subset(torch.arange(64))
    truth = pool.hidden_labels
    permuted = truth[torch.randperm(truth.numel(), generator=torch.Generator().manual_seed(1))]
    variants = {
        "true": pool,
        "poisoned": UnlabelledDataset(
            pool.images, pool.mean, pool.std, 10, hidden_labels=(truth + 3) % 10
        ),
        "permuted": UnlabelledDataset(pool.images, pool.mean, pool.std, 10, hidden_labels=permuted),
        "none": UnlabelledDataset(pool.images, pool.mean, pool.std, 10),
    }
    labelled = data.labelled.subset(torch.arange(0, len(data.labelled), 4))
    states, histories = {}, {}
    for name, unlabelled in variants.items():
        torch.manual_seed(0)
        model = create_model("small_cnn", 10, 1)
        fixmatch_pretrain(
            model, labelled, unlabelled, config=FixMatchConfig(
                steps=3, batch_size=4, mu=2, threshold=0.0, loss="logit_adjusted",
                eval_every=3, progress=False,
            ),
        )  # fmt: skip
        result = finetune(
            model, labelled, data.val, "min_recall", unlabelled=unlabelled, steps=4,
            batch_size=8, feedback_every=2, progress=False,
        )  # fmt: skip
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        histories[name] = result.history
    reference = states["true"]
    for name, state in states.items():
        for key, value in reference.items():
            assert torch.equal(state[key], value), (name, key)
        for mine, theirs in zip(histories[name], histories["true"], strict=True):
            assert mine["pseudo_label_histogram"] == theirs["pseudo_label_histogram"]
            assert mine["metrics"] == theirs["metrics"]
    # only the reporting differs
    assert "pseudo_label_accuracy" in histories["true"][0]
    assert "pseudo_label_accuracy" not in histories["none"][0]
    assert histories["poisoned"][0]["pseudo_label_accuracy"] != pytest.approx(
        histories["true"][0]["pseudo_label_accuracy"]
    )


@needs_fashion_mnist
@pytest.mark.filterwarnings("ignore::selmix.core.policy.StationaryPointWarning")
def test_pseudo_labels_are_refreshed_at_feedback(fmnist):
    data = small_semi_supervised(fmnist)
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 1)
    config = FinetuneConfig(steps=10, batch_size=8, feedback_every=5, progress=False)
    trainer = Trainer(model, data.labelled, data.val, None, config, unlabelled=data.unlabelled)
    before = trainer.feedback()["pseudo_label_histogram"]
    assert sum(before) == len(data.unlabelled)
    with torch.no_grad():
        model.head.bias[7] += 1e4  # the model now predicts class 7 everywhere
    after = trainer.feedback()["pseudo_label_histogram"]
    assert after != before
    assert after[7] == len(data.unlabelled) and sum(after) == after[7]
    # the sampler draws x2 of class 7 from the pool, the other classes fall back
    assert trainer.sampler.second_has_class.tolist() == [k == 7 for k in range(10)]
    report = pseudo_label_report(model, data.unlabelled)
    assert report["histogram"] == after
    assert report["accuracy"] == pytest.approx(0.1)  # the pool is uniform: 100 per class


@needs_fashion_mnist
def test_short_semi_supervised_selmix_improves_min_recall(fmnist):
    data = small_semi_supervised(fmnist, seed=2)
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 1)
    pretrain(
        model, data.labelled, epochs=10, batch_size=64, lr=0.05, loss="logit_adjusted",
        progress=False,
    )  # fmt: skip
    # frozen backbone: features once, pseudo-labels from the head at every feedback step
    result = finetune(
        model, data.labelled, data.val, "min_recall", unlabelled=data.unlabelled,
        steps=100, batch_size=32, feedback_every=10, lr_head=1e-4, frozen_backbone=True,
        progress=False,
    )  # fmt: skip
    first, last = result.history[0], result.history[-1]
    assert last["metrics"]["min_recall"] >= first["metrics"]["min_recall"] + 0.1
    assert last["objective"] > first["objective"] + 0.1
    assert len(result.history) == 11
    for record in result.history:
        assert sum(record["pseudo_label_histogram"]) == len(data.unlabelled)
        assert 0.0 <= record["pseudo_label_accuracy"] <= 1.0
