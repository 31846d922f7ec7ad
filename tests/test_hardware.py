"""Measured ``auto`` precision and layout: the decision rule, the cache, the machine line."""

import copy
import json

import pytest
import torch
from torch import nn

from selmix.engine import hardware
from selmix.engine.hardware import (
    CLEAR_SPEEDUP,
    cache_dir,
    candidates,
    choose,
    machine_description,
    model_key,
    resolve_hardware,
    time_settings,
)
from selmix.engine.precision import to_channels_last
from selmix.finetune import finetune
from selmix.models import create_model
from test_precision import _one_thread, tiny_set  # noqa: F401 - _one_thread is an autouse fixture


def fake_timings(monkeypatch, seconds):
    """Replaces the timing by a table of seconds per setting; counts the measurements."""
    measured = []

    def fake(model, input_shape, device, settings, **kwargs):
        measured.append(list(settings))
        return {setting: seconds[setting] for setting in settings}

    monkeypatch.setattr(hardware, "time_settings", fake)
    return measured


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELMIX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hardware.json"


def small_cnn():
    torch.manual_seed(0)
    return create_model("small_cnn", 3, in_channels=1)


# -- the decision rule ------------------------------------------------------------------------
def test_choose_keeps_the_baseline_unless_clearly_faster():
    base = ("fp32", False)
    # 1.18x faster is not clear: the baseline stays
    assert choose({base: 1.18, ("bf16", False): 1.0}, base) == base
    # 1.25x: the fastest wins, even when another is also faster than the baseline
    timings = {base: 1.25, ("bf16", False): 1.1, ("fp32", True): 1.0, ("bf16", True): 1.05}
    assert choose(timings, base) == ("fp32", True)
    assert choose({base: CLEAR_SPEEDUP, ("bf16", True): 1.0}, base) == ("bf16", True)
    with pytest.raises(ValueError, match="`baseline`"):
        choose({("bf16", False): 1.0}, base)


def test_candidates_follow_what_is_given():
    cnn, linear = small_cnn(), nn.Linear(4, 3)
    assert candidates("cpu", "auto", "auto", cnn) == [
        ("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)
    ]  # fmt: skip
    assert candidates("cpu", "bf16", "auto", cnn) == [("bf16", False), ("bf16", True)]
    assert candidates("cpu", "auto", False, cnn) == [("fp32", False), ("bf16", False)]
    # no convolution: the layout is not varied
    assert candidates("cpu", "auto", "auto", linear) == [("fp32", False), ("bf16", False)]


# -- resolving and the cache ------------------------------------------------------------------
def test_auto_picks_the_clearly_fastest_and_caches_it(monkeypatch, cache):
    seconds = {("fp32", False): 1.0, ("fp32", True): 0.95, ("bf16", False): 0.9,
               ("bf16", True): 0.6}  # fmt: skip
    measured = fake_timings(monkeypatch, seconds)
    lines = []
    choice = resolve_hardware(small_cnn(), (1, 12, 12), "cpu", report=lines.append)
    assert (choice.precision, choice.channels_last, choice.source) == ("bf16", True, "measured")
    assert choice.timings["bf16/channels-last"] == 0.6
    assert len(lines) == 1 and "\n" not in lines[0] and "bf16" in lines[0]
    assert "AMD" in lines[0] or "cores" in lines[0]  # the machine is named
    assert cache.is_file() and len(json.loads(cache.read_text())) == 1
    # the second run on this machine, model and input reads the cache: no timing
    again = resolve_hardware(small_cnn(), (1, 12, 12), "cpu", report=lines.append)
    assert (again.precision, again.channels_last, again.source) == ("bf16", True, "cached")
    assert len(measured) == 1
    # another input shape, or another model, is measured again
    resolve_hardware(small_cnn(), (1, 16, 16), "cpu", report=lines.append)
    resolve_hardware(create_model("small_cnn", 4, in_channels=1), (1, 12, 12), "cpu",
                     report=lines.append)  # fmt: skip
    assert len(measured) == 3 and len(json.loads(cache.read_text())) == 3


def test_not_clearly_faster_keeps_fp32_contiguous(monkeypatch, cache):
    seconds = {("fp32", False): 1.0, ("fp32", True): 0.9, ("bf16", False): 0.88,
               ("bf16", True): 0.85}  # fmt: skip
    fake_timings(monkeypatch, seconds)
    choice = resolve_hardware(small_cnn(), (1, 12, 12), "cpu", report=lambda line: None)
    assert (choice.precision, choice.channels_last) == ("fp32", False)


def test_a_given_axis_is_not_measured(monkeypatch, cache):
    seconds = {("bf16", False): 1.0, ("bf16", True): 0.5}
    measured = fake_timings(monkeypatch, seconds)
    choice = resolve_hardware(small_cnn(), (1, 12, 12), "cpu", precision="bf16",
                              report=lambda line: None)  # fmt: skip
    assert (choice.precision, choice.channels_last) == ("bf16", True)
    assert measured == [[("bf16", False), ("bf16", True)]]
    entries = json.loads(cache.read_text())
    given = resolve_hardware(small_cnn(), (1, 12, 12), "cpu", "fp32", False)
    assert (given.precision, given.channels_last, given.source) == ("fp32", False, "given")
    assert json.loads(cache.read_text()) == entries and len(measured) == 1
    # unmeasured (a multi-process run): the baseline
    fallback = resolve_hardware(small_cnn(), (1, 12, 12), "cpu", measure=False,
                                report=lambda line: None)  # fmt: skip
    assert (fallback.precision, fallback.channels_last, fallback.source) == (
        "fp32", False, "default"
    )  # fmt: skip


def test_bad_settings_name_the_argument():
    with pytest.raises(TypeError, match="`channels_last` must be True, False or 'auto'"):
        resolve_hardware(small_cnn(), (1, 12, 12), "cpu", channels_last="yes")
    with pytest.raises(ValueError, match="`precision` 'fp16' needs a CUDA device"):
        resolve_hardware(small_cnn(), (1, 12, 12), "cpu", precision="fp16")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SELMIX_CACHE_DIR", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SELMIX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "selmix"


def test_model_key_tells_shapes_apart():
    assert model_key(small_cnn()) == model_key(small_cnn())  # weights do not matter
    assert model_key(small_cnn()) != model_key(create_model("small_cnn", 4, in_channels=1))


# -- the real timing, on a tiny model ---------------------------------------------------------
def test_time_settings_smoke_and_leaves_the_model_alone():
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    settings = [("fp32", False), ("bf16", True)]
    timings = time_settings(model, (1, 12, 12), "cpu", settings, batch_size=4, steps=2)
    assert set(timings) == set(settings) and all(t > 0 for t in timings.values())
    inference = time_settings(model, (1, 12, 12), "cpu", settings, batch_size=4, train=False)
    assert all(t > 0 for t in inference.values())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert next(model.parameters()).is_contiguous()


def test_time_settings_counts_only_the_steps_after_the_warmup():
    reads = []

    def timer():
        reads.append(len(reads))
        # the i-th read returns i^2: steps timed later last longer (3-2: 5, 5-4: 9, 7-6: 13)
        return float(len(reads) - 1) ** 2

    timings = time_settings(small_cnn(), (1, 12, 12), "cpu", [("fp32", False)],
                            batch_size=2, steps=3, warmup=2, timer=timer)  # fmt: skip
    # 2 warm-up steps read the clock once (untimed), 3 timed ones twice; the median of the
    # timed steps (reads 2-3, 4-5, 6-7: 5, 9, 13 ticks) is 9
    assert len(reads) == 8 and timings == {("fp32", False): 9.0}


def test_a_run_records_what_auto_resolved_to(monkeypatch, cache, capsys):
    seconds = {("fp32", False): 1.0, ("fp32", True): 0.5}
    fake_timings(monkeypatch, seconds)
    data = tiny_set()
    result = finetune(small_cnn(), data, data, "min_recall", steps=3, batch_size=8,
                      precision="fp32", progress=False)  # fmt: skip
    assert result.config.channels_last is True and result.hardware["source"] == "measured"
    conv = next(m for m in result.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert "channels_last auto -> true" in capsys.readouterr().out


def test_machine_description_names_the_bf16_and_amx_flags():
    line = machine_description("cpu")
    assert "avx512_bf16: " in line and "amx_bf16: " in line and "torch" in line


# -- the layout changes no numbers -------------------------------------------------------------
@pytest.mark.parametrize("name", ["small_cnn", "resnet32", "wrn28_2"])
def test_channels_last_gives_the_same_logits(name):
    torch.manual_seed(0)
    model = create_model(name, 10, in_channels=3).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        contiguous = model(images)
        to_channels_last(model)
        assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight.is_contiguous(
            memory_format=torch.channels_last
        )
        layout = model(images)
    torch.testing.assert_close(layout, contiguous, rtol=1e-4, atol=1e-4)
