"""Issue 38: min-recall steering and selection set by the validation noise, and the suite's
dominance check, each against an independent computation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from selmix.core.objectives import MinHeadTailRecall, MinRecall, get_objective, noise_rate
from selmix.core.selection import (
    ObjectiveScore,
    best_index,
    selection_tolerance,
    undominated_index,
)
from selmix.engine.config import FinetuneConfig, resolve_objective
from selmix.finetune.best import _BestSoFar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


# -- the multiplier rate from the noise -----------------------------------------------------
def test_noise_rate_makes_the_multipliers_the_chance_of_being_the_worst():
    """softmax(-w r) against a Monte Carlo count of argmin(r + e) with Gumbel errors of
    standard deviation ``spread``."""
    spread = 0.5 / math.sqrt(40)
    rate = noise_rate(spread)
    assert rate == pytest.approx(math.pi / math.sqrt(6) / spread)
    recall = np.array([0.30, 0.32, 0.35, 0.45, 0.60])
    rng = np.random.default_rng(0)
    scale = spread * math.sqrt(6) / math.pi  # a Gumbel of this scale has sd = spread
    draws = 400_000
    errors = -rng.gumbel(0.0, scale, size=(draws, recall.size))  # min-Gumbel errors
    assert errors.std() == pytest.approx(spread, rel=0.01)
    frequency = np.bincount(np.argmin(recall + errors, axis=1), minlength=recall.size) / draws
    expected = np.exp(-rate * recall) / np.exp(-rate * recall).sum()
    np.testing.assert_allclose(frequency, expected, atol=3e-3)


def test_noise_rate_at_the_sizes_the_issue_names():
    # 40 per class: w = 16, 2 points weigh 1.4x (the paper's w = 50: 2.7x); 500: ~57
    assert noise_rate(0.5 / math.sqrt(40)) == pytest.approx(16.22, abs=0.01)
    assert math.exp(0.02 * noise_rate(0.5 / math.sqrt(40))) == pytest.approx(1.38, abs=0.01)
    assert math.exp(0.02 * 50) == pytest.approx(2.72, abs=0.01)
    assert noise_rate(0.5 / math.sqrt(500)) == pytest.approx(57.4, abs=0.1)
    with pytest.raises(ValueError, match="spread"):
        noise_rate(0.0)


def test_recall_spread_of_min_recall_and_of_the_head_tail_groups():
    counts = torch.tensor([100, 40, 25, 60])
    assert MinRecall().recall_spread(counts) == pytest.approx(0.5 / 5.0)
    # the group mean recall's variance at r = 0.5 is sum_k 0.25 / n_k / |G|^2
    objective = MinHeadTailRecall(head_classes=[0, 3])
    head = math.sqrt(0.25 / 100 + 0.25 / 60) / 2
    tail = math.sqrt(0.25 / 40 + 0.25 / 25) / 2
    assert objective.recall_spread(counts) == pytest.approx(max(head, tail))
    with pytest.raises(ValueError, match="class_counts"):
        MinRecall().recall_spread(torch.tensor([3, 0]))


def test_floor_spreads_a_share_of_the_weight_evenly():
    counts = torch.tensor([[50.0, 6.0, 4.0], [10.0, 30.0, 10.0], [9.0, 12.0, 19.0]]).double()
    recall = (counts.diagonal() / counts.sum(1)).numpy()
    objective = get_objective("min_recall", rate=20.0, floor=0.3)
    objective.update(counts)
    softmax = np.exp(-20 * recall) / np.exp(-20 * recall).sum()
    np.testing.assert_allclose(objective.multipliers.numpy(), 0.7 * softmax + 0.1, rtol=1e-12)
    assert objective.hyperparameters() == {"rate": 20.0, "floor": 0.3}
    assert get_objective("min_recall").hyperparameters() == {"rate": 50.0}  # unchanged
    with pytest.raises(ValueError, match="floor"):
        get_objective("min_recall", floor=1.0)


def _resolved_rate(config: FinetuneConfig, objective=None, per_class: int = 40) -> float:
    train = torch.arange(10).repeat_interleave(torch.arange(10, 0, -1) * 5)
    val = torch.arange(10).repeat_interleave(per_class)
    _, resolved = resolve_objective(config, objective, train, 10, val)
    return resolved.rate


def test_resolve_objective_sets_the_rate_from_the_validation_counts_unless_given():
    noise = FinetuneConfig(multiplier_rate="noise")
    assert _resolved_rate(noise) == pytest.approx(noise_rate(0.5 / math.sqrt(40)))
    assert _resolved_rate(noise, per_class=10) == pytest.approx(noise_rate(0.5 / math.sqrt(10)))
    config, _ = resolve_objective(noise, None, torch.arange(10), 10, torch.arange(10))
    assert config.objective_params["rate"] == pytest.approx(noise_rate(0.5))  # recorded
    # a rate given in objective_params, an Objective instance, the paper preset: kept
    given = FinetuneConfig(multiplier_rate="noise", objective_params={"rate": 7.0})
    assert _resolved_rate(given) == 7.0
    assert _resolved_rate(noise, MinRecall(rate=50.0)) == 50.0
    assert _resolved_rate(FinetuneConfig.from_dict({"preset": "paper"})) == 50.0
    assert _resolved_rate(FinetuneConfig(multiplier_rate="objective")) == 50.0


# -- the selection among steps tied within the noise -----------------------------------------
def test_selection_tolerance_is_the_spread_for_min_recall_only():
    counts = torch.full((5,), 40)
    assert selection_tolerance("min_recall", counts) == pytest.approx(0.5 / math.sqrt(40))
    assert selection_tolerance("min_recall", counts, 0.5) == pytest.approx(0.25 / math.sqrt(40))
    assert selection_tolerance("min_recall", counts, 0.0) == 0.0
    assert selection_tolerance("mean_recall_min_coverage", counts) == 0.0
    assert selection_tolerance("h_mean", counts) == 0.0


def _direct_choice(scores: list[ObjectiveScore], tolerance: float) -> int:
    """The undominated score among those tied, by enumeration of the pairs."""
    top = max(s.metric for s in scores)
    tied = [i for i, s in enumerate(scores) if s.metric >= top - tolerance]

    def dominated(i: int) -> bool:
        a = scores[i]
        return any(
            (b.metric >= a.metric and b.tiebreak >= a.tiebreak)
            and (b.metric > a.metric or b.tiebreak > a.tiebreak)
            for b in (scores[j] for j in tied)
        )

    undominated = [i for i in tied if not dominated(i)]
    best_mean = max(scores[i].tiebreak for i in undominated)
    return min(i for i in undominated if scores[i].tiebreak == best_mean)


def test_undominated_index_prefers_the_highest_mean_recall_among_the_tied():
    scores = [
        ObjectiveScore(0.40, tiebreak=0.55),
        ObjectiveScore(0.45, tiebreak=0.56),  # the best min recall
        ObjectiveScore(0.41, tiebreak=0.60),  # tied within 0.05, higher mean recall
        ObjectiveScore(0.30, tiebreak=0.70),  # not tied
    ]
    assert best_index(scores) == 1
    assert undominated_index(scores, 0.0) == 1
    assert undominated_index(scores, 0.05) == 2
    assert undominated_index(scores, 0.2) == 3
    rng = np.random.default_rng(1)
    for _ in range(200):
        values = rng.integers(0, 8, size=(12, 2)) / 8  # many exact ties
        trial = [ObjectiveScore(float(a), tiebreak=float(b)) for a, b in values]
        assert undominated_index(trial, 0.25) == _direct_choice(trial, 0.25)


def _model(value: float) -> nn.Module:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def test_best_so_far_with_a_tolerance_keeps_the_undominated_step_and_its_weights():
    rng = np.random.default_rng(2)
    for _ in range(50):
        values = rng.integers(0, 10, size=(15, 2)) / 10
        scores = [ObjectiveScore(float(a), tiebreak=float(b)) for a, b in values]
        best = _BestSoFar(tolerance=0.2)
        for n, score in enumerate(scores):
            best.offer(score, 10 * n, _model(float(n)))
            # online, the pick equals the choice over every step offered so far
            expected = _direct_choice(scores[: n + 1], 0.2)
            assert best.step == 10 * expected
            assert torch.equal(best.weights["bias"], torch.full((2,), float(expected)))
        restored = _BestSoFar()
        restored.load_state_dict(best.state_dict())
        assert (restored.step, restored.tolerance, len(restored.front)) == (
            best.step, 0.2, len(best.front),
        )  # fmt: skip


def test_best_so_far_counts_stale_steps_and_falls_back_without_a_tiebreak():
    best = _BestSoFar(tolerance=0.1)
    assert best.offer(ObjectiveScore(0.5, tiebreak=0.5), 0, _model(0.0))
    assert not best.offer(ObjectiveScore(0.5, tiebreak=0.4), 10, _model(1.0))
    assert best.stale == 1 and best.exhausted(1)
    assert best.offer(ObjectiveScore(0.45, tiebreak=0.6), 20, _model(2.0))  # tied, better mean
    assert best.step == 20 and best.stale == 0
    plain = _BestSoFar(tolerance=0.1)  # scores without a tie-break: the strict rule
    plain.offer(ObjectiveScore(0.5), 0, _model(0.0))
    assert not plain.offer(ObjectiveScore(0.45), 10, _model(1.0))


# -- the suite's dominance check -------------------------------------------------------------
def _record(case: str, method: str, variant, min_recall: float, mean_recall: float) -> dict:
    values = {"objective": min_recall, "min_recall": min_recall, "mean_recall": mean_recall,
              "h_mean": mean_recall, "min_coverage": 0.1}  # fmt: skip
    return {
        "case": case, "method": method, "variant": variant, "seed": 0,
        "objective": "min_recall" if "minrec" in case else "mean_recall_min_coverage",
        "num_classes": 10, "val_per_class": 40, "frozen": True,
        "val": values, "test": values,
    }  # fmt: skip


def test_render_flags_a_min_recall_run_dominated_by_the_coverage_run():
    import versus_baselines as vb

    records = []
    for name in ("a-minrec", "b-minrec"):
        records += [_record(name, "start", None, 0.0, 0.4), _record(name, "crt", None, 0.2, 0.6)]
    records += [
        _record("a-mrcov", "start", None, 0.0, 0.4),
        # a: the coverage run's min recall 0.9 points lower, mean recall 2.5 higher
        _record("a-minrec", "selmix", "x", 0.300, 0.550),
        _record("a-mrcov", "selmix", "defaults", 0.291, 0.575),
        # b: the coverage run's mean recall only 1.5 points higher: not dominated
        _record("b-minrec", "selmix", "x", 0.300, 0.550),
        _record("b-mrcov", "selmix", "x", 0.310, 0.565),
    ]
    pairs = {"a-minrec": ["a-mrcov"], "b-minrec": ["b-mrcov"]}
    assert [o for o, _, _ in vb.dominated_by([records[5]], {"a-mrcov": [records[6]]})] == [
        "a-mrcov"
    ]
    text = vb.render(records, ["x"], ["a-minrec", "a-mrcov", "b-minrec"], pairs)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert rows["a-minrec"].rstrip(" |").endswith("by mrcov (-0.9 / +2.5)")
    assert rows["b-minrec"].rstrip(" |").endswith("no")
    assert "dominated by another objective's run" in text
    assert ": 1/2, by the coverage objective 1; a-minrec (by mrcov: -0.9 min / +2.5 mean)" in text


def test_partners_pair_cases_of_one_start_and_validation_size():
    import versus_baselines as vb

    cases = vb._versus_cases()
    pairs = vb.partners(cases)
    assert pairs["k20-o1-v40-minrec"] == ["k20-o1-v40-mrcov"]
    assert pairs["gauss100-v10-minrec"] == ["gauss100-v10-hmean", "gauss100-v10-mrcov"]
    assert len(pairs) == 14


# -- the start head among those tied within the noise ----------------------------------------
def test_head_init_auto_takes_the_undominated_head_among_those_tied(monkeypatch):
    import copy
    import importlib

    from selmix.data import load_data
    from selmix.finetune import finetune
    from selmix.models import create_model

    head_init = importlib.import_module("selmix.finetune.head_init")
    demo = load_data("demo")  # 100 validation images per class: one standard error 0.05
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, in_channels=1)
    # the candidates' validation scores, in the order they are scored: the tuned post-hoc
    # head has the best min recall, cRT one 0.02 below it and 0.07 more mean recall
    made_up = {"model": (0.30, 0.50), "posthoc_la": (0.34, 0.55), "crt": (0.32, 0.62)}
    settings = {"steps": 1, "feedback_every": 1, "progress": False, "head_init": "auto"}
    for width, expected in ((0.0, "posthoc_la"), (0.2, "posthoc_la"), (1.0, "crt")):
        calls = iter(made_up.values())
        real = head_init.objective_score

        def fake(objective, counts, calls=calls, real=real):
            value = next(calls, None)
            if value is None:  # the run's own feedback steps
                return real(objective, counts)
            return ObjectiveScore(value[0], tiebreak=value[1])

        monkeypatch.setattr(head_init, "objective_score", fake)
        run = finetune(copy.deepcopy(model), demo.train, demo.val, "min_recall",
                       head_init_tolerance=width, **settings)  # fmt: skip
        assert run.head_init["head_init"] == expected, width
        scores = [ObjectiveScore(*v[:1], tiebreak=v[1]) for v in made_up.values()]
        assert expected == list(made_up)[_direct_choice(scores, width * 0.05)]


def test_unset_uniform_mix_follows_the_validation_noise_for_min_recall_only():
    labels = torch.arange(10)

    def resolved(objective: str, val_per_class=(1,) * 10, **settings) -> float:
        given = FinetuneConfig.from_dict({"objective": objective, **settings})
        val_labels = torch.repeat_interleave(torch.arange(10), torch.tensor(val_per_class))
        config, _ = resolve_objective(given, None, labels, 10, val_labels)
        return config.uniform_mix

    assert resolved("min_recall") == 0.5
    assert resolved("min_head_tail_recall") == 0.5
    assert resolved("mean_recall_min_coverage") == 0.0
    assert resolved("h_mean") == 0.0
    assert resolved("min_recall", uniform_mix=0.2) == 0.2
    assert resolved("min_recall", preset="paper") == 0.0
    # half the pairs up to 100 samples of the smallest class, then 0.5 * 100 / n
    assert resolved("min_recall", (100,) * 10) == pytest.approx(0.5)
    assert resolved("min_recall", (500,) * 10) == pytest.approx(0.1)
    assert resolved("min_recall", (1000,) * 9 + (200,)) == pytest.approx(0.25)
    assert resolved("min_recall", (500,) * 10, uniform_mix=0.0) == 0.0
    assert resolved("h_mean", (10,) * 10) == 0.0
    # head / tail: the noise of a group's mean recall, here the tail's two classes of 50
    # (0.5 / sqrt(100)), so half the pairs, where min recall would read the same 50 alike
    head_tail = {"objective_params": {"head_classes": list(range(8))}}
    assert resolved("min_head_tail_recall", (50,) * 10, **head_tail) == pytest.approx(0.5)
    assert resolved("min_head_tail_recall", (500,) * 10, **head_tail) == pytest.approx(0.05)
    # without validation labels the run does not know the noise: the most
    config, _ = resolve_objective(FinetuneConfig.from_dict({"objective": "min_recall"}), None,
                                  labels, 10)  # fmt: skip
    assert config.uniform_mix == 0.5
