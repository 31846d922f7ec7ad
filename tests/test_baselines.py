"""The comparison baselines: post-hoc logit adjustment, cRT (with label-aware smoothing:
MiSLAS stage 2) and logit-adjusted fine-tuning.

Most tests run on Gaussian classes in an 8-d input space with a small MLP (with batch
norm), trained with plain cross-entropy on a long-tailed training set, so that every
baseline's effect on the tail is visible in a fraction of a second.
"""

import copy
import inspect
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import selmix
from selmix.baselines import (
    BASELINES,
    ClassBalancedSampler,
    ObjectiveScore,
    best_index,
    class_log_prior,
    classifier_retraining,
    label_aware_smoothing,
    list_baselines,
    logit_adjusted_finetune,
    mislas_stage2,
    objective_score,
    posthoc_logit_adjustment,
    run_baseline,
    smoothed_cross_entropy,
)
from selmix.core.objectives import get_objective
from selmix.data import ImageTensorDataset
from selmix.engine.evaluate import evaluate
from selmix.models import create_model

K = 4
DIM = 8
TRAIN_COUNTS = [600, 200, 60, 20]


class FeatureDataset:
    """Vectors with the selmix batch interface; counts the augmented batches it served."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.x = x
        self.labels = labels
        self.num_classes = K
        self.augmented_batches = 0

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, indices, augment=False, generator=None, device=None):
        index = torch.as_tensor(indices).long()
        if augment:
            self.augmented_batches += 1
        x, y = self.x[index], self.labels[index]
        return (x, y) if device is None else (x.to(device), y.to(device))


MEANS = 1.3 * torch.randn(K, DIM, generator=torch.Generator().manual_seed(0))


def gaussians(counts: list[int], seed: int) -> FeatureDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(K), torch.tensor(counts))
    x = MEANS[labels] + torch.randn(labels.numel(), DIM, generator=generator)
    return FeatureDataset(x, labels)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return {
        "train": gaussians(TRAIN_COUNTS, 1),
        "val": gaussians([100] * K, 2),
        "test": gaussians([300] * K, 3),
    }


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, K))


@pytest.fixture(scope="module")
def ce_model(data):
    """Plain cross-entropy on the long-tailed set: biased towards the head classes."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train = data["train"]
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(train.x), train.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x)


def metrics(model: nn.Module, dataset) -> dict:
    return evaluate(model, dataset).metrics()


def tail_share(model: nn.Module, dataset) -> float:
    """Share of predictions that go to the two rarest classes."""
    coverage = metrics(model, dataset)["per_class_coverage"]
    return coverage[2] + coverage[3]


# -- the selection rule -------------------------------------------------------------------
def test_objective_score_is_the_exact_metric():
    counts = torch.tensor([[8, 2, 0], [3, 6, 1], [0, 5, 5]])  # recalls 0.8, 0.6, 0.5
    recalls = np.array([0.8, 0.6, 0.5])
    expected = {
        "mean_recall": recalls.mean(),
        "min_recall": 0.5,
        "g_mean": recalls.prod() ** (1 / 3),
        "h_mean": 3 / (1 / recalls).sum(),
    }
    for name, value in expected.items():
        score = objective_score(name, counts)
        assert score.metric == pytest.approx(value), name
        assert score.coverage is None and score.feasible
    head_tail = get_objective("min_head_tail_recall", head_classes=[0])
    assert objective_score(head_tail, counts).metric == pytest.approx(0.55)  # min(0.8, 0.55)
    # a user's callable scores its own value (of the matrix normalised to a total of 1)
    trace = objective_score(lambda c: c.diagonal().sum(), counts)
    assert trace.metric == pytest.approx(19 / 30, abs=1e-6)
    # counts and fractions score alike
    fractions = objective_score("g_mean", counts.double() / 30)
    assert fractions.metric == pytest.approx(objective_score("g_mean", counts).metric)


def test_coverage_rule_prefers_feasible_then_metric_then_coverage():
    # K = 3, alpha = 0.95: target min coverage 0.95 / 3 = 0.3167
    infeasible_best_recall = torch.tensor([[10, 0, 0], [0, 10, 0], [0, 3, 7]])  # MR .9, cov .233
    infeasible_more_coverage = torch.tensor([[9, 0, 1], [0, 9, 1], [0, 2, 8]])  # MR .867, cov .3
    feasible_lower = torch.tensor([[7, 2, 1], [1, 7, 2], [2, 1, 7]])  # MR .7, cov 1/3
    feasible_higher = torch.tensor([[8, 1, 1], [1, 8, 1], [1, 1, 8]])  # MR .8, cov 1/3
    matrices = [infeasible_best_recall, infeasible_more_coverage, feasible_lower, feasible_higher]
    objective = "mean_recall_min_coverage"
    scores = [objective_score(objective, c) for c in matrices]
    assert [s.feasible for s in scores] == [False, False, True, True]
    assert scores[0].target == pytest.approx(0.95 / 3)
    assert scores[0].coverage == pytest.approx(7 / 30)
    assert scores[0].metric == pytest.approx(0.9)
    assert scores[3] > scores[2] > scores[1] > scores[0]
    assert best_index(scores) == 3
    assert best_index(scores[:2]) == 1  # none feasible: the largest min coverage
    # a looser target makes the best-recall matrix feasible, and then it wins
    loose = get_objective(objective, alpha=0.5)
    assert best_index([objective_score(loose, c) for c in matrices]) == 0
    # the head/tail variant constrains the head's and the tail's mean coverage (1/3 each)
    head_tail = get_objective("mean_recall_min_head_tail_coverage", head_classes=[0])
    assert objective_score(head_tail, infeasible_best_recall).feasible
    assert best_index([objective_score(head_tail, c) for c in matrices]) == 0
    # ties go to the first
    assert best_index([ObjectiveScore(0.5), ObjectiveScore(0.5), ObjectiveScore(0.4)]) == 0


def test_min_recall_ties_go_to_the_higher_mean_recall():
    # two steps with the same min recall 0.5 (a small validation set moves it in steps of
    # 1 / n): the better-trained one, higher mean recall, is the best; then the earlier
    early = torch.tensor([[5, 5, 0], [2, 6, 2], [0, 4, 6]])  # recalls .5 .6 .6, mean .567
    later = torch.tensor([[9, 1, 0], [1, 9, 0], [0, 5, 5]])  # recalls .9 .9 .5, mean .767
    scores = [objective_score("min_recall", c) for c in (early, later)]
    assert scores[0].metric == scores[1].metric == pytest.approx(0.5)
    assert best_index(scores) == 1
    assert scores[1].tiebreak == pytest.approx((0.9 + 0.9 + 0.5) / 3)
    # min head/tail recall (head [0], tail [1, 2]): .5 against .7, the later wins outright
    head_tail = get_objective("min_head_tail_recall", head_classes=[0])
    assert best_index([objective_score(head_tail, c) for c in (early, later)]) == 1
    assert best_index([objective_score("min_recall", c) for c in (later, later)]) == 0


# -- post-hoc logit adjustment ------------------------------------------------------------
def test_posthoc_shift_is_minus_tau_log_prior(data, ce_model):
    state = snapshot(ce_model)
    counts = np.array(TRAIN_COUNTS, dtype=np.float64)
    result = posthoc_logit_adjustment(ce_model, torch.tensor(TRAIN_COUNTS), data["val"],
                                      "mean_recall", taus=[1.5])  # fmt: skip
    assert result.tau == 1.5 and result.model is not ce_model
    x = data["test"].x
    expected = logits_of(ce_model, x).double().numpy() - 1.5 * np.log(counts / counts.sum())
    np.testing.assert_allclose(logits_of(result.model, x).double().numpy(), expected, atol=1e-5)
    assert_same_state(ce_model, state)  # the original is untouched
    # the prior may be given as probabilities or as the training set itself
    for prior in (counts / counts.sum(), data["train"]):
        other = posthoc_logit_adjustment(ce_model, prior, data["val"], "mean_recall", [1.5])
        torch.testing.assert_close(other.model[-1].bias, result.model[-1].bias)


def test_posthoc_tau_zero_changes_nothing(data, ce_model):
    result = posthoc_logit_adjustment(ce_model, data["train"], data["val"], "min_recall", [0.0])
    x = data["test"].x
    assert torch.equal(logits_of(result.model, x), logits_of(ce_model, x))


def brute_force_metrics(logits: np.ndarray, labels: np.ndarray, shift: np.ndarray) -> dict:
    preds = (logits - shift).argmax(axis=1)
    counts = np.zeros((K, K))
    np.add.at(counts, (labels, preds), 1)
    recall = np.diag(counts) / counts.sum(axis=1)
    return {
        "mean_recall": recall.mean(),
        "min_recall": recall.min(),
        "g_mean": 0.0 if recall.min() == 0 else np.exp(np.log(recall).mean()),
        "coverage": (counts.sum(axis=0) / counts.sum()).min(),
    }


@pytest.mark.parametrize("objective", ["mean_recall", "min_recall", "g_mean", "coverage"])
def test_posthoc_picks_the_best_tau_of_the_grid(data, ce_model, objective):
    val = data["val"]
    name = "mean_recall_min_coverage" if objective == "coverage" else objective
    result = posthoc_logit_adjustment(ce_model, data["train"], val, name)
    assert result.taus == [0.25 * i for i in range(13)]
    logits = logits_of(ce_model, val.x).double().numpy()
    log_prior = np.log(np.array(TRAIN_COUNTS) / sum(TRAIN_COUNTS))
    table = [brute_force_metrics(logits, val.labels.numpy(), t * log_prior) for t in result.taus]
    metric = "mean_recall" if objective == "coverage" else objective
    for row, score in zip(table, result.scores, strict=True):
        assert score.metric == pytest.approx(row[metric])
    chosen = table[result.taus.index(result.tau)]
    if objective == "coverage":
        feasible = [row for row in table if row["coverage"] >= 0.95 / K]
        assert feasible, "the grid should reach the coverage target on this data"
        assert chosen["coverage"] >= 0.95 / K
        assert chosen["mean_recall"] == max(row["mean_recall"] for row in feasible)
    else:
        assert chosen[metric] == max(row[metric] for row in table)
        assert chosen[metric] > table[0][metric]  # the adjustment helps a CE model
    assert result.tau > 0
    # the returned model realises the chosen tau's validation metrics
    after = metrics(result.model, val)
    assert after[metric] == pytest.approx(chosen[metric], abs=1e-9)
    assert result.val_metrics[result.taus.index(result.tau)][metric] == pytest.approx(after[metric])


def test_posthoc_coverage_constraint_beats_a_better_metric(data, ce_model):
    # On a validation set with a rare class, the tau of the best mean recall predicts the
    # rare class too seldom: a larger tau meets the coverage target at a lower mean recall.
    val = gaussians([100, 100, 100, 40], 5)
    taus = [0.5 * i for i in range(13)]
    logits = logits_of(ce_model, val.x).double().numpy()
    log_prior = np.log(np.array(TRAIN_COUNTS) / sum(TRAIN_COUNTS))
    table = [brute_force_metrics(logits, val.labels.numpy(), t * log_prior) for t in taus]
    recall = [row["mean_recall"] for row in table]
    coverage = [row["coverage"] for row in table]
    unconstrained = posthoc_logit_adjustment(ce_model, data["train"], val, "mean_recall", taus)
    assert unconstrained.tau == taus[int(np.argmax(recall))]

    target = 0.8 / K
    objective = get_objective("mean_recall_min_coverage", alpha=0.8)
    result = posthoc_logit_adjustment(ce_model, data["train"], val, objective, taus)
    feasible = [i for i in range(len(taus)) if coverage[i] >= target]
    assert feasible and coverage[int(np.argmax(recall))] < target  # the case under test
    chosen = taus.index(result.tau)
    assert chosen in feasible
    assert recall[chosen] == max(recall[i] for i in feasible) < max(recall)

    # nothing meets alpha = 1: the largest min coverage wins, not the largest mean recall
    impossible = get_objective("mean_recall_min_coverage", alpha=1.0)
    result = posthoc_logit_adjustment(ce_model, data["train"], val, impossible, taus)
    assert not any(score.feasible for score in result.scores)
    assert result.tau == taus[int(np.argmax(coverage))] != unconstrained.tau


# -- classifier re-training ----------------------------------------------------------------
def test_class_balanced_sampler_is_balanced_and_uniform_within_class():
    labels = torch.repeat_interleave(torch.arange(5), torch.tensor([1000, 100, 10, 1, 0]))
    sampler = ClassBalancedSampler(labels, 5, torch.Generator().manual_seed(0))
    draws = sampler.sample(40_000)
    per_class = torch.bincount(labels[draws], minlength=5).double()
    assert per_class[4] == 0  # a class with no sample is never drawn
    expected = 40_000 / 4
    chi_square = float(((per_class[:4] - expected) ** 2 / expected).sum())
    assert chi_square < 16.27  # chi-square, 3 degrees of freedom, p = 0.001
    class_two = draws[labels[draws] == 2]
    within = torch.bincount(class_two - 1100, minlength=10).double()
    mean = within.mean()
    assert float(((within - mean) ** 2 / mean).sum()) < 27.88  # 9 degrees of freedom
    same = [ClassBalancedSampler(labels, 5, torch.Generator().manual_seed(1)) for _ in "ab"]
    assert torch.equal(same[0].sample(500), same[1].sample(500))


def test_crt_retrains_the_head_only_and_helps_the_tail(data, ce_model):
    state = snapshot(ce_model)
    records = []
    retrained = classifier_retraining(ce_model, data["train"], data["val"], epochs=8,
                                      batch_size=64, seed=0, callback=records.append)  # fmt: skip
    assert_same_state(ce_model, state)
    for key, value in retrained[:-1].state_dict().items():  # backbone and BN statistics
        assert torch.equal(value, ce_model[:-1].state_dict()[key]), key
    assert not torch.equal(retrained[-1].weight, ce_model[-1].weight)
    assert not retrained.training
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert records[-1]["val"]["mean_recall"] == pytest.approx(
        metrics(retrained, data["val"])["mean_recall"]
    )
    before, after = metrics(ce_model, data["test"]), metrics(retrained, data["test"])
    assert after["mean_recall"] > before["mean_recall"] + 0.02
    assert after["min_recall"] > before["min_recall"] + 0.2


def test_crt_reinitialises_the_head_and_follows_its_seed(data, ce_model):
    train = data["train"]
    first = classifier_retraining(ce_model, train, epochs=1, seed=3)
    scrambled = copy.deepcopy(ce_model)
    with torch.no_grad():
        scrambled[-1].weight.mul_(-5.0)
        scrambled[-1].bias.fill_(2.0)
    # the old head plays no part: same seed, same retrained head
    second = classifier_retraining(scrambled, train, epochs=1, seed=3)
    torch.testing.assert_close(second[-1].weight, first[-1].weight, rtol=0, atol=0)
    third = classifier_retraining(ce_model, train, epochs=1, seed=torch.Generator().manual_seed(4))
    assert not torch.equal(third[-1].weight, first[-1].weight)


# -- label-aware smoothing (MiSLAS stage 2) ------------------------------------------------
def test_crt_defaults_are_unchanged_by_the_smoothing_and_reinit_options(data, ce_model):
    train = data["train"]
    settings = dict(epochs=2, batch_size=64, seed=5)
    plain = classifier_retraining(ce_model, train, **settings)
    explicit = classifier_retraining(
        ce_model, train, label_smoothing=0.0, reinit_head=True, **settings
    )
    for key, value in plain.state_dict().items():
        assert torch.equal(explicit.state_dict()[key], value), key
    # ... while either option, set otherwise, changes the head
    smoothed = classifier_retraining(ce_model, train, label_smoothing=0.1, **settings)
    kept = classifier_retraining(ce_model, train, reinit_head=False, **settings)
    for other in (smoothed, kept):
        assert not torch.equal(other[-1].weight, plain[-1].weight)


def test_label_aware_smoothing_is_linear_in_the_class_count():
    # head 100, tail 10, a middle class at a third of the way: eps = 0.3, 0.1, 0.0
    eps = label_aware_smoothing([100, 40, 10], (0.3, 0.0))
    assert eps.dtype == torch.float64
    torch.testing.assert_close(eps, torch.tensor([0.3, 0.1, 0.0], dtype=torch.float64))
    # the pair is (head, tail) whichever is larger, and the class order does not matter
    reversed_pair = label_aware_smoothing(torch.tensor([10, 100, 40]), (0.05, 0.2))
    torch.testing.assert_close(reversed_pair, torch.tensor([0.2, 0.05, 0.15], dtype=torch.float64))
    torch.testing.assert_close(
        label_aware_smoothing([7, 7], (0.3, 0.1)), torch.full((2,), 0.3, dtype=torch.float64)
    )
    torch.testing.assert_close(
        label_aware_smoothing([5, 1, 9], 0.2), torch.full((3,), 0.2, dtype=torch.float64)
    )


def test_smoothed_cross_entropy_equals_soft_targets_by_hand():
    counts = [100, 40, 10]  # eps 0.3, 0.1, 0.0
    logits = torch.tensor(
        [[2.0, -1.0, 0.5], [0.1, 0.3, -2.0], [-0.5, 1.5, 1.0], [1.0, 1.0, 1.0], [3.0, 0.0, -3.0]]
    )
    labels = torch.tensor([0, 1, 2, 1, 0])
    eps = torch.tensor([0.3, 0.1, 0.0])[labels]
    targets = (1 - eps)[:, None] * nn.functional.one_hot(labels, 3) + eps[:, None] / 3
    expected = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1)
    class_eps = label_aware_smoothing(counts, (0.3, 0.0))
    per_sample = smoothed_cross_entropy(logits, labels, class_eps, reduction="none")
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(smoothed_cross_entropy(logits, labels, class_eps), expected.mean())
    # the tail class (eps 0) has the plain cross-entropy
    plain = nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(per_sample[2], plain[2])
    assert not torch.allclose(per_sample[0], plain[0])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.45])
def test_one_smoothing_for_every_class_is_torch_label_smoothing(eps):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(16, K, generator=generator)
    labels = torch.randint(K, (16,), generator=generator)
    expected = nn.functional.cross_entropy(logits, labels, label_smoothing=eps)
    for smoothing in (eps, (eps, eps)):
        class_eps = label_aware_smoothing(TRAIN_COUNTS, smoothing)
        torch.testing.assert_close(smoothed_cross_entropy(logits, labels, class_eps), expected)


def test_crt_trains_with_the_label_aware_loss_from_the_models_head(data, ce_model):
    """One full-batch step: its recorded loss is the smoothed loss of the model's own head on
    the class-balanced batch (the sampler is the first user of the seed's generator when the
    head is kept)."""
    train = data["train"]
    size = train.labels.numel()
    records = []
    classifier_retraining(ce_model, train, epochs=1, batch_size=size, seed=7,
                          label_smoothing=(0.3, 0.0), reinit_head=False,
                          callback=records.append)  # fmt: skip
    index = ClassBalancedSampler(train.labels, K, torch.Generator().manual_seed(7)).sample(size)
    with torch.no_grad():
        logits = ce_model[-1](ce_model[:-1](train.x[index]))
    labels = train.labels[index]
    counts = torch.tensor(TRAIN_COUNTS, dtype=torch.float32)
    eps = (0.3 * (counts - 20) / (600 - 20))[labels]  # 0.3 for class 0 down to 0 for class 3
    targets = (1 - eps)[:, None] * nn.functional.one_hot(labels, K) + eps[:, None] / K
    expected = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert records[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    plain = float(nn.functional.cross_entropy(logits, labels))
    assert records[0]["loss"] != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize(
    "value", [1.0, -0.1, math.nan, math.inf, (0.3,), (0.3, 0.0, 0.1), (0.3, 1.0), "x", True, None]
)
def test_bad_label_smoothing_is_named(data, ce_model, value):
    message = r"`label_smoothing` must be a float in \[0, 1\) or a pair \(head, tail\) of them"
    with pytest.raises(ValueError, match=message + ", got " + re.escape(repr(value))):
        classifier_retraining(ce_model, data["train"], label_smoothing=value)
    with pytest.raises(ValueError, match=message):
        label_aware_smoothing(TRAIN_COUNTS, value)
    with pytest.raises(ValueError, match=message):
        run_baseline("mislas_stage2", ce_model, data["train"], None, "min_recall",
                     label_smoothing=value)  # fmt: skip


def test_mislas_stage2_fine_tunes_the_head_on_the_frozen_backbone(data, ce_model):
    state = snapshot(ce_model)
    train, val = data["train"], data["val"]
    result = run_baseline("mislas_stage2", ce_model, train, val, "min_recall",
                          epochs=2, batch_size=64, seed=3)  # fmt: skip
    assert_same_state(ce_model, state)
    model = result.model
    assert result.name == "mislas_stage2" and not model.training
    for key, value in model[:-1].state_dict().items():  # backbone and BN statistics
        assert torch.equal(value, ce_model[:-1].state_dict()[key]), key
    assert not torch.equal(model[-1].weight, ce_model[-1].weight)
    assert not torch.equal(model[-1].bias, ce_model[-1].bias)
    assert [entry["epoch"] for entry in result.details["history"]] == [1, 2]
    # it is cRT with MiSLAS's defaults
    direct = classifier_retraining(ce_model, train, epochs=2, batch_size=64, seed=3,
                                   label_smoothing=(0.3, 0.0), reinit_head=False)  # fmt: skip
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    crt = classifier_retraining(ce_model, train, epochs=2, batch_size=64, seed=3)
    assert not torch.equal(model[-1].weight, crt[-1].weight)


def test_mislas_stage2_has_crt_arguments_with_its_own_defaults():
    crt = inspect.signature(classifier_retraining).parameters
    mislas = inspect.signature(mislas_stage2).parameters
    assert set(mislas) == set(crt)
    for name, parameter in mislas.items():
        assert parameter.kind == crt[name].kind, name
        if name == "label_smoothing":
            assert parameter.default == (0.3, 0.0)
        elif name == "reinit_head":
            assert parameter.default is False
        else:
            assert parameter.default == crt[name].default, name


def test_mislas_stage2_through_the_baseline_config(data, ce_model):
    from selmix.baselines import BaselineConfig, baseline

    train, val = data["train"], data["val"]
    options = BaselineConfig(smooth_head=0.2, smooth_tail=0.05).options("mislas_stage2")
    assert options["label_smoothing"] == (0.2, 0.05) and "smooth_head" not in options
    assert {"epochs", "lr", "batch_size", "momentum", "weight_decay"} <= set(options)
    assert "label_smoothing" not in BaselineConfig().options("crt")
    assert "smooth_head" not in BaselineConfig.used_by("crt")
    assert "epochs" in BaselineConfig.used_by("mislas_stage2")
    result = baseline("mislas_stage2", ce_model, train, val, epochs=1, seed=2, smooth_head=0.2)
    direct = mislas_stage2(ce_model, train, epochs=1, seed=2, label_smoothing=(0.2, 0.0),
                           batch_size=result.config.batch_size, momentum=result.config.momentum,
                           weight_decay=result.config.weight_decay)  # fmt: skip
    for key, value in direct.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value), key
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="smooth_tail"):
            BaselineConfig(smooth_tail=bad)


# -- logit-adjusted fine-tuning ------------------------------------------------------------
def bn_statistics(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var)
    ]


def test_la_finetune_moves_predictions_to_the_tail(data, ce_model):
    state = snapshot(ce_model)
    train = data["train"]
    settings = dict(steps=150, batch_size=64, lr_head=0.05, seed=0)
    adjusted = logit_adjusted_finetune(ce_model, train, **settings)
    plain = logit_adjusted_finetune(ce_model, train, tau=0.0, **settings)
    assert_same_state(ce_model, state)
    assert not adjusted.training
    for before, after in zip(bn_statistics(ce_model), bn_statistics(adjusted), strict=True):
        assert torch.equal(before, after)  # batch norm stayed in eval mode
    assert not torch.equal(adjusted[0].weight, ce_model[0].weight)  # the backbone trained
    test = data["test"]
    assert tail_share(adjusted, test) > tail_share(plain, test) + 0.05
    assert tail_share(adjusted, test) > tail_share(ce_model, test) + 0.05
    assert metrics(adjusted, test)["mean_recall"] > metrics(ce_model, test)["mean_recall"] + 0.02
    assert train.augmented_batches == 2 * settings["steps"]  # augment=True by default


def test_la_finetune_frozen_backbone_and_learning_rates(data, ce_model):
    train = data["train"]
    train.augmented_batches = 0
    frozen = logit_adjusted_finetune(ce_model, train, steps=20, frozen_backbone=True, seed=0)
    for key, value in frozen[:-1].state_dict().items():
        assert torch.equal(value, ce_model[:-1].state_dict()[key]), key
    assert not torch.equal(frozen[-1].weight, ce_model[-1].weight)
    assert train.augmented_batches == 0  # cached features: no image batches at all
    still = logit_adjusted_finetune(ce_model, train, steps=3, lr_backbone=0.0, weight_decay=0.0,
                                    augment=False)  # fmt: skip
    assert torch.equal(still[0].weight, ce_model[0].weight)
    assert not torch.equal(still[-1].weight, ce_model[-1].weight)
    assert train.augmented_batches == 0
    repeat = logit_adjusted_finetune(ce_model, train, steps=20, frozen_backbone=True, seed=0)
    assert torch.equal(repeat[-1].weight, frozen[-1].weight)


def test_baselines_on_a_builtin_cnn():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(24) % 3
    dataset = ImageTensorDataset(images, labels, mean=0.5, std=0.25)
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, in_channels=1).eval()
    state, statistics = snapshot(model), bn_statistics(model)
    conv = model.features.block1[0].weight.detach().clone()
    tuned = logit_adjusted_finetune(model, dataset, steps=2, batch_size=8, lr_head=0.1)
    for before, after in zip(statistics, bn_statistics(tuned), strict=True):
        assert torch.equal(before, after)
    assert not torch.equal(tuned.features.block1[0].weight, conv)
    retrained = classifier_retraining(model, dataset, epochs=1, batch_size=8)
    assert torch.equal(retrained.features.block1[0].weight, conv)
    adjusted = posthoc_logit_adjustment(model, [2, 1, 1], dataset, "mean_recall", [0.0, 1.0])
    assert adjusted.tau in (0.0, 1.0)
    assert_same_state(model, state)


class WithFc(nn.Module):
    """A torchvision-style model: no feature module, ``forward`` ends with ``self.fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(DIM, 16)
        self.fc = nn.Linear(16, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(x)))


def test_baselines_on_a_headless_view_split(data):
    torch.manual_seed(0)
    model = WithFc().eval()
    state, x = snapshot(model), data["test"].x
    adjusted = posthoc_logit_adjustment(model, TRAIN_COUNTS, data["val"], "mean_recall", [1.0])
    shift = class_log_prior(TRAIN_COUNTS, K).float()
    torch.testing.assert_close(logits_of(adjusted.model, x), logits_of(model, x) - shift)
    retrained = classifier_retraining(model, data["train"], epochs=1)
    assert torch.equal(retrained.body.weight, model.body.weight)
    assert not torch.equal(retrained.fc.weight, model.fc.weight)
    tuned = logit_adjusted_finetune(model, data["train"], steps=3, lr_head=0.1)
    assert not torch.equal(tuned.body.weight, model.body.weight)
    assert_same_state(model, state)


# -- registry -------------------------------------------------------------------------------
def test_registry_runs_every_baseline_by_name(data, ce_model):
    assert list_baselines() == ["crt", "la_finetune", "mislas_stage2", "posthoc_la", "start"]
    assert selmix.list_baselines() == list_baselines()
    train, val = data["train"], data["val"]
    start = run_baseline("start", ce_model, train, val, "min_recall")
    assert start.name == "start" and start.model is not ce_model
    assert torch.equal(logits_of(start.model, val.x), logits_of(ce_model, val.x))
    posthoc = run_baseline("posthoc_la", ce_model, train, val, "min_recall", taus=[0.0, 1.0])
    assert posthoc.details["tau"] in (0.0, 1.0) and len(posthoc.details["scores"]) == 2
    assert set(posthoc.details["scores"][0]) == {
        "metric",
        "coverage",
        "target",
        "tiebreak",
        "feasible",
    }
    seen = []
    crt = run_baseline("crt", ce_model, train, val, "min_recall", epochs=2, callback=seen.append)
    assert len(crt.details["history"]) == 2 and seen == crt.details["history"]
    tuned = run_baseline("la_finetune", ce_model, train, val, "min_recall", steps=2)
    assert isinstance(tuned.model, nn.Sequential) and tuned.details == {}
    with pytest.raises(ValueError, match="unknown `name` 'mixup'; expected one of 'crt'"):
        run_baseline("mixup", ce_model, train, val, "min_recall")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['epochs'\] for baseline 'la_"):
        run_baseline("la_finetune", ce_model, train, val, "min_recall", epochs=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['prior'\]"):
        run_baseline("posthoc_la", ce_model, train, val, "min_recall", prior=[1, 1, 1, 1])
    assert set(BASELINES) == set(list_baselines())


# -- errors ---------------------------------------------------------------------------------
def test_class_log_prior():
    torch.testing.assert_close(
        class_log_prior([2, 6], 2), torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    )
    with pytest.raises(ValueError, match=r"one count or probability per class \(3\), got shape"):
        class_log_prior([1, 2], 3)
    with pytest.raises(ValueError, match=r"`prior` is 0 for class\(es\) \[1\]"):
        class_log_prior([3, 0, 1], 3)
    with pytest.raises(ValueError, match="`prior` must be finite and >= 0"):
        class_log_prior([3, -1, 1], 3)


def adjust(model, data, taus):
    return posthoc_logit_adjustment(model, TRAIN_COUNTS, data["val"], "mean_recall", taus)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, d: logit_adjusted_finetune(m, d["train"], steps=0), ValueError,
         "`steps` must be >= 1, got 0"),
        (lambda m, d: logit_adjusted_finetune(m, d["train"], lr_head=0), ValueError,
         "`lr_head` must be > 0, got 0.0"),
        (lambda m, d: logit_adjusted_finetune(m, d["train"], tau=-1.0), ValueError,
         "`tau` must be >= 0, got -1.0"),
        (lambda m, d: logit_adjusted_finetune(m, d["train"], frozen_backbone="yes"), TypeError,
         "`frozen_backbone` must be true or false, got str"),
        (lambda m, d: logit_adjusted_finetune(m, d["train"], seed="0"), TypeError,
         "`seed` must be an int or a torch.Generator, got str"),
        (lambda m, d: logit_adjusted_finetune(m, d["train"], device="tpu"), ValueError,
         "`device` must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got 'tpu'"),
        (lambda m, d: logit_adjusted_finetune(m, gaussians([5, 5, 5, 0], 0)), ValueError,
         r"`train` has no samples of class\(es\) \[3\]"),
        (lambda m, d: classifier_retraining(m, d["train"], epochs=0), ValueError,
         "`epochs` must be >= 1, got 0"),
        (lambda m, d: classifier_retraining(m, d["train"], lr=-0.1), ValueError,
         "`lr` must be > 0, got -0.1"),
        (lambda m, d: classifier_retraining(m, d["train"], batch_size=0), ValueError,
         "`batch_size` must be >= 1, got 0"),
        (lambda m, d: classifier_retraining(m, d["train"], reinit_head="no"), TypeError,
         "`reinit_head` must be true or false, got str 'no'"),
        (lambda m, d: classifier_retraining("model", d["train"]), TypeError,
         "`model` must be a torch.nn.Module, got str"),
        (lambda m, d: adjust(m, d, []),
         ValueError, "`taus` must hold at least one value, got an empty sequence"),
        (lambda m, d: adjust(m, d, [1, -0.5]),
         ValueError, r"`taus\[1\]` must be >= 0, got -0.5"),
        (lambda m, d: adjust(m, d, [math.inf]),
         ValueError, r"`taus\[0\]` must be a finite number >= 0, got inf"),
        (lambda m, d: adjust(m, d, 1.0),
         TypeError, "`taus` must be a sequence of numbers, got float"),
        (lambda m, d: posthoc_logit_adjustment(m, TRAIN_COUNTS, gaussians([3, 3, 3, 0], 0),
                                               "mean_recall"),
         ValueError, r"`val` has no samples of class\(es\) \[3\]"),
        (lambda m, d: posthoc_logit_adjustment(m, TRAIN_COUNTS, d["val"], "recall"),
         ValueError, "unknown `objective` 'recall'"),
        (lambda m, d: posthoc_logit_adjustment(m, [1, 2, 3], d["val"], "mean_recall"),
         ValueError, r"per class \(4\), got shape \(3,\)"),
    ],
)  # fmt: skip
def test_bad_input_is_named(data, ce_model, call, error, message):
    with pytest.raises(error, match=message):
        call(ce_model, data)


def test_out_of_range_labels_and_bad_matrices_are_named(ce_model):
    bad = FeatureDataset(torch.zeros(3, DIM), torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError, match=r"`train` labels must lie in \[0, 4\) .* \[0, 7\]"):
        classifier_retraining(ce_model, bad)
    with pytest.raises(ValueError, match=r"`confusion` has no samples of class\(es\) \[1\]"):
        objective_score("mean_recall", torch.tensor([[3, 1], [0, 0]]))
    with pytest.raises(ValueError, match="`confusion` must be a square K x K matrix"):
        objective_score("mean_recall", torch.ones(2, 3))
    with pytest.raises(ValueError, match="`scores` must hold at least one score"):
        best_index([])


def test_baseline_config_runs_the_same_as_the_function_options(data, ce_model):
    from selmix.baselines import BaselineConfig, baseline

    train, val = data["train"], data["val"]
    result = baseline("crt", ce_model, train, val, epochs=2, seed=1)
    assert isinstance(result.config, BaselineConfig) and result.config.epochs == 2
    assert result.config.head_classes == selmix.core.metrics.infer_head_classes(train.labels, K)
    direct = classifier_retraining(ce_model, train, val, epochs=2, seed=1)
    for key, value in direct.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value), key
    # la_tau is the function's tau; fields another baseline uses are left out
    options = BaselineConfig(la_tau=0.5, epochs=3).options("la_finetune")
    assert options["tau"] == 0.5 and "epochs" not in options and "la_tau" not in options
    assert BaselineConfig().options("posthoc_la") == {
        "taus": None,
        "batch_size": 512,
        "device": "cpu",
        "precision": BaselineConfig().precision,
    }
    with pytest.raises(ValueError, match="taus"):
        BaselineConfig(taus=[1.0, -1.0])
