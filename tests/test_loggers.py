"""Tests of selmix.engine.loggers: TensorBoard logging of the feedback records."""

from __future__ import annotations

import sys

import pytest
import torch

from selmix import finetune
from selmix.data.formats import FeatureTensorDataset
from selmix.engine.loggers import TensorBoardLogger, gain_image
from selmix.models import create_model

torch.set_num_threads(1)


def tiny_run(callback, steps: int = 20):
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 4)
    centres = torch.randn(3, 6, generator=generator) * 2
    features = centres[labels] + torch.randn(labels.numel(), 6, generator=generator)
    data = FeatureTensorDataset(features, labels, 3)
    torch.manual_seed(0)
    model = create_model("linear", 3, in_channels=6)
    return finetune(model, data, data, "min_recall", steps=steps, feedback_every=5,
                    batch_size=16, progress=False, callback=callback)  # fmt: skip


def read_events(log_dir):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    ).EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_logger_writes_every_feedback_record_and_the_gain_images(tmp_path):
    pytest.importorskip("tensorboard")
    with TensorBoardLogger(tmp_path / "tb") as logger:
        result = tiny_run(logger)  # the trainer passes each feedback step's gain along
    events = read_events(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    expected = {
        "objective", "max_gain", "policy_entropy", "val/min_recall", "val/mean_recall",
        "val/h_mean", "val/recall/2", "multipliers/0", "multipliers/2", "lr_head",
    }  # fmt: skip
    assert expected <= tags
    objective = events.Scalars("objective")
    assert [e.step for e in objective] == [r["step"] for r in result.history]
    assert [e.value for e in objective] == pytest.approx([r["objective"] for r in result.history])
    min_recall = [e.value for e in events.Scalars("val/min_recall")]
    assert min_recall == pytest.approx([r["metrics"]["min_recall"] for r in result.history])
    entropy = [e.value for e in events.Scalars("policy_entropy")]
    assert entropy == pytest.approx([r["policy_entropy"] for r in result.history])
    images = events.Images("gain")
    assert [e.step for e in images] == [step for step, _ in result.gains]
    assert (images[0].width, images[0].height) == (510, 510)  # 3 cells of 170 pixels


def test_a_record_with_a_gain_matrix_is_drawn_at_once(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path / "tb")
    logger({"step": 4, "objective": 0.5, "metrics": {}, "gain": torch.eye(4)})
    logger.close()
    events = read_events(tmp_path / "tb")
    assert [e.step for e in events.Images("gain")] == [4]
    assert [e.value for e in events.Scalars("objective")] == [0.5]


def test_gain_image_is_red_for_positive_blue_for_negative_white_at_zero():
    image = gain_image(torch.tensor([[2.0, -1.0], [0.0, -2.0]]))
    assert image.shape == (3, 512, 512)
    cell = image[:, ::256, ::256]  # one pixel per cell
    torch.testing.assert_close(cell[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # +max: red
    torch.testing.assert_close(cell[:, 0, 1], torch.tensor([0.5, 0.5, 1.0]))  # -max/2: light blue
    torch.testing.assert_close(cell[:, 1, 0], torch.tensor([1.0, 1.0, 1.0]))  # 0: white
    torch.testing.assert_close(cell[:, 1, 1], torch.tensor([0.0, 0.0, 1.0]))  # -max: blue
    torch.testing.assert_close(gain_image(torch.zeros(2, 2)), torch.ones(3, 512, 512))
    with pytest.raises(ValueError, match="square"):
        gain_image(torch.zeros(2, 3))


def test_logger_without_tensorboard_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"selmix\[tensorboard\]"):
        TensorBoardLogger(tmp_path)


def test_log_gains_draws_a_finished_runs_gain_matrices(tmp_path):
    pytest.importorskip("tensorboard")
    result = tiny_run(None)
    with TensorBoardLogger(tmp_path / "tb") as logger:
        logger.log_gains(result.gains)
    images = read_events(tmp_path / "tb").Images("gain")
    assert [e.step for e in images] == [step for step, _ in result.gains] == [0, 5, 10, 15, 20]
