"""Precision, threads, the shared SGD schedule and resumable pre-training."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import selmix.engine.precision as precision_module
from selmix.data import ImageTensorDataset
from selmix.engine.optim import WarmupCosine, sgd_cosine
from selmix.engine.precision import (
    autocast,
    configure_threads,
    default_threads,
    evaluation_mode,
    grad_scaler,
    resolve_precision,
    to_channels_last,
)
from selmix.engine.pretrain import PretrainConfig, pretrain
from selmix.models import create_model
from selmix.models.checkpoint import load_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_set(n: int = 96, num_classes: int = 3, seed: int = 0) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % num_classes
    # a learnable signal: the class sets the brightness of the top-left corner
    images[:, :, :4, :4] = (labels * 100).to(torch.uint8)[:, None, None, None]
    return ImageTensorDataset(images, labels, num_classes=num_classes, padding=1)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", 3, in_channels=1)


SETTINGS = {"epochs": 3, "batch_size": 32, "lr": 0.05, "mixup_alpha": 1.0,
            "warmup_epochs": 1, "progress": False}  # fmt: skip


# -- resolve_precision ------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False])
def test_auto_without_a_model_ignores_the_cpu_flags(monkeypatch, fast):
    # flags do not predict the speed (selmix.engine.hardware measures it); unmeasured: fp32
    monkeypatch.setattr(precision_module, "cpu_has_fast_bf16", lambda: fast)
    assert resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", "cuda:0") == ("bf16" if supported else "fp32")


def test_auto_is_fp32_on_other_devices(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", "mps") == "fp32"


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    real_path = precision_module.Path

    def fake_path(name):
        return cpuinfo if str(name) == "/proc/cpuinfo" else real_path(name)

    monkeypatch.setattr(precision_module, "Path", fake_path)
    for flags, expected in [("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                            ("fpu avx2 avx512f", False)]:  # fmt: skip
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        precision_module.cpu_has_fast_bf16.cache_clear()
        assert precision_module.cpu_has_fast_bf16() is expected
    precision_module.cpu_has_fast_bf16.cache_clear()


@pytest.mark.parametrize("value", ["fp32", "bf16"])
def test_explicit_precisions_pass_through_on_cpu(value):
    assert resolve_precision(value, torch.device("cpu")) == value


@pytest.mark.parametrize("value", ["fp8", "float32", "", None, 16])
def test_bad_precision_is_a_one_line_error(value):
    with pytest.raises(ValueError, match="`precision` must be one of") as error:
        resolve_precision(value, "cpu")
    assert "\n" not in str(error.value)


def test_fp16_on_cpu_is_a_one_line_error():
    with pytest.raises(ValueError, match="`precision` 'fp16' needs a CUDA device") as error:
        resolve_precision("fp16", "cpu")
    assert "\n" not in str(error.value)


def test_bad_precision_in_the_config_is_one_line():
    with pytest.raises(ValueError, match="precision") as error:
        PretrainConfig(precision="half")
    assert "\n" not in str(error.value)


# -- autocast, scaler, evaluation, layout -----------------------------------------------
def test_autocast_sets_the_matmul_dtype():
    a = torch.randn(4, 4)
    with autocast("fp32", "cpu"):
        assert (a @ a).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        autocast("auto", "cpu")


def test_disabled_scaler_passes_the_loss_through():
    scaler = grad_scaler("bf16", "cpu")
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    loss = (weight * 3).sum()
    assert scaler.scale(loss) is loss
    loss.backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.full((2,), -0.5))


def test_evaluation_mode_is_inference_mode_with_autocast():
    layer = torch.nn.Linear(3, 2)
    with evaluation_mode("bf16", "cpu"):
        out = layer(torch.randn(5, 3))
    assert out.is_inference()
    assert out.dtype == torch.bfloat16


def test_channels_last_keeps_the_outputs():
    model = tiny_model().eval()
    images = torch.randn(4, 1, 12, 12)
    expected = model(images)
    to_channels_last(model)
    # the last convolution: with one input channel both layouts are the same strides
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)


def test_channels_last_leaves_models_without_convolutions():
    model = torch.nn.Linear(3, 2)
    assert to_channels_last(model) is model


# -- threads ----------------------------------------------------------------------------
def test_configure_threads_sets_an_explicit_count():
    assert configure_threads(1) == 1
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="`threads` must be an int >= 1"):
        configure_threads(0)


def test_default_threads_leaves_omp_num_threads_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert configure_threads(None) == 1


def test_default_threads_share_the_cores_between_local_processes(monkeypatch):
    monkeypatch.setattr(precision_module, "_physical_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert default_threads() == 8
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more processes than cores: still 1
    assert default_threads() == 1


# -- the shared schedule ------------------------------------------------------------------
def test_schedule_without_warmup_is_bit_identical_to_fine_tuning():
    steps = 37
    factor = WarmupCosine(steps)
    for step in range(steps + 5):
        expected = 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        assert factor(step) == expected


def test_schedule_with_warmup_ramps_then_decays_to_zero():
    factor = WarmupCosine(20, warmup_steps=4)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0
    assert factor(12) == pytest.approx(0.5)
    assert factor(20) == 0.0 and factor(25) == 0.0
    with pytest.raises(ValueError, match="`warmup_steps` must be <= `total_steps`"):
        WarmupCosine(3, warmup_steps=4)


def test_sgd_cosine_state_round_trips_through_weights_only_load(tmp_path):
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer, scheduler = sgd_cosine([weight], 0.1, total_steps=10, warmup_steps=2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    _, restored = sgd_cosine([torch.nn.Parameter(torch.ones(2))], 0.1, 10, 2)
    restored.load_state_dict(state)
    assert restored.get_last_lr() == scheduler.get_last_lr()


# -- pre-training in each precision ------------------------------------------------------
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
def test_pretrain_runs_in_each_precision(precision):
    device = "cuda" if precision == "fp16" else "cpu"
    model = tiny_model()
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    data = tiny_set()
    result = pretrain(model, data, data, precision=precision, device=device, **SETTINGS)
    # "auto" is measured and recorded as what it resolved to
    assert result.config.precision in ("fp32", "bf16", "fp16")
    assert precision == "auto" or result.config.precision == precision
    assert result.hardware["precision"] == result.config.precision
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    expected = dtypes[result.config.precision]
    # training and validation forward passes ran in the precision; weights stay float32
    assert set(seen) == {expected}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = [record["loss"] for record in result.history]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]


def test_pretrain_channels_last_runs_and_saves_a_loadable_model(tmp_path):
    data = tiny_set()
    path = tmp_path / "model.pt"
    model = tiny_model()
    pretrain(model, data, None, precision="bf16", channels_last=True,
             checkpoint_path=str(path), **SETTINGS)  # fmt: skip
    loaded, meta = load_model(path)
    assert meta["epoch"] == SETTINGS["epochs"]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])


class _Stop(Exception):
    pass


def _interrupted_then_resumed(tmp_path, precision: str, stop_after: int, **changes):
    data = tiny_set()
    path = tmp_path / "run.pt"

    def stop(record):
        if record["epoch"] == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        pretrain(tiny_model(), data, data, precision=precision, checkpoint_path=str(path),
                 callback=stop, **SETTINGS)  # fmt: skip
    fresh = create_model("small_cnn", 3, in_channels=1)  # other initial weights: overwritten
    return pretrain(fresh, data, data, precision=precision, resume=path,
                    checkpoint_path=str(path), **{**SETTINGS, **changes})  # fmt: skip


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_resumed_pretraining_is_bit_identical(tmp_path, precision):
    data = tiny_set()
    uninterrupted = pretrain(tiny_model(), data, data, precision=precision, **SETTINGS)
    # the callback of epoch 2 raises before that epoch's checkpoint: resume from epoch 1
    resumed = _interrupted_then_resumed(tmp_path, precision, stop_after=2)
    state = uninterrupted.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert resumed.history == uninterrupted.history


def test_resume_with_other_settings_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.05 -> 0.1\)"):
        _interrupted_then_resumed(tmp_path, "bf16", stop_after=2, lr=0.1)


def test_resume_may_change_the_thread_count_and_progress(tmp_path):
    result = _interrupted_then_resumed(tmp_path, "fp32", stop_after=3, threads=1)
    assert [record["epoch"] for record in result.history] == [1, 2, 3]


def test_resume_from_a_plain_model_file_is_refused(tmp_path):
    from selmix.models.checkpoint import save_model

    path = save_model(tmp_path / "m.pt", tiny_model())
    with pytest.raises(ValueError, match="not a selmix pre-training checkpoint"):
        pretrain(tiny_model(), tiny_set(), None, resume=path, **SETTINGS)


# -- FixMatch ---------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fixmatch_runs_in_the_precision_and_is_reproducible(precision):
    from selmix.data import UnlabelledDataset
    from selmix.engine.semisup import fixmatch_pretrain

    labelled = tiny_set(24)
    generator = torch.Generator().manual_seed(3)
    pool = UnlabelledDataset(
        torch.randint(0, 256, (20, 1, 12, 12), dtype=torch.uint8, generator=generator),
        0.5, 0.25, 3,
    )  # fmt: skip

    def run() -> tuple[torch.nn.Module, list[torch.dtype]]:
        model = tiny_model()
        seen: list[torch.dtype] = []
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        fixmatch_pretrain(model, labelled, pool, labelled, steps=3, batch_size=4, mu=2,
                          eval_every=3, precision=precision, progress=False)  # fmt: skip
        return model, seen

    first, seen = run()
    second, _ = run()
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert set(seen) == {expected}
    assert all(p.dtype == torch.float32 for p in first.parameters())
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_fixmatch_rejects_fp16_on_cpu():
    from selmix.data import UnlabelledDataset
    from selmix.engine.semisup import fixmatch_pretrain

    pool = UnlabelledDataset(torch.zeros(4, 1, 12, 12, dtype=torch.uint8), 0.5, 0.25, 3)
    with pytest.raises(ValueError, match="`precision` 'fp16' needs a CUDA device"):
        fixmatch_pretrain(tiny_model(), tiny_set(), pool, precision="fp16", progress=False)


def test_channels_last_training_gradients_match_a_float64_pass():
    # The layout issue 23's CIFAR runs trained in: a ResNet-32 in training mode (batch-norm
    # batch statistics) must give the gradients of the contiguous float64 computation.
    torch.manual_seed(0)
    model = create_model("resnet32", 10, in_channels=3).train()
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def gradients(net: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), labels).backward()
        return torch.cat([p.grad.double().flatten() for p in net.parameters()])

    reference = gradients(copy.deepcopy(model).double(), images.double())
    fast = to_channels_last(copy.deepcopy(model))
    measured = gradients(fast, images.contiguous(memory_format=torch.channels_last))
    # measured: 1.5e-3 (contiguous float32: 4e-4); a wrong layout path is off by far more
    assert (measured - reference).norm() / reference.norm() < 1e-2
