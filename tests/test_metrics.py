"""Metrics of the confusion matrix (MATH.md section 1) against scikit-learn and hand formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import selmix
from selmix.core import metrics

ALL_METRIC_KEYS = {
    "mean_recall",
    "min_recall",
    "g_mean",
    "h_mean",
    "min_head_tail_recall",
    "min_coverage",
    "min_head_tail_coverage",
    "accuracy",
    "per_class_recall",
    "per_class_coverage",
}


def random_predictions(num_classes: int, num_samples: int, seed: int):
    """Seeded imbalanced labels (every class present) and noisy predictions."""
    rng = np.random.default_rng(seed)
    prior = rng.dirichlet(np.ones(num_classes))
    labels = rng.choice(num_classes, size=num_samples, p=prior)
    labels[:num_classes] = np.arange(num_classes)  # every class has at least one sample
    correct = rng.random(num_samples) < rng.uniform(0.3, 0.9, size=num_classes)[labels]
    preds = np.where(correct, labels, rng.integers(0, num_classes, size=num_samples))
    preds[:num_classes] = np.arange(num_classes)  # and every recall is positive
    return labels, preds


def as_tensors(labels: np.ndarray, preds: np.ndarray):
    return torch.from_numpy(labels), torch.from_numpy(preds)


@pytest.mark.parametrize(
    ("num_classes", "num_samples", "seed"), [(2, 50, 0), (7, 400, 1), (10, 1000, 2), (100, 3000, 3)]
)
def test_confusion_matrix_matches_sklearn(num_classes, num_samples, seed):
    labels, preds = random_predictions(num_classes, num_samples, seed)
    expected = skm.confusion_matrix(labels, preds, labels=np.arange(num_classes))
    counts = metrics.confusion_matrix(*as_tensors(labels, preds), num_classes, normalize=False)
    assert counts.dtype == torch.int64
    np.testing.assert_array_equal(counts.numpy(), expected)

    normalised = metrics.confusion_matrix(*as_tensors(labels, preds), num_classes)
    assert normalised.dtype == torch.float64
    np.testing.assert_allclose(normalised.numpy(), expected / num_samples, rtol=0, atol=1e-15)
    assert float(normalised.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("num_classes", "num_samples", "seed"), [(2, 60, 4), (5, 300, 5), (10, 800, 6), (100, 3000, 7)]
)
def test_recall_accuracy_and_means_match_sklearn_and_hand_formulas(num_classes, num_samples, seed):
    labels, preds = random_predictions(num_classes, num_samples, seed)
    confusion = metrics.confusion_matrix(*as_tensors(labels, preds), num_classes)
    recall = skm.recall_score(labels, preds, average=None, labels=np.arange(num_classes))
    assert recall.min() > 0  # the G/H-mean formulas below need positive recalls

    np.testing.assert_allclose(metrics.per_class_recall(confusion).numpy(), recall, atol=1e-12)
    assert float(metrics.mean_recall(confusion)) == pytest.approx(
        skm.balanced_accuracy_score(labels, preds), abs=1e-12
    )
    assert float(metrics.accuracy(confusion)) == pytest.approx(
        skm.accuracy_score(labels, preds), abs=1e-12
    )
    assert float(metrics.min_recall(confusion)) == pytest.approx(recall.min(), abs=1e-12)
    assert float(metrics.g_mean(confusion)) == pytest.approx(
        np.exp(np.mean(np.log(recall))), abs=1e-12
    )
    assert float(metrics.h_mean(confusion)) == pytest.approx(
        num_classes / np.sum(1.0 / recall), abs=1e-12
    )


def test_g_mean_and_h_mean_are_zero_when_a_class_is_never_recalled():
    confusion = torch.tensor([[5.0, 1.0, 0.0], [0.0, 4.0, 2.0], [3.0, 0.0, 0.0]])
    assert float(metrics.g_mean(confusion)) == 0.0
    assert float(metrics.h_mean(confusion)) == 0.0
    assert float(metrics.min_recall(confusion)) == 0.0
    assert float(metrics.mean_recall(confusion)) == pytest.approx((5 / 6 + 4 / 6 + 0) / 3)


def test_coverage_is_the_prediction_frequency():
    labels, preds = random_predictions(8, 500, 11)
    confusion = metrics.confusion_matrix(*as_tensors(labels, preds), 8)
    expected = np.bincount(preds, minlength=8) / preds.size
    np.testing.assert_allclose(metrics.per_class_coverage(confusion).numpy(), expected, atol=1e-12)
    assert float(metrics.min_coverage(confusion)) == pytest.approx(expected.min(), abs=1e-12)


def test_coverage_allows_a_class_with_no_samples():
    # coverage is defined without any sample of a class (only recall needs one)
    confusion = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    np.testing.assert_allclose(
        metrics.per_class_coverage(confusion).numpy(), np.array([4.0, 2.0, 4.0]) / 10
    )


def hand_head_tail(values: np.ndarray, head: list[int]) -> float:
    is_head = np.zeros(values.size, dtype=bool)
    is_head[head] = True
    return float(min(values[is_head].mean(), values[~is_head].mean()))


@pytest.mark.parametrize("head_as_mask", [False, True])
def test_min_head_tail_with_explicit_head_classes(head_as_mask):
    num_classes = 6
    labels, preds = random_predictions(num_classes, 600, 12)
    confusion = metrics.confusion_matrix(*as_tensors(labels, preds), num_classes)
    recall = skm.recall_score(labels, preds, average=None)
    coverage = np.bincount(preds, minlength=num_classes) / preds.size
    head = [0, 2, 3]
    argument = [i in head for i in range(num_classes)] if head_as_mask else head
    if head_as_mask:
        argument = torch.tensor(argument)
    assert float(metrics.min_head_tail_recall(confusion, argument)) == pytest.approx(
        hand_head_tail(recall, head), abs=1e-12
    )
    assert float(metrics.min_head_tail_coverage(confusion, argument)) == pytest.approx(
        hand_head_tail(coverage, head), abs=1e-12
    )
    # the head/tail split matters: another split gives another value
    other = hand_head_tail(recall, [0, 1])
    assert other != pytest.approx(hand_head_tail(recall, head), abs=1e-6)


@pytest.mark.parametrize(
    ("num_classes", "num_head"), [(10, 9), (100, 90), (2, 1), (3, 2), (20, 18)]
)
def test_default_head_is_the_first_90_percent(num_classes, num_head):
    mask = metrics.head_mask(num_classes)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [True] * num_head + [False] * (num_classes - num_head)


@pytest.mark.parametrize(("num_classes", "num_head", "seed"), [(10, 9, 13), (100, 90, 14)])
def test_min_head_tail_default_head(num_classes, num_head, seed):
    labels, preds = random_predictions(num_classes, 30 * num_classes, seed)
    confusion = metrics.confusion_matrix(*as_tensors(labels, preds), num_classes)
    recall = skm.recall_score(labels, preds, average=None)
    coverage = np.bincount(preds, minlength=num_classes) / preds.size
    head = list(range(num_head))
    assert float(metrics.min_head_tail_recall(confusion)) == pytest.approx(
        hand_head_tail(recall, head), abs=1e-12
    )
    assert float(metrics.min_head_tail_coverage(confusion)) == pytest.approx(
        hand_head_tail(coverage, head), abs=1e-12
    )


def test_head_mask_rejects_bad_head_classes():
    with pytest.raises(ValueError, match="head_classes"):
        metrics.head_mask(4, [0, 4])
    with pytest.raises(ValueError, match="at least one head and one tail"):
        metrics.head_mask(4, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least one head and one tail"):
        metrics.head_mask(4, [])
    with pytest.raises(ValueError, match="length 4"):
        metrics.head_mask(4, torch.tensor([True, False, True]))


def test_all_metrics_keys_and_values():
    num_classes = 9
    labels, preds = random_predictions(num_classes, 700, 15)
    confusion = metrics.confusion_matrix(*as_tensors(labels, preds), num_classes)
    result = metrics.all_metrics(confusion)
    assert set(result) == ALL_METRIC_KEYS
    for key, value in result.items():
        if key.startswith("per_class"):
            assert isinstance(value, list) and len(value) == num_classes
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in value)
        else:
            assert isinstance(value, float) and 0.0 <= value <= 1.0, key
    recall = skm.recall_score(labels, preds, average=None)
    coverage = np.bincount(preds, minlength=num_classes) / preds.size
    np.testing.assert_allclose(result["per_class_recall"], recall, atol=1e-12)
    np.testing.assert_allclose(result["per_class_coverage"], coverage, atol=1e-12)
    assert result["mean_recall"] == pytest.approx(recall.mean(), abs=1e-12)
    assert result["min_recall"] == pytest.approx(recall.min(), abs=1e-12)
    assert result["g_mean"] == pytest.approx(np.exp(np.log(recall).mean()), abs=1e-12)
    assert result["h_mean"] == pytest.approx(num_classes / np.sum(1 / recall), abs=1e-12)
    assert result["min_coverage"] == pytest.approx(coverage.min(), abs=1e-12)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)
    head = list(range(8))
    assert result["min_head_tail_recall"] == pytest.approx(hand_head_tail(recall, head))
    assert result["min_head_tail_coverage"] == pytest.approx(hand_head_tail(coverage, head))

    explicit = metrics.all_metrics(confusion, head_classes=[3, 4])
    assert explicit["min_head_tail_recall"] == pytest.approx(hand_head_tail(recall, [3, 4]))
    assert explicit["min_head_tail_coverage"] == pytest.approx(hand_head_tail(coverage, [3, 4]))


def test_counts_and_normalised_matrix_give_identical_metrics():
    num_classes = 6
    labels, preds = random_predictions(num_classes, 500, 16)
    counts = metrics.confusion_matrix(*as_tensors(labels, preds), num_classes, normalize=False)
    normalised = metrics.confusion_matrix(*as_tensors(labels, preds), num_classes)
    from_counts = metrics.all_metrics(counts)
    from_fractions = metrics.all_metrics(normalised)
    from_scaled = metrics.all_metrics(counts.double() * 3.7)
    for key in ALL_METRIC_KEYS:
        np.testing.assert_allclose(from_counts[key], from_fractions[key], rtol=1e-12, err_msg=key)
        np.testing.assert_allclose(from_scaled[key], from_fractions[key], rtol=1e-12, err_msg=key)


def test_metric_tracker_over_batches_equals_one_shot():
    num_classes = 5
    labels, preds = random_predictions(num_classes, 403, 17)
    tracker = selmix.core.MetricTracker(num_classes, head_classes=[0, 1])
    for start in range(0, labels.size, 64):
        stop = start + 64
        tracker.update(torch.from_numpy(preds[start:stop]), torch.from_numpy(labels[start:stop]))
    expected_counts = skm.confusion_matrix(labels, preds, labels=np.arange(num_classes))
    np.testing.assert_array_equal(tracker.counts.numpy(), expected_counts)
    np.testing.assert_allclose(tracker.confusion.numpy(), expected_counts / labels.size)
    one_shot = metrics.all_metrics(
        metrics.confusion_matrix(*as_tensors(labels, preds), num_classes), head_classes=[0, 1]
    )
    tracked = tracker.compute()
    assert set(tracked) == ALL_METRIC_KEYS
    for key in ALL_METRIC_KEYS:
        np.testing.assert_allclose(tracked[key], one_shot[key], rtol=1e-12, err_msg=key)
    tracker.reset()
    assert int(tracker.counts.sum()) == 0
    with pytest.raises(ValueError, match="positive total"):
        tracker.compute()


# -- bad input ---------------------------------------------------------------------------------
def test_rejects_non_square_confusion():
    with pytest.raises(ValueError, match=r"`confusion` must be a square K x K matrix.*\(2, 3\)"):
        metrics.per_class_recall(torch.ones(2, 3))
    with pytest.raises(ValueError, match="square"):
        metrics.all_metrics(torch.ones(4))


def test_rejects_negative_confusion():
    confusion = torch.tensor([[3.0, -1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"`confusion` must be non-negative.*-1"):
        metrics.mean_recall(confusion)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.per_class_coverage(confusion)


def test_rejects_nan_confusion():
    confusion = torch.tensor([[3.0, float("nan")], [1.0, 2.0]])
    with pytest.raises(ValueError, match="`confusion` must be finite"):
        metrics.all_metrics(confusion)
    with pytest.raises(ValueError, match="finite"):
        metrics.accuracy(torch.tensor([[float("inf"), 0.0], [1.0, 2.0]]))


def test_rejects_labels_outside_range():
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\), got values in \[0, 3\]"):
        metrics.confusion_matrix(torch.tensor([0, 3, 1]), torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        metrics.confusion_matrix(torch.tensor([0, -1, 1]), torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"`preds` must lie in \[0, 3\)"):
        metrics.confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 5, 2]), 3)
    with pytest.raises(ValueError, match="one length"):
        metrics.confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 3)
    with pytest.raises(TypeError, match="integers"):
        metrics.confusion_matrix(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3)


@pytest.mark.parametrize("missing", [0, 2])
def test_rejects_class_without_samples_naming_it(missing):
    confusion = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 5.0]])
    confusion[missing] = 0
    for function in (
        metrics.per_class_recall,
        metrics.mean_recall,
        metrics.all_metrics,
        metrics.min_head_tail_recall,
        metrics.h_mean,
    ):
        with pytest.raises(ValueError, match=rf"no samples of class\(es\) \[{missing}\]"):
            function(confusion)


def test_rejects_fewer_than_two_classes():
    with pytest.raises(ValueError, match=r"`num_classes` must be >= 2, got 1"):
        metrics.confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 0]), 1)
    with pytest.raises(ValueError, match="num_classes"):
        selmix.core.MetricTracker(1)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.head_mask(1)
    with pytest.raises(ValueError, match="K >= 2"):
        metrics.mean_recall(torch.ones(1, 1))
