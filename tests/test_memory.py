"""Evaluation batches sized from the activations and the memory; early one-line failures."""

import pytest
import torch
from torch import nn

from selmix.engine import memory
from selmix.engine.evaluate import evaluate
from selmix.engine.memory import (
    MAX_EVAL_BATCH,
    ActivationProfile,
    activation_profile,
    available_memory,
    eval_batch_size,
    resolve_eval_batch_size,
)
from selmix.finetune import finetune
from selmix.models import create_model
from test_precision import _one_thread, tiny_set  # noqa: F401 - _one_thread is an autouse fixture


def test_profile_counts_the_leaf_outputs_per_sample():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    profile = activation_profile(model, (1, 6, 6))
    conv = 4 * 6 * 6 * 4  # 4 channels of 6 x 6 float32
    assert profile.input_bytes == 36 * 4
    assert profile.largest_bytes == conv
    assert profile.total_bytes == conv + conv + conv + 3 * 4  # conv, relu, flatten, linear
    # bf16 autocast halves the convolution's output
    assert activation_profile(model, (1, 6, 6), precision="bf16").largest_bytes <= conv
    assert model.training  # the mode is restored


def test_eval_batch_size_fits_the_budget():
    profile = ActivationProfile(input_bytes=1000, largest_bytes=3000, total_bytes=9000,
                                input_shape=(3, 16, 16))  # fmt: skip
    assert profile.eval_bytes == 10_000
    # 1 MB budget: 100 samples, down to a multiple of 8
    assert eval_batch_size(profile, None, budget=1_000_000) == 96
    # half of the available memory when that is less than the budget
    assert eval_batch_size(profile, 100_000, budget=1_000_000) == 5
    assert eval_batch_size(profile, 10, budget=1_000_000) == 1
    assert eval_batch_size(profile, None, budget=1 << 40) == MAX_EVAL_BATCH


def test_large_inputs_get_a_small_batch():
    torch.manual_seed(0)
    features = create_model("small_cnn", 10, in_channels=3).features
    small = resolve_eval_batch_size(features, (3, 32, 32), "cpu")
    large = resolve_eval_batch_size(features, (3, 256, 256), "cpu")
    assert small == MAX_EVAL_BATCH and 1 <= large < 100
    profile = activation_profile(features, (3, 256, 256))
    assert large * profile.eval_bytes <= memory.EVAL_MEMORY_BUDGET


def test_available_memory_is_positive_on_the_cpu():
    free = available_memory("cpu")
    assert free is None or free > 0


def test_given_batches_that_cannot_fit_fail_early_naming_the_setting(monkeypatch):
    data = tiny_set()
    monkeypatch.setattr(memory, "available_memory", lambda device: 200_000)
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, in_channels=1)
    with pytest.raises(
        MemoryError, match=r"^`eval_batch_size` = 4096 needs about .* lower `eval_batch_size`$"
    ):
        finetune(model, data, data, "min_recall", steps=2, eval_batch_size=4096, progress=False)
    with pytest.raises(
        MemoryError, match=r"`batch_size` = 4096 .*1x12x12 inputs.*lower `batch_size`$"
    ):
        finetune(
            model, data, data, "min_recall", steps=2, frozen_backbone=False, head_first_steps=0,
            batch_size=4096, eval_batch_size=2, progress=False,
        )  # fmt: skip
    # unset, the batch is sized to the memory instead
    result = finetune(model, data, data, "min_recall", steps=2, progress=False)
    assert 1 <= result.config.eval_batch_size < MAX_EVAL_BATCH


def test_unset_batch_gives_the_same_evaluation():
    data = tiny_set()
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, in_channels=1)
    auto = evaluate(model, data, "cpu")
    fixed = evaluate(model, data, "cpu", batch_size=7)
    assert torch.equal(auto.counts, fixed.counts)
    torch.testing.assert_close(auto.prototypes, fixed.prototypes)
