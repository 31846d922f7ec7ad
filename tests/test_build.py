"""A run is built, then run: :func:`selmix.finetune.build.build_run` prepares the parts, a
:class:`Trainer` trains with them; and the Trainer sees the views through one protocol."""

from __future__ import annotations

import pytest
import torch

from selmix.engine.views import FrozenFeatures, FullBackbone, ModelView, PairPools, make_view
from selmix.finetune import FinetuneConfig, Trainer
from selmix.finetune.build import RunParts, build_run, check_datasets, run_generator
from selmix.models import split_model
from test_precision import _one_thread, tiny_model, tiny_set  # noqa: F401 - autouse fixture

#: the backbone fine-tuned after a head-first phase, the start head chosen by head_init:
#: every step of the build and both views of the run
SETTINGS = {"steps": 8, "feedback_every": 2, "batch_size": 16, "head_first_steps": 3,
            "frozen_backbone": False, "head_init": "auto", "progress": False,
            "channels_last": False, "select": "best", "seed": 5}  # fmt: skip


def _history_without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "feedback_seconds"} for record in history]


def test_a_trainer_from_built_parts_runs_as_one_built_the_usual_way():
    data = tiny_set()
    config = FinetuneConfig(**SETTINGS)
    usual = Trainer(tiny_model(), data, data, None, config).run()
    parts = build_run(tiny_model(), data, data, None, config)
    from_parts = Trainer.from_parts(parts).run()
    assert _history_without_times(from_parts.history) == _history_without_times(usual.history)
    assert from_parts.selected_step == usual.selected_step
    for key, value in usual.model.state_dict().items():
        assert torch.equal(value, from_parts.model.state_dict()[key]), key
    assert from_parts.history[0]["head_init"]["head_init"] in ("model", "posthoc_la", "crt")


def test_build_run_resolves_the_settings_and_prepares_the_parts():
    data = tiny_set()
    model = tiny_model()
    parts = build_run(model, data, data, "min_recall", FinetuneConfig(**SETTINGS))
    assert isinstance(parts, RunParts)
    assert parts.model is model and parts.num_classes == 3
    # nothing the run uses is left to "auto"
    assert parts.config.device == "cpu" and parts.config.precision in ("fp32", "bf16", "fp16")
    assert isinstance(parts.config.channels_last, bool)
    assert isinstance(parts.config.eval_batch_size, int) and parts.config.eval_batch_size > 0
    assert parts.objective.name == "min_recall" and parts.config.objective == "min_recall"
    assert parts.val_counts.tolist() == [32, 32, 32]
    assert parts.head_init is not None and "scores" in parts.head_init
    # the generator is the run's seed's, untouched by the build
    assert torch.equal(
        torch.rand(4, generator=parts.generator), torch.rand(4, generator=run_generator(5, 0))
    )
    assert isinstance(parts.view(frozen=True), FrozenFeatures)
    assert isinstance(parts.view(frozen=False), FullBackbone)


def test_build_run_keeps_the_head_when_a_resume_brings_it():
    data = tiny_set()
    model = tiny_model()
    head = {k: v.clone() for k, v in split_model(model).head.state_dict().items()}
    parts = build_run(
        model, data, data, None, FinetuneConfig(**SETTINGS), initialise_head_weights=False
    )
    assert parts.head_init is None
    for key, value in parts.split.head.state_dict().items():
        assert torch.equal(value, head[key]), key


def test_run_generator_gives_each_rank_its_stream_and_rank_0_the_seed_s():
    draws = [torch.rand(3, generator=run_generator(7, rank)) for rank in range(3)]
    assert torch.equal(draws[0], torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_check_datasets_names_the_missing_class_and_a_head_mismatch():
    data = tiny_set()
    check_datasets(data, data, 3)
    without_last = tiny_set(num_classes=2)
    with pytest.raises(ValueError, match=r"`val` has no samples of class\(es\) \[2\]"):
        check_datasets(data, without_last, 3)
    with pytest.raises(ValueError, match=r"`train` has num_classes = 3 but the model's head has 4"):
        check_datasets(data, tiny_set(num_classes=4), 4)


@pytest.mark.parametrize("frozen", [True, False])
def test_both_views_are_model_views_and_refuse_the_other_s_mixing(frozen):
    data = tiny_set()
    split = split_model(tiny_model())
    view = make_view(frozen, split, torch.device("cpu"), pools=PairPools(data))
    assert isinstance(view, ModelView)
    pairs = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.zeros(2, dtype=torch.bool)
    lam = torch.full((2, 1), 0.5)
    if frozen:
        mixed = view.mixed_features(*pairs, lam)
        assert mixed.shape[0] == 2 and not mixed.requires_grad
        with pytest.raises(ValueError, match="input space needs the backbone"):
            view.mixed_input_logits(*pairs, lam, torch.Generator(), lambda *args: None)
    else:
        with pytest.raises(ValueError, match="its features are not constants"):
            view.mixed_features(*pairs, lam)
