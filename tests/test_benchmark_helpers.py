"""The benchmark scripts' shared helpers whose numbers appear in docs/RESULTS.md."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import coverage_floor  # noqa: E402


def test_coverage_floor_of_a_perfect_classifier_has_no_noise():
    # Every prediction right: every measured coverage is exactly 1/K, whatever the sizes.
    mean, low, below = coverage_floor(50, 4, rates=torch.eye(4), val_per_class=20, draws=200)
    assert mean == pytest.approx(0.25) and low == pytest.approx(0.25) and below == 0.0


def test_coverage_floor_matches_the_binomial_expectation():
    # K = 2, uniform rates: class 0's predictions on 2n test images are Binomial(2n, 1/2),
    # so the min coverage is min(X, 2n - X) / 2n, whose mean is computed exactly here.
    n = 20
    exact = sum(
        math.comb(2 * n, x) * 0.5 ** (2 * n) * min(x, 2 * n - x) / (2 * n) for x in range(2 * n + 1)
    )
    mean, _, _ = coverage_floor(n, 2, draws=20000, seed=1)
    assert mean == pytest.approx(exact, abs=0.002)


def test_coverage_floor_validation_noise_lowers_the_floor():
    rates = 0.7 * torch.eye(10) + 0.03
    test_only = coverage_floor(1000, 10, rates=rates, draws=500)[0]
    small_val = coverage_floor(1000, 10, rates=rates, val_per_class=100, draws=500)[0]
    large_val = coverage_floor(1000, 10, rates=rates, val_per_class=5000, draws=500)[0]
    assert small_val < large_val < test_only < 0.1


def test_coverage_floor_rejects_a_class_without_images():
    rates = torch.eye(3)
    rates[1] = 0
    with pytest.raises(ValueError, match="positive sum"):
        coverage_floor(10, 3, rates=rates)


# -- benchmarks/cifar_table3.py: the run plan, the claims and the rendering ------------------


def _table3_args(tmp_path, **changes):
    import cifar_table3

    argv = sys.argv
    sys.argv = ["cifar_table3.py", "--records", str(tmp_path)]
    try:
        args = cifar_table3.parse_args()
    finally:
        sys.argv = argv
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_table3_plan_runs_objective_independent_rows_once_per_seed(tmp_path):
    import cifar_table3

    args = _table3_args(tmp_path, seeds=[0, 1])
    runs = cifar_table3.plan(args)
    assert len(runs) == len(set(runs))
    start_runs = [r for r in runs if r[0] == "start"]
    assert start_runs == [
        ("start", "frozen", "min_recall", 0),
        ("start", "frozen", "min_recall", 1),
    ]
    selmix_frozen = {(r[2], r[3]) for r in runs if r[:2] == ("SelMix", "frozen")}
    assert selmix_frozen == {(o, s) for o in cifar_table3.OBJECTIVES for s in (0, 1)}
    # the backbone-lr variant runs for the first objective only unless asked for by name
    variant = [r for r in runs if r[0] == "SelMix (defaults, backbone lr 3e-4)"]
    assert {r[2] for r in variant} == {"min_recall"}
    # every frozen run comes before every fine-tuned one; the first objective's fine-tuned
    # runs (all seeds) before any other objective's
    kinds = [r[1] for r in runs]
    assert kinds == sorted(kinds, key=lambda k: k == "fine-tuned")
    full = [r for r in runs if r[1] == "fine-tuned"]
    firsts = [i for i, r in enumerate(full) if r[2] == "min_recall"]
    assert firsts == list(range(len(firsts)))


def test_table3_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    import os

    import cifar_table3

    path = tmp_path / "run.claim"
    assert cifar_table3.claim(path)
    assert path.read_text() == str(os.getpid())
    assert not cifar_table3.claim(path)  # held by a live process (this one)
    path.write_text("999999999")  # a process id that cannot be alive
    assert cifar_table3.claim(path)
    assert path.read_text() == str(os.getpid())


def test_table3_render_shares_objective_independent_runs_and_writes_the_summary(tmp_path):
    import json

    import cifar_table3

    def record(row, objective, seed, min_recall):
        test = {"mean_recall": 0.7, "min_recall": min_recall, "g_mean": 0.69, "h_mean": 0.68,
                "min_coverage": 0.05}  # fmt: skip
        payload = {"row": row, "backbone": "frozen", "objective": objective, "seed": seed,
                   "test": test, "seconds": 2.0, "machine": "cpu", "full_steps": None,
                   "config": {}}  # fmt: skip
        name = cifar_table3.slug(row, "frozen", objective, seed)
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))

    record("cRT", "min_recall", 0, 0.40)
    record("cRT", "min_recall", 1, 0.44)
    record("SelMix", "min_recall", 0, 0.70)
    record("SelMix", "mean_recall", 0, 0.60)
    out = tmp_path / "table.md"
    cifar_table3.render(_table3_args(tmp_path, render=str(out)))
    summary = (tmp_path / "table_summary.md").read_text()
    rows = {line.split(" | ")[0]: line for line in summary.splitlines() if line.startswith("| ")}
    # cRT does not depend on the objective: its two seeds fill both objectives' columns
    assert "| 42.0 ± 2.0 | 70.0 ± 0.0 |" in rows["| cRT"]
    assert "| 70.0 | 70.0 |" in rows["| SelMix"]
    assert "| 79.2 | 83.3 |" in rows["| paper: SelMix (backbone fine-tuned)"]
    assert "<!-- summary -->" not in out.read_text()


def test_table3_describes_the_start_split_from_its_config(tmp_path):
    import yaml

    import cifar_table3

    config = {"imbalance": 100.0, "max_per_class": 5000, "val_per_class": 500,
              "head_val_per_class": 50, "train_counts": [4950, 2997, 50], "epochs": 200,
              "lr_schedule": "step", "precision": "bf16"}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    text = cifar_table3.describe_split(str(tmp_path))
    assert "50 validation images of class 0 and 500 of each other class" in text
    assert "training 4950 ... 50 images per class" in text and "200 epochs with the step" in text
    config["head_val_per_class"] = None
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert "before 500 validation images per class" in cifar_table3.describe_split(str(tmp_path))


# -- benchmarks/pretrain_cifar_mislas.py: the second JPEG dose ------------------------------


def test_second_jpeg_dose_changes_pixels_blurs_chroma_and_keeps_shape():
    import torch

    from pretrain_cifar_mislas import second_jpeg_dose

    generator = torch.Generator().manual_seed(0)
    # smooth images (JPEG's case), grey and colour
    base = torch.rand(6, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear")
    colour = (smooth * 255).round().to(torch.uint8)
    grey = colour[:, :1].contiguous()
    for images in (grey, colour):
        twice = second_jpeg_dose(images)
        assert twice.shape == images.shape and twice.dtype == torch.uint8
        rms = (twice.double() - images.double()).pow(2).mean().sqrt()
        assert rms > 0.5
    # the colour dose blurs chroma: the red-green difference loses contrast
    before, after = colour.double(), second_jpeg_dose(colour).double()
    assert (after[:, 0] - after[:, 1]).std() < 0.95 * (before[:, 0] - before[:, 1]).std()
    with pytest.raises(ValueError, match="`images` must be uint8"):
        second_jpeg_dose(colour.float())


# -- benchmarks/finetune_speed.py: interleaved timing rounds -----------------------------------


def test_interleaved_rounds_rotate_the_first_measurement_and_keep_each_rounds_times():
    import finetune_speed

    order, clock = [], iter(range(100))

    def measurement(name: str):
        def run() -> tuple[float, float]:
            order.append(name)
            tick = float(next(clock))
            return tick, tick / 2

        return run

    lines = []
    wall, cpu = finetune_speed.interleaved_rounds(
        {key: measurement(key) for key in "abc"}, 3,
        lambda index, wall: lines.append((index, {k: len(v) for k, v in wall.items()})) or "",
    )  # fmt: skip
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert wall == {"a": [0.0, 5.0, 7.0], "b": [1.0, 3.0, 8.0], "c": [2.0, 4.0, 6.0]}
    assert cpu["b"] == [0.5, 1.5, 4.0]
    assert lines == [(0, dict.fromkeys("abc", 1)), (1, dict.fromkeys("abc", 2)),
                     (2, dict.fromkeys("abc", 3))]  # fmt: skip
