"""Feedback timing: the whole-model phase's feedback interval and the per-phase timings."""

import pytest
import torch

from selmix.engine.timing import FEEDBACK_SHARE, PhaseTimings, backbone_feedback_every
from selmix.finetune import FinetuneConfig, check_resume, finetune
from selmix.models import create_model
from test_precision import _one_thread, tiny_set  # noqa: F401 - _one_thread is an autouse fixture


def test_backbone_feedback_every_keeps_the_estimated_share_under_the_target():
    # Fashion-MNIST-LT: 5000 validation images, B = 128
    every = backbone_feedback_every(10, 5000, 128)
    assert every % 10 == 0
    share = lambda k: 5000 / (5000 + 3 * k * 128)  # noqa: E731
    assert share(every) <= FEEDBACK_SHARE < share(every - 10)
    # a small validation set keeps the head phase's interval
    assert backbone_feedback_every(10, 100, 128) == 10
    assert backbone_feedback_every(3, 0, 16) == 3
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1, got 0"):
        backbone_feedback_every(10, 100, 0)


def test_phase_timings_add_up_and_give_the_share():
    timings = PhaseTimings()
    timings.record("head", "train", 3.0)
    timings.record("head", "feedback", 1.0)
    timings.record("backbone", "train", 6.0)
    timings.record("backbone", "train", 2.0)
    timings.record("backbone", "feedback", 2.0)
    table = timings.to_dict()
    assert table["head"]["feedback_share"] == pytest.approx(0.25)
    assert table["backbone"] == {"steps": 2, "train_seconds": 8.0, "feedbacks": 1,
                                 "feedback_seconds": 2.0, "feedback_share": 0.2}  # fmt: skip
    assert table["total"]["feedback_share"] == pytest.approx(3 / 14, abs=1e-4)
    with pytest.raises(ValueError, match="`kind`"):
        timings.record("head", "eval", 1.0)


def test_whole_model_phase_feeds_back_at_its_own_interval():
    data = tiny_set()
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, in_channels=1)
    result = finetune(
        model, data, data, "min_recall", steps=14, frozen_backbone=False, head_first_steps=4,
        feedback_every=2, backbone_feedback_every=5, batch_size=16, progress=False,
    )  # fmt: skip
    # head phase every 2 steps up to its end at 4, then every 5 from there, and the end
    assert [record["step"] for record in result.history] == [0, 2, 4, 9, 14]
    timings = result.timings
    assert set(timings) == {"head", "backbone", "total"}
    assert timings["head"]["steps"] == 4 and timings["backbone"]["steps"] == 10
    assert timings["head"]["feedbacks"] == 3 and timings["backbone"]["feedbacks"] == 2
    assert 0 < timings["backbone"]["feedback_share"] < 1


def test_unset_interval_follows_the_validation_size():
    data = tiny_set(n=96)
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, in_channels=1)
    result = finetune(
        model, data, data, "min_recall", steps=8, frozen_backbone=False, head_first_steps=2,
        feedback_every=1, batch_size=4, progress=False,
    )  # fmt: skip
    every = backbone_feedback_every(1, 96, 4)  # 96 images, B = 4: k = 14 > the 6 steps left
    assert every > 6
    assert [record["step"] for record in result.history] == [0, 1, 2, 8]
    assert set(result.timings) == {"head", "backbone", "total"}


def test_checkpoints_from_before_the_setting_resume_only_with_the_old_interval():
    config = FinetuneConfig(frozen_backbone=False)
    old = {"format": "selmix-finetune-v1", "config": {**config.to_dict()}}
    del old["config"]["backbone_feedback_every"]
    for key in ("step", "model", "optimizer", "scheduler", "objective", "distribution",
                "pseudo_labels", "history", "gains", "rng", "loss"):  # fmt: skip
        old[key] = None
    with pytest.raises(ValueError, match="backbone_feedback_every: 10 -> None"):
        check_resume(old, config)
    check_resume(old, config.replace(backbone_feedback_every=10))
