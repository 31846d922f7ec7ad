"""Fine-tuning and baselines in each precision, threads, layout, devices, the closed-form
frozen head step and the shared feedback computation."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selmix.engine.evaluate import resolve_device
from selmix.engine.feedback import SelMixFeedback, feedback_step
from selmix.engine.optim import split_sgd_cosine
from selmix.finetune import FinetuneConfig, Trainer, finetune
from selmix.finetune.head_step import _LinearHeadStep
from selmix.models import create_model, split_model
from selmix.models.checkpoint import load_checkpoint
from test_precision import _one_thread, tiny_set  # noqa: F401 - _one_thread is an autouse fixture


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", 3, in_channels=1)


SETTINGS = {"steps": 8, "feedback_every": 3, "batch_size": 16, "lr_head": 0.05,
            "progress": False, "objective": "min_recall", "select": "last"}  # fmt: skip


def _conv_dtypes(model: nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    return seen


# -- precision in the loop --------------------------------------------------------------
@pytest.mark.parametrize(
    "precision",
    [
        "fp32",
        "bf16",
        "auto",
        pytest.param(
            "fp16",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="fp16 autocast with gradient scaling runs on CUDA only; no CUDA here",
            ),
        ),
    ],
)
@pytest.mark.parametrize("frozen", [False, True])
def test_finetune_runs_in_each_precision(precision, frozen):
    device = "cuda" if precision == "fp16" else "cpu"
    data = tiny_set()
    model = tiny_model()
    seen = _conv_dtypes(model)
    result = finetune(model, data, data, frozen_backbone=frozen, precision=precision,
                      head_init="none", device=device, **SETTINGS)  # fmt: skip
    resolved = result.config.precision  # "auto" is measured
    assert resolved in ("fp32", "bf16", "fp16") and precision in ("auto", resolved)
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolved]
    # every backbone pass (training, validation, feature extraction) ran in the precision
    assert set(seen) == {expected}
    assert result.config.precision == resolved  # "auto" is recorded as what it resolved to
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the exact parts stay exact
    assert result.objective.multipliers.dtype in (torch.float32, torch.float64)
    assert all(gain.dtype == torch.float32 for _, gain in result.gains)
    losses = [r["train_loss"] for r in result.history if r["train_loss"] is not None]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_frozen_feature_cache_is_float32_in_bf16():
    data = tiny_set()
    trainer = Trainer(
        tiny_model(),
        data,
        data,
        None,
        FinetuneConfig(frozen_backbone=True, precision="bf16", progress=False),
    )
    cached = trainer.view.features(data)
    assert cached.dtype == torch.float32 and not cached.is_inference()


def test_full_backbone_logits_are_bf16_and_the_loss_float32(monkeypatch):
    data = tiny_set()
    trainer = Trainer(
        tiny_model(),
        data,
        data,
        None,
        FinetuneConfig(
            precision="bf16",
            progress=False,
            batch_size=8,
            frozen_backbone=False,
            head_first_steps=0,
        ),
    )
    seen = {}
    original = F.cross_entropy

    def spy(logits, labels, *args, **kwargs):
        seen["dtype"] = logits.dtype
        return original(logits, labels, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    trainer.train_step()
    assert seen["dtype"] == torch.float32  # logits.float() outside autocast
    first, second, from_second, _ = trainer.sampler.sample(trainer.distribution, 4)
    logits = trainer.view.mixed_logits(first, second, from_second, torch.ones(4, 1),
                                       trainer.generator)  # fmt: skip
    assert logits.dtype == torch.bfloat16


def test_bad_precision_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^unknown `precision` .half.; expected one of") as error:
        FinetuneConfig(precision="half")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(tiny_model(), tiny_set(), tiny_set(), None,
                FinetuneConfig(precision="fp16", device="cpu"))  # fmt: skip


@pytest.mark.parametrize("frozen", [False, True])
def test_resume_is_bit_exact_in_bf16(tmp_path, frozen):
    data = tiny_set()
    settings = {**SETTINGS, "steps": 9, "precision": "bf16", "frozen_backbone": frozen,
                "checkpoint_every": 4,
                "backbone_feedback_every": SETTINGS["feedback_every"]}  # fmt: skip
    reference = tiny_model()
    uninterrupted = finetune(reference, data, data, checkpoint_path=str(tmp_path / "a.pt"),
                             **settings)  # fmt: skip

    class Stop(Exception):
        pass

    def stop(record):
        if record["step"] > 4:  # the first feedback after the checkpoint at step 4
            raise Stop

    with pytest.raises(Stop):
        finetune(tiny_model(), data, data, checkpoint_path=str(tmp_path / "b.pt"),
                 callback=stop, **settings)  # fmt: skip
    state = load_checkpoint(tmp_path / "b.pt")
    assert state["step"] == 4 and state["config"]["precision"] == "bf16"
    assert "scaler" in state
    resumed_model = create_model("small_cnn", 3, in_channels=1)  # overwritten by the resume
    resumed = finetune(resumed_model, data, data, resume=tmp_path / "b.pt",
                       checkpoint_path=str(tmp_path / "b.pt"), **settings)  # fmt: skip
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    strip = [{k: v for k, v in r.items() if k != "feedback_seconds"} for r in resumed.history]
    assert strip == [
        {k: v for k, v in r.items() if k != "feedback_seconds"} for r in uninterrupted.history
    ]
    # a resume in another precision is refused, naming it
    with pytest.raises(ValueError, match=r"precision: 'bf16' -> 'fp32'"):
        finetune(tiny_model(), data, data, resume=tmp_path / "b.pt",
                 **{**settings, "precision": "fp32"})  # fmt: skip


def test_threads_and_channels_last_settings():
    data = tiny_set()
    model = tiny_model()
    finetune(model, data, data, threads=1, channels_last=True, **SETTINGS)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="`threads` must be >= 1, got 0"):
        FinetuneConfig(threads=0)
    with pytest.raises(TypeError, match="`channels_last` must be"):
        FinetuneConfig(channels_last="yes")


# -- devices ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["gpu", "cuda:x", "tpu", "cpu:3", ""])
def test_bad_device_is_a_one_line_error(value):
    with pytest.raises(ValueError, match=r"^`device` must be 'cpu', 'cuda', 'cuda:N', 'mps'"):
        resolve_device(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:1"])
def test_unavailable_cuda_is_a_one_line_error(value):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(value)


def test_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_mps_is_accepted_when_present_and_refused_otherwise(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="MPS .* is not available"):
        resolve_device("mps")


# -- the closed-form frozen head step ---------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 6, 3), (128, 64, 10), (128, 128, 10), (7, 5, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_head_step_is_bit_identical_to_autograd(shape, bias):
    batch, dim, classes = shape
    torch.manual_seed(batch + dim)
    head = nn.Linear(dim, classes, bias=bias)
    features = torch.randn(batch, dim)
    labels = torch.randint(0, classes, (batch,))
    loss = F.cross_entropy(head(features), labels)
    loss.backward()
    expected = [p.grad.clone() for p in head.parameters()]
    for p in head.parameters():
        p.grad = None
    value = _LinearHeadStep(head).loss_and_gradients(features, labels)
    assert value == float(loss.detach())
    for got, want in zip((p.grad for p in head.parameters()), expected, strict=True):
        assert torch.equal(got, want)


def test_frozen_run_is_the_same_with_and_without_the_closed_form(monkeypatch):
    data = tiny_set()
    settings = {**SETTINGS, "frozen_backbone": True, "steps": 15}
    fast = tiny_model()
    finetune(fast, data, data, **settings)
    # the autograd path: the Trainer takes it when the head is not a plain nn.Linear
    engine = sys.modules["selmix.finetune.trainer"]  # the module of the Trainer
    monkeypatch.setattr(engine, "_closed_form_head_step", lambda view, collective: None)
    slow = tiny_model()
    finetune(slow, data, data, **settings)
    for key, value in fast.state_dict().items():
        assert torch.equal(value, slow.state_dict()[key]), key


def test_closed_form_is_used_only_for_a_plain_linear_head():
    data = tiny_set()
    frozen = Trainer(tiny_model(), data, data, None, FinetuneConfig(frozen_backbone=True))
    assert isinstance(frozen._head_step, _LinearHeadStep)
    full = Trainer(tiny_model(), data, data, None,
                   FinetuneConfig(frozen_backbone=False, head_first_steps=0))  # fmt: skip
    assert full._head_step is None
    # head-first: the closed form while the head trains alone, autograd once the backbone does
    phased_config = FinetuneConfig(frozen_backbone=False, head_first_steps=5, steps=10)
    phased = Trainer(tiny_model(), data, data, None, phased_config)
    assert isinstance(phased._head_step, _LinearHeadStep)
    phased._start_phase(head_phase=False)
    assert phased._head_step is None
    hooked = tiny_model()
    hooked.head.register_forward_hook(lambda module, inputs, output: output * 2)
    trainer = Trainer(hooked, data, data, None, FinetuneConfig(frozen_backbone=True))
    assert trainer._head_step is None


# -- one feedback computation, two callers -----------------------------------------------
def test_trainer_and_selmix_feedback_share_feedback_step(monkeypatch):
    data = tiny_set()
    calls = []
    feedback_module = sys.modules["selmix.engine.feedback"]
    finetune_module = sys.modules["selmix.finetune.trainer"]

    def spy(*args, **kwargs):
        calls.append(args[3])
        return feedback_step(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "feedback_step", spy)
    monkeypatch.setattr(feedback_module, "feedback_step", spy)
    config = FinetuneConfig(confusion_smoothing=1.0, head_init="none")
    trainer = Trainer(tiny_model(), data, data, None, config)
    trainer.feedback()
    helper = SelMixFeedback("min_recall", data.labels, confusion_smoothing=1.0)
    helper.update(tiny_model(), data)
    assert [type(c).__name__ for c in calls] == ["FinetuneConfig", "SelMixFeedback"]
    torch.testing.assert_close(trainer.distribution, helper.distribution)


def test_split_sgd_cosine_matches_the_historic_optimiser():
    model = tiny_model()
    split = split_model(model)
    optimizer, scheduler = split_sgd_cosine(split, 10, 0.1, 0.01, 0.9, 5e-4)
    assert [g["name"] for g in optimizer.param_groups] == ["head", "backbone"]
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # the schedule fine-tuning always used, float for float
    assert lrs == [0.1 * 0.5 * (1 + math.cos(math.pi * min(s, 10) / 10)) for s in range(11)]


def test_a_checkpoint_without_precision_resumes_as_fp32():
    from selmix.finetune import check_resume

    data = tiny_set()
    trainer = Trainer(tiny_model(), data, data, None, FinetuneConfig(progress=False))
    state = trainer.state_dict()
    del state["config"]["precision"]  # as written by selmix before the setting existed
    check_resume(state, trainer.config, data=trainer.data)
    bf16 = trainer.config.replace(precision="bf16")
    with pytest.raises(ValueError, match=r"precision: 'fp32' -> 'bf16'"):
        check_resume(state, bf16, data=trainer.data)
