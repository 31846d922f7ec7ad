"""The step learning-rate schedule of pre-training (``lr_schedule="step"``)."""

from __future__ import annotations

import pytest
import torch

# _one_thread is test_precision's autouse fixture (one torch thread); importing it applies it here
from tests.test_precision import SETTINGS, _one_thread, tiny_model, tiny_set  # noqa: F401

from selmix.engine.optim import WarmupStep, sgd_step
from selmix.engine.pretrain import PretrainConfig, pretrain, step_milestones


def test_step_factor_warms_up_then_cuts_at_each_milestone():
    factor = WarmupStep(warmup_steps=4, milestones=[10, 15], gamma=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [factor(s) for s in (4, 9)] == [1.0, 1.0]
    assert factor(10) == pytest.approx(0.1) and factor(14) == pytest.approx(0.1)
    assert factor(15) == pytest.approx(0.01) and factor(1000) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"milestones": [5, 5]}, "`milestones` must be increasing"),
        ({"warmup_steps": 6, "milestones": [5]}, "`milestones` must be >= `warmup_steps` = 6"),
        ({"gamma": 0.0}, "`gamma` must be > 0"),
        ({"gamma": 1.5}, r"`gamma` must be in \(0, 1\], got 1.5"),
    ],
)
def test_step_factor_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupStep(**kwargs)


def test_milestones_are_the_recipes_160_and_180_of_200():
    assert step_milestones(200, 5) == [160, 180]
    assert step_milestones(25) == [20, 22]
    # short runs keep the cuts apart and after the warm-up; cuts that do not fit drop out
    assert step_milestones(10, 8) == [9]
    assert step_milestones(2) == []


def test_sgd_step_lowers_the_learning_rate_per_step_as_the_factor_says():
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer, scheduler = sgd_step([weight], 0.2, milestones=[3, 5], warmup_steps=2)
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.2, 0.2, 0.02, 0.02, 0.002, 0.002])


def test_pretrain_follows_the_step_schedule_epoch_by_epoch():
    data = tiny_set()  # 96 images, batch 32: 3 steps per epoch
    seen: list[float] = []
    model = tiny_model()
    settings = {**SETTINGS, "epochs": 10, "warmup_epochs": 0, "lr": 0.1, "channels_last": False}
    original_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    torch.optim.SGD.step = recording_step
    try:
        pretrain(model, data, None, lr_schedule="step", **settings)
    finally:
        torch.optim.SGD.step = original_step
    per_epoch = [seen[3 * e] for e in range(10)]
    # step_milestones(10) = [8, 9]: epochs 1-8 at 0.1, epoch 9 at 0.01, epoch 10 at 0.001
    assert per_epoch == pytest.approx([0.1] * 8 + [0.01, 0.001])
    assert len(seen) == 30


class _Stop(Exception):
    pass


def _interrupted(path, **settings):
    def stop(record):
        if record["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        pretrain(tiny_model(), tiny_set(), None, checkpoint_path=str(path), callback=stop,
                 **settings)  # fmt: skip


def test_step_schedule_resumes_bit_identically(tmp_path):
    settings = {**SETTINGS, "epochs": 5, "lr_schedule": "step"}
    uninterrupted = pretrain(tiny_model(), tiny_set(), None, **settings)
    path = tmp_path / "run.pt"
    _interrupted(path, **settings)
    resumed = pretrain(tiny_model(), tiny_set(), None, resume=path, checkpoint_path=str(path),
                       **settings)  # fmt: skip
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, uninterrupted.model.state_dict()[name]), name


def test_a_cosine_checkpoint_does_not_resume_as_step(tmp_path):
    path = tmp_path / "run.pt"
    _interrupted(path, **SETTINGS)
    with pytest.raises(ValueError, match=r"other settings \(lr_schedule: 'cosine' -> 'step'\)"):
        pretrain(tiny_model(), tiny_set(), None, resume=path, lr_schedule="step", **SETTINGS)


def test_a_checkpoint_from_before_the_setting_resumes_as_cosine(tmp_path):
    from selmix.models.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "run.pt"
    _interrupted(path, **SETTINGS)
    old = load_checkpoint(path)
    del old["pretrain_state"]["config"]["lr_schedule"]  # written before lr_schedule existed
    save_checkpoint(path, old)
    result = pretrain(tiny_model(), tiny_set(), None, resume=path, **SETTINGS)
    assert [record["epoch"] for record in result.history] == [1, 2, 3]


def test_unknown_schedule_is_refused():
    with pytest.raises(
        ValueError, match="unknown `lr_schedule` .linear.; expected one of .cosine., .step."
    ):
        PretrainConfig(lr_schedule="linear")
