"""The fine-tuning engine on small real data (the packaged Fashion-MNIST-LT subset)."""

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import selmix
from selmix.data import ImageTensorDataset, load_data
from selmix.engine.evaluate import evaluate
from selmix.engine.pretrain import pretrain
from selmix.finetune import FinetuneConfig, finetune
from selmix.models import create_model
from selmix.models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def demo():
    return load_data("demo")


@pytest.fixture(scope="module")
def pretrained(demo):
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, in_channels=1)
    pretrain(model, demo.train, epochs=4, lr=0.05, seed=0, progress=False)
    return model


# the whole model from the first step (the paper's mode; the default freezes the backbone),
# from the model's own head (the tests that count optimiser steps see only SelMix's)
WHOLE_MODEL = {"frozen_backbone": False, "head_first_steps": 0, "head_init": "none"}


def small(dataset: ImageTensorDataset, per_class: int) -> ImageTensorDataset:
    keep = torch.cat(
        [(dataset.labels == k).nonzero().flatten()[:per_class] for k in range(dataset.num_classes)]
    )
    return dataset.subset(keep)


def test_finetuning_improves_its_objective(demo, pretrained):
    model = copy.deepcopy(pretrained)
    before = evaluate(model, demo.val).confusion
    objective = selmix.get_objective("mean_recall")
    result = finetune(
        model, demo.train, demo.val, objective, steps=300, feedback_every=50,
        frozen_backbone=True, lr_head=0.01, progress=False,
    )  # fmt: skip
    after = evaluate(model, demo.val).confusion
    assert float(objective(after)) > float(objective(before)) + 0.02
    test_before = evaluate(pretrained, demo.test).metrics()["mean_recall"]
    assert result.metrics(demo.test)["mean_recall"] > test_before + 0.02
    assert result.history[0]["step"] == 0 and result.history[-1]["step"] == 300


def test_frozen_backbone_leaves_backbone_untouched(demo, pretrained):
    model = copy.deepcopy(pretrained)
    backbone = {k: v.clone() for k, v in model.features.state_dict().items()}
    head = model.head.weight.detach().clone()
    finetune(
        model, demo.train, demo.val, "min_recall", steps=30, frozen_backbone=True,
        progress=False, select="last",
    )  # fmt: skip
    for key, value in model.features.state_dict().items():
        assert torch.equal(value, backbone[key]), key
    assert not torch.equal(model.head.weight, head)


def test_batch_norm_statistics_stay_frozen(demo, pretrained):
    model = copy.deepcopy(pretrained)
    stats = {
        name: (m.running_mean.clone(), m.running_var.clone())
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }
    conv = model.features.block1[0].weight.detach().clone()
    finetune(
        model, small(demo.train, 20), demo.val, "min_recall", steps=5, progress=False,
        select="last", **WHOLE_MODEL,
    )  # fmt: skip
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.running_mean, stats[name][0]), name
            assert torch.equal(module.running_var, stats[name][1]), name
    assert not torch.equal(model.features.block1[0].weight, conv)  # the backbone did train


def test_head_and_backbone_learning_rates(demo, pretrained):
    model = copy.deepcopy(pretrained)
    result = finetune(
        model, small(demo.train, 20), demo.val, "mean_recall", steps=4, feedback_every=2,
        backbone_feedback_every=2, lr_head=0.02, progress=False, **WHOLE_MODEL,
    )  # fmt: skip
    first = result.history[0]
    assert first["lr_head"] == pytest.approx(0.02)
    assert first["lr_backbone"] == pytest.approx(0.002)
    # cosine schedule: half way through, both rates are at half their peak
    assert result.history[1]["lr_head"] == pytest.approx(0.01)
    assert result.history[1]["lr_backbone"] == pytest.approx(0.001)
    # a zero backbone rate leaves the backbone's weights where they were
    model = copy.deepcopy(pretrained)
    conv = model.features.block2[0].weight.detach().clone()
    finetune(
        model, small(demo.train, 20), demo.val, "mean_recall", steps=3, lr_backbone=0.0,
        weight_decay=0.0, progress=False, **WHOLE_MODEL,
    )  # fmt: skip
    assert torch.equal(model.features.block2[0].weight, conv)


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "feedback_seconds"} for record in history]


def test_kill_and_resume_equals_uninterrupted(demo, pretrained, tmp_path, monkeypatch):
    train, val = small(demo.train, 15), small(demo.val, 10)
    settings = dict(
        steps=12, feedback_every=5, batch_size=16, checkpoint_every=4, progress=False,
        objective="min_recall", **WHOLE_MODEL,
    )  # fmt: skip
    reference = copy.deepcopy(pretrained)
    uninterrupted = finetune(
        reference, train, val, checkpoint_path=str(tmp_path / "a.pt"), **settings
    )

    killed = copy.deepcopy(pretrained)
    calls = {"n": 0}
    original_step = torch.optim.SGD.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # dies during step 7, after the checkpoint of step 4
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(killed, train, val, checkpoint_path=str(tmp_path / "b.pt"), **settings)
    monkeypatch.setattr(torch.optim.SGD, "step", original_step)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 4

    resumed_model = copy.deepcopy(pretrained)
    resumed = finetune(
        resumed_model, train, val, checkpoint_path=str(tmp_path / "b.pt"),
        resume=tmp_path / "b.pt", **settings,
    )  # fmt: skip
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert untimed(resumed.history) == untimed(uninterrupted.history)
    assert torch.equal(resumed.objective.multipliers, uninterrupted.objective.multipliers)


def test_same_seed_same_run(demo, pretrained):
    train = small(demo.train, 15)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(pretrained)
        finetune(model, train, demo.val, "g_mean", steps=6, batch_size=16, seed=3, progress=False)
        runs.append(model.head.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_log_file_has_one_record_per_feedback(demo, pretrained, tmp_path):
    log = tmp_path / "log.jsonl"
    finetune(
        copy.deepcopy(pretrained), small(demo.train, 15), demo.val, "mean_recall_min_coverage",
        steps=10, feedback_every=5, frozen_backbone=True, log_path=str(log), progress=False,
    )  # fmt: skip
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5, 10]
    for record in records:
        assert set(record) >= {
            "objective", "metrics", "multipliers", "max_gain", "policy_entropy", "step",
        }  # fmt: skip
        assert len(record["multipliers"]) == 10


# -- bad input ------------------------------------------------------------------------------


def test_labels_outside_range(demo, pretrained):
    bad = ImageTensorDataset(demo.val.images[:20], torch.full((20,), 12), num_classes=13)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        finetune(copy.deepcopy(pretrained), bad, demo.val, steps=1, progress=False)


def test_class_absent_from_validation(demo, pretrained):
    val = demo.val.subset((demo.val.labels != 7).nonzero().flatten())
    with pytest.raises(ValueError, match=r"`val` has no samples of class\(es\) \[7\]"):
        finetune(copy.deepcopy(pretrained), demo.train, val, steps=1, progress=False)


def test_model_without_linear_head(demo):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.ReLU())
    with pytest.raises(TypeError, match="features=.*head="):
        finetune(model, demo.train, demo.val, steps=1, progress=False)


def test_num_classes_disagreeing_with_data(demo):
    model = create_model("small_cnn", 5, in_channels=1)
    with pytest.raises(ValueError, match="num_classes|lie in"):
        finetune(model, demo.train, demo.val, steps=1, progress=False)


def test_non_finite_loss_stops_and_keeps_checkpoint(demo, pretrained, tmp_path):
    model = copy.deepcopy(pretrained)
    path = tmp_path / "ckpt.pt"

    def poison(record):
        if record["step"] == 5:  # the weights go bad after the checkpoint of step 4
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"at step 5.*ckpt\.pt"):
        finetune(
            model, small(demo.train, 15), demo.val, steps=40, feedback_every=5,
            checkpoint_every=2, checkpoint_path=str(path), callback=poison, progress=False,
        )  # fmt: skip
    state = load_checkpoint(path)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_corrupt_and_mismatched_checkpoints(demo, pretrained, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt"):
        finetune(copy.deepcopy(pretrained), demo.train, demo.val, resume=corrupt, progress=False)
    path = tmp_path / "run.pt"
    finetune(
        copy.deepcopy(pretrained), small(demo.train, 10), demo.val, steps=2,
        checkpoint_path=str(path), progress=False, frozen_backbone=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="other settings.*steps"):
        finetune(
            copy.deepcopy(pretrained), small(demo.train, 10), demo.val, steps=3, resume=path,
            progress=False, frozen_backbone=True,
        )  # fmt: skip


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="`steps` must be >= 1, got 0"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="unknown `policy` 'best'"):
        FinetuneConfig(policy="best")
    with pytest.raises(ValueError, match="unknown fine-tuning setting"):
        FinetuneConfig.from_dict({"stepz": 3})


def test_confusion_smoothing_makes_zero_recall_classes_visible():
    from selmix.engine.feedback import smoothed_confusion

    counts = torch.tensor([[50, 0, 0], [0, 40, 10], [5, 5, 0]])  # class 2 is never right
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(3, 4, generator=generator)
    head = nn.Linear(4, 3)
    objective = selmix.get_objective("min_recall")
    raw = smoothed_confusion(counts, 0.0)
    assert torch.allclose(raw, counts.double() / counts.sum())
    objective.update(raw)
    blind = selmix.core.gain_matrix(objective, raw, prototypes, head)
    smoothed = smoothed_confusion(counts, 1.0)
    assert torch.allclose(smoothed, (counts + 1).double() / (counts.sum() + 9))
    objective.update(smoothed)
    seeing = selmix.core.gain_matrix(objective, smoothed, prototypes, head)
    # without smoothing the worst class's row of the gain is numerically zero
    assert blind[2].abs().max() < 1e-4
    assert seeing[2].max() > 100 * blind[2].abs().max()
    assert seeing[2].max() == seeing.max()


def test_config_resolution_order_and_type():
    from selmix.engine.pretrain import PretrainConfig

    resolved = FinetuneConfig.resolve({"steps": 5, "lr_head": 0.1}, {"steps": 7})
    assert (resolved.steps, resolved.lr_head) == (7, 0.1)
    assert PretrainConfig.resolve(None, {}) == PretrainConfig()
    with pytest.raises(TypeError, match="`config` must be a FinetuneConfig or dict, got int"):
        FinetuneConfig.resolve(42, {})


# -- selection of the returned model (issue 13, part 1) ---------------------------------------
# lr_head = 5 on the frozen head drives validation mean recall from 0.41 down to about 0.2
WORSE = dict(
    objective="mean_recall", steps=30, feedback_every=10, frozen_backbone=True, lr_head=5.0,
    progress=False, head_init="none",
)  # fmt: skip


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_run_that_gets_worse_returns_the_start(demo, pretrained):
    start = _weights(pretrained)
    model = copy.deepcopy(pretrained)
    result = finetune(model, demo.train, demo.val, **WORSE)
    scores = [record["score"]["metric"] for record in result.history]
    assert max(scores[1:]) < scores[0]  # every later step is worse than the start
    assert result.selected_step == result.best_step == 0 and result.last_step == 30
    for key, value in model.state_dict().items():
        assert torch.equal(value, start[key]), key
    assert not torch.equal(result.last_state["head.weight"], start["head.weight"])
    last = finetune(copy.deepcopy(pretrained), demo.train, demo.val, **WORSE, select="last")
    assert last.selected_step == 30
    assert torch.equal(last.model.head.weight.detach().cpu(), result.last_state["head.weight"])
    assert result.metrics(demo.val)["mean_recall"] == pytest.approx(scores[0])


def test_patience_stops_after_feedback_steps_without_a_better_score(demo, pretrained):
    result = finetune(
        copy.deepcopy(pretrained), demo.train, demo.val, **{**WORSE, "steps": 100}, patience=2
    )
    # the start is best; feedback steps 10 and 20 do not beat it: the run stops at step 20
    assert [record["step"] for record in result.history] == [0, 10, 20]
    assert result.last_step == 20 and result.selected_step == 0


def test_resume_keeps_the_best_so_far(demo, pretrained, tmp_path, monkeypatch):
    settings = {**WORSE, "checkpoint_every": 15}
    killed = copy.deepcopy(pretrained)
    calls = {"n": 0}
    original_step = torch.optim.SGD.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # after the checkpoint of step 15, whose best step is 0
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(killed, demo.train, demo.val, checkpoint_path=str(tmp_path / "b.pt"), **settings)
    monkeypatch.setattr(torch.optim.SGD, "step", original_step)
    state = load_checkpoint(tmp_path / "b.pt")
    assert state["step"] == 15 and state["best"]["step"] == 0

    resumed_model = copy.deepcopy(pretrained)
    resumed = finetune(
        resumed_model, demo.train, demo.val, checkpoint_path=str(tmp_path / "b.pt"),
        resume=tmp_path / "b.pt", **settings,
    )  # fmt: skip
    assert resumed.selected_step == 0
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_objective_instance_parameters_are_recorded(demo, pretrained, tmp_path):
    result = finetune(
        copy.deepcopy(pretrained), small(demo.train, 10), small(demo.val, 5),
        selmix.core.objectives.MinRecall(rate=20), steps=2, feedback_every=1, batch_size=8,
        frozen_backbone=True, progress=False,
    )  # fmt: skip
    assert result.config.objective == "min_recall"
    assert result.config.objective_params == {"rate": 20}
    result.save(tmp_path / "m.pt")
    saved = load_checkpoint(tmp_path / "m.pt")["meta"]["finetune_config"]
    assert saved["objective_params"] == {"rate": 20}


def test_head_tail_objective_uses_the_given_head_classes(demo, pretrained):
    result = finetune(
        copy.deepcopy(pretrained), small(demo.train, 10), small(demo.val, 5),
        "min_head_tail_recall", steps=2, feedback_every=1, batch_size=8, frozen_backbone=True,
        progress=False, head_classes=[0, 1, 2],
    )  # fmt: skip
    assert result.objective.head_classes == [0, 1, 2]
    assert result.config.objective_params["head_classes"] == [0, 1, 2]
    assert result.objective.mask.tolist() == [True] * 3 + [False] * 7
    # unset head classes: the 90% most frequent training classes, as the CLI infers them
    inferred = finetune(
        copy.deepcopy(pretrained), small(demo.train, 10), small(demo.val, 5),
        "min_head_tail_recall", steps=1, batch_size=8, frozen_backbone=True, progress=False,
    )  # fmt: skip
    expected = selmix.core.metrics.infer_head_classes(small(demo.train, 10).labels, 10)
    assert inferred.config.head_classes == expected == inferred.objective.head_classes


def test_evaluation_soft_counts_sum_the_softmax_rows(demo, pretrained):
    val = small(demo.val, 5)
    evaluation = evaluate(pretrained, val)
    with torch.no_grad():
        probabilities = torch.softmax(pretrained.eval()(val.batch(torch.arange(50))[0]).double(), 1)
    expected = torch.zeros(10, 10, dtype=torch.float64).index_add_(0, val.labels, probabilities)
    assert evaluation.soft_counts.dtype == torch.float64
    torch.testing.assert_close(evaluation.soft_counts, expected)
    torch.testing.assert_close(evaluation.soft_counts.sum(1), evaluation.class_counts.double())


# -- head first, then the whole model (the default when the backbone is fine-tuned) ----------
def test_head_first_phase_then_the_whole_model(demo, pretrained):
    model = copy.deepcopy(pretrained)
    start_conv = model.features.block1[0].weight.detach().clone()
    convs = {}

    def watch(record):
        convs[record["step"]] = model.features.block1[0].weight.detach().clone()

    result = finetune(
        model, small(demo.train, 20), demo.val, "min_recall", steps=6, head_first_steps=3,
        feedback_every=1, backbone_feedback_every=1, frozen_backbone=False, lr_head=0.02,
        callback=watch,
        progress=False, select="last",
    )  # fmt: skip
    history = {record["step"]: record for record in result.history}
    # head phase: the backbone does not move, the head's rate decays over the 3 steps
    for step in (0, 1, 2, 3):
        assert torch.equal(convs[step], start_conv), step
        assert history[step]["lr_backbone"] == 0.0
    assert history[0]["lr_head"] == pytest.approx(0.02)
    # whole-model phase: its own cosine over the 3 remaining steps, head at lr_head / 10 and
    # backbone at lr_head / 100
    assert history[4]["lr_head"] == pytest.approx(0.002 * 0.75)
    assert history[4]["lr_backbone"] == pytest.approx(0.0002 * 0.75)
    assert not torch.equal(convs[6], start_conv)
    assert result.config.head_first == 3 and result.last_step == 6


def test_head_first_default_and_validation():
    assert FinetuneConfig().head_first == 0  # frozen backbone: one phase
    assert FinetuneConfig(frozen_backbone=False).head_first == 2000
    assert FinetuneConfig(frozen_backbone=False, steps=600).head_first == 300
    tuned = FinetuneConfig(frozen_backbone=False)
    assert tuned.backbone_phase_lr_head == pytest.approx(3e-4)
    assert tuned.backbone_lr == pytest.approx(3e-5)
    user = FinetuneConfig(frozen_backbone=False, lr_backbone=1e-4)
    assert user.backbone_lr == 1e-4  # a user's value wins
    paper = FinetuneConfig(frozen_backbone=False, head_first_steps=0)
    assert paper.backbone_lr == pytest.approx(3e-4) and paper.backbone_phase_lr_head == 3e-3
    with pytest.raises(ValueError, match="`head_first_steps` must be < `steps`"):
        FinetuneConfig(frozen_backbone=False, steps=100, head_first_steps=100)


def test_resume_across_the_head_first_boundary(demo, pretrained, tmp_path, monkeypatch):
    train, val = small(demo.train, 15), small(demo.val, 10)
    settings = dict(
        steps=10, head_first_steps=4, frozen_backbone=False, feedback_every=3, batch_size=16,
        checkpoint_every=3, progress=False, objective="min_recall", head_init="none",
    )  # fmt: skip
    reference = copy.deepcopy(pretrained)
    uninterrupted = finetune(
        reference, train, val, checkpoint_path=str(tmp_path / "a.pt"), **settings
    )
    killed = copy.deepcopy(pretrained)
    calls = {"n": 0}
    original_step = torch.optim.SGD.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # dies in step 8, after the checkpoint of step 6 (backbone phase)
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(killed, train, val, checkpoint_path=str(tmp_path / "b.pt"), **settings)
    monkeypatch.setattr(torch.optim.SGD, "step", original_step)
    state = load_checkpoint(tmp_path / "b.pt")
    assert state["step"] == 6 and state["head_phase"] is False
    resumed_model = copy.deepcopy(pretrained)
    resumed = finetune(
        resumed_model, train, val, checkpoint_path=str(tmp_path / "b.pt"),
        resume=tmp_path / "b.pt", **settings,
    )  # fmt: skip
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert untimed(resumed.history) == untimed(uninterrupted.history)
    assert resumed.best_step == uninterrupted.best_step


# -- the stabilisers of issue 13 reach the feedback step ---------------------------------------
def test_uniform_mix_and_multiplier_step_reach_the_feedback(demo, pretrained):
    train, val = small(demo.train, 15), small(demo.val, 10)
    common = dict(steps=1, feedback_every=1, batch_size=8, progress=False, select="last")
    plain = finetune(copy.deepcopy(pretrained), train, val, "min_recall", **common)
    half = finetune(
        copy.deepcopy(pretrained), train, val, "min_recall", multiplier_step=0.5,
        uniform_mix=1.0, **common,
    )  # fmt: skip
    initial = torch.full((10,), 0.1, dtype=torch.float64)  # min recall starts uniform
    fresh = torch.tensor(plain.history[0]["multipliers"], dtype=torch.float64)
    halfway = torch.tensor(half.history[0]["multipliers"], dtype=torch.float64)
    assert torch.allclose(halfway, 0.5 * initial + 0.5 * fresh)
    assert half.history[0]["policy_entropy"] == pytest.approx(math.log(100))  # all uniform
    assert plain.history[0]["policy_entropy"] < math.log(100)
    soft = finetune(
        copy.deepcopy(pretrained), train, val, "min_recall", soft_confusion=True,
        confusion_smoothing=0.0, **common,
    )  # fmt: skip
    hard = finetune(
        copy.deepcopy(pretrained), train, val, "min_recall", confusion_smoothing=0.0, **common
    )
    assert not torch.allclose(soft.gains[0][1], hard.gains[0][1])


def test_small_validation_warns_for_per_class_objectives_only(demo, pretrained):
    few = small(demo.val, 10)  # 10 per class: below SMALL_VALIDATION
    settings = {"steps": 2, "feedback_every": 1, "progress": False}
    with pytest.warns(selmix.core.SmallValidationWarning, match="10 samples of its smallest class"):
        finetune(copy.deepcopy(pretrained), demo.train, few, "min_recall", **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", selmix.core.SmallValidationWarning)
        finetune(copy.deepcopy(pretrained), demo.train, few, "mean_recall", **settings)
        finetune(copy.deepcopy(pretrained), demo.train, few, "mean_recall_min_coverage", **settings)
        finetune(copy.deepcopy(pretrained), demo.train, small(demo.val, 60), "min_recall",
                 **settings)  # fmt: skip


def test_shrinkage_changes_what_the_objective_sees_not_the_logged_counts(demo, pretrained):
    few = small(demo.val, 10)
    settings = {"steps": 20, "feedback_every": 10, "progress": False, "seed": 0}
    plain = finetune(
        copy.deepcopy(pretrained), demo.train, few, "min_recall", shrinkage="none", **settings
    )
    pooled = finetune(copy.deepcopy(pretrained), demo.train, few, "min_recall", **settings)
    # step 0: the same model, the same logged metrics, other multipliers
    assert plain.history[0]["metrics"] == pooled.history[0]["metrics"]
    assert plain.history[0]["multipliers"] != pooled.history[0]["multipliers"]
    spread = [max(r["multipliers"]) for r in (plain.history[0], pooled.history[0])]
    assert spread[1] < spread[0]  # the pooled estimate concentrates the multipliers less
    assert pooled.config.shrinkage == "auto"
    # ... and the best step is chosen by the pooled estimate: the score is not the raw one
    raw = pooled.history[0]["metrics"]["min_recall"]
    assert pooled.history[0]["score"]["metric"] != pytest.approx(raw)
    assert plain.history[0]["score"]["metric"] == pytest.approx(raw)


def test_head_init_starts_from_the_rebalanced_head_it_names(demo, pretrained):
    from selmix.baselines import classifier_retraining

    settings = {"steps": 1, "feedback_every": 1, "progress": False, "seed": 3}
    crt = classifier_retraining(pretrained, demo.train, None, seed=3)
    run = finetune(copy.deepcopy(pretrained), demo.train, demo.val, "min_recall",
                   head_init="crt", **settings)  # fmt: skip
    assert run.head_init["head_init"] == "crt"
    # the start the run scored (step 0) is the cRT head on the same features
    assert run.history[0]["metrics"] == evaluate(crt, demo.val).metrics()
    kept = finetune(copy.deepcopy(pretrained), demo.train, demo.val, "min_recall",
                    head_init="none", **settings)  # fmt: skip
    assert kept.head_init is None
    assert kept.history[0]["metrics"] == evaluate(pretrained, demo.val).metrics()


def test_head_init_auto_takes_the_best_candidate_on_validation(demo, pretrained):
    settings = {"steps": 1, "feedback_every": 1, "progress": False}
    run = finetune(copy.deepcopy(pretrained), demo.train, demo.val, "min_recall",
                   head_init="auto", **settings)  # fmt: skip
    scores = run.head_init["scores"]
    assert set(scores) == {"model", "posthoc_la", "crt"}
    # the best, or (head_init_tolerance, issue 38) the highest mean recall among the heads
    # whose min recall is within one standard error (0.5 / sqrt(100)) of the best's
    top = max(scores[name]["metric"] for name in scores)
    tied = [name for name in scores if scores[name]["metric"] >= top - 0.05]
    best = max(tied, key=lambda name: (scores[name]["tiebreak"], scores[name]["metric"]))
    assert run.head_init["head_init"] == best
    # the candidates are scored on the raw counts; step 0 logs the chosen one's metrics
    assert run.history[0]["metrics"]["min_recall"] == pytest.approx(scores[best]["metric"])
    with pytest.raises(ValueError, match="head_init"):
        FinetuneConfig(head_init="balanced")


def test_resume_does_not_initialise_the_head_again(demo, pretrained, tmp_path):
    train, val = small(demo.train, 15), small(demo.val, 10)
    settings = dict(steps=8, feedback_every=4, batch_size=16, checkpoint_every=4,
                    progress=False, objective="min_recall", head_init="auto")  # fmt: skip
    whole = finetune(copy.deepcopy(pretrained), train, val,
                     checkpoint_path=str(tmp_path / "a.pt"), **settings)  # fmt: skip

    def stop_at_step_4(record):
        if record["step"] == 4:  # after the checkpoint of step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(copy.deepcopy(pretrained), train, val, checkpoint_path=str(tmp_path / "b.pt"),
                 callback=stop_at_step_4, **settings)  # fmt: skip
    # the resumed run starts from the checkpoint's weights: no second head_init
    resumed = finetune(copy.deepcopy(pretrained), train, val, resume=tmp_path / "b.pt",
                       checkpoint_path=str(tmp_path / "b.pt"), **settings)  # fmt: skip
    assert whole.head_init is not None and resumed.head_init == whole.head_init
    assert untimed(resumed.history) == untimed(whole.history)
