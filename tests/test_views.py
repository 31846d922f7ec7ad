"""The frozen-features view's evaluation against the library's plain evaluation."""

from __future__ import annotations

import torch
from torch import nn

from selmix.data import ImageTensorDataset
from selmix.engine.evaluate import evaluate
from selmix.engine.views import FrozenFeatures
from selmix.models import split_model


def _model_and_data(num_classes: int = 4) -> tuple[nn.Module, ImageTensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, num_classes)
    )
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(40) % num_classes
    return model.eval(), ImageTensorDataset(images, labels)


def test_frozen_evaluation_matches_the_plain_one_and_leaves_soft_counts_out_on_request():
    model, data = _model_and_data()
    split = split_model(model)
    view = FrozenFeatures(split, torch.device("cpu"))
    reference = evaluate(model, data)
    full = view.evaluate(data)
    assert torch.equal(full.counts, reference.counts)
    assert torch.allclose(full.prototypes, reference.prototypes, atol=1e-6)
    assert torch.allclose(full.soft_counts, reference.soft_counts, atol=1e-6)
    lean = view.evaluate(data, soft=False)
    assert lean.soft_counts is None
    assert torch.equal(lean.counts, full.counts)
    assert torch.equal(lean.prototypes, full.prototypes)


def test_cached_class_sums_follow_the_head_not_a_stale_copy():
    model, data = _model_and_data()
    split = split_model(model)
    view = FrozenFeatures(split, torch.device("cpu"))
    before = view.evaluate(data, soft=False)
    with torch.no_grad():
        split.head.bias += torch.tensor([10.0, 0.0, 0.0, 0.0])  # everything becomes class 0
    after = view.evaluate(data, soft=False)
    assert torch.equal(after.prototypes, before.prototypes)  # the features did not change
    assert int(after.counts[:, 0].sum()) == len(data)
    assert torch.equal(after.counts, evaluate(model, data).counts)
