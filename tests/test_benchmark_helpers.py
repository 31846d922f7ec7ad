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


# -- benchmarks/start_factors.py: the JPEG cost and the gap to the paper's start ------------


def test_start_factors_jpeg_cost_pairs_seeds_and_skips_an_unpaired_one(tmp_path, monkeypatch):
    import json

    import start_factors

    def write(seed, jpeg, mean, low, tail):
        record = {"seed": seed, "jpeg": jpeg, "mean_recall": mean, "min_recall": low,
                  "tail3_recall": tail}  # fmt: skip
        (tmp_path / f"s{seed}_{jpeg}.json").write_text(json.dumps(record))

    monkeypatch.setattr(start_factors, "JPEG_RECORDS", tmp_path)
    assert start_factors.jpeg_cost() is None
    write(0, False, 0.70, 0.10, 0.50)
    write(0, True, 0.68, 0.06, 0.47)
    write(1, False, 0.72, 0.12, 0.52)
    write(1, True, 0.71, 0.12, 0.50)
    write(2, True, 0.10, 0.00, 0.00)  # its original run is missing: not a pair
    cost = start_factors.jpeg_cost()
    assert cost["seeds"] == 2
    assert cost["mean_recall"] == pytest.approx(-0.015)
    assert cost["min_recall"] == pytest.approx(-0.02)
    assert cost["tail3_recall"] == pytest.approx(-0.025)


def test_start_factors_jpeg_cost_of_the_second_dose_pairs_doses_one_and_two(tmp_path, monkeypatch):
    import json

    import start_factors

    def write(seed, dose, mean):
        record = {"seed": seed, "jpeg": dose > 0, "mean_recall": mean, "min_recall": mean / 2,
                  "tail3_recall": mean / 4}  # fmt: skip
        if dose == 2:  # records from before the second dose carry only `jpeg`
            record["dose"] = 2
        (tmp_path / f"s{seed}_{dose}.json").write_text(json.dumps(record))

    monkeypatch.setattr(start_factors, "JPEG_RECORDS", tmp_path)
    for seed, means in ((0, (0.70, 0.68, 0.60)), (1, (0.72, 0.71, 0.65))):
        for dose, mean in enumerate(means):
            write(seed, dose, mean)
    write(2, 1, 0.5)  # no dose-2 record: counts for the first dose only
    write(2, 0, 0.5)
    first, second = start_factors.jpeg_cost(1), start_factors.jpeg_cost(2)
    assert first["seeds"] == 3 and second["seeds"] == 2
    assert first["mean_recall"] == pytest.approx((-0.02 - 0.01 + 0.0) / 3)
    assert second["mean_recall"] == pytest.approx((-0.08 - 0.06) / 2)
    assert second["min_recall"] == pytest.approx((-0.04 - 0.03) / 2)


def test_second_jpeg_dose_changes_pixels_blurs_chroma_and_keeps_shape():
    import torch

    import jpeg_cost

    generator = torch.Generator().manual_seed(0)
    # smooth images (JPEG's case), grey and colour
    base = torch.rand(6, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear")
    colour = (smooth * 255).round().to(torch.uint8)
    grey = colour[:, :1].contiguous()
    for images in (grey, colour):
        once = jpeg_cost.jpeg(images) if images.shape[1] == 1 else images
        twice = jpeg_cost.second_jpeg_dose(once)
        assert twice.shape == once.shape and twice.dtype == torch.uint8
        assert jpeg_cost.rms_difference(once, twice) > 0.5
    # the colour dose blurs chroma: the red-green difference loses contrast
    before, after = colour.double(), jpeg_cost.second_jpeg_dose(colour).double()
    assert (after[:, 0] - after[:, 1]).std() < 0.95 * (before[:, 0] - before[:, 1]).std()
    with pytest.raises(ValueError, match="`images` must be uint8"):
        jpeg_cost.second_jpeg_dose(colour.float())
    assert jpeg_cost.dose_of({"jpeg": True}) == 1
    assert jpeg_cost.dose_of({"jpeg": False}) == 0
    assert jpeg_cost.dose_of({"jpeg": True, "dose": 2}) == 2


def test_start_factors_gap_table_subtracts_the_measured_parts_from_each_start():
    import start_factors

    curves = {
        "val_mean_recall_per_epoch": [0.50, 0.70, 0.60, 0.65],
        "val_min_recall_per_epoch": [0.10, 0.30, 0.40, 0.20],
    }
    records = {
        "ours200-bf16-cos": {"test": {"mean_recall": 0.655, "min_recall": 0.328}, **curves},
        "ours200-bf16-step-head4950": {"test": {"mean_recall": 0.700, "min_recall": 0.400}},
    }
    cost = {"mean_recall": -0.005, "min_recall": -0.008, "tail3_recall": 0.0, "seeds": 3}
    lines = start_factors.gap_table(records, cost)
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in lines if line.startswith("| ")}
    # gap 7.2 / 12.8; best epoch 2: +5.0 / +10.0; JPEG +0.5 / +0.8; left 1.7 / 2.0
    assert rows["| ours200-bf16-cos"] == [
        "65.5 / 32.8", "+7.2 / +12.8", "+5.0 / +10.0 (epoch 2)", "+0.5 / +0.8", "–",
        "+1.7 / +2.0", "–", "– |",
    ]  # fmt: skip
    # no per-epoch curves: only the JPEG part is subtracted
    assert rows["| ours200-bf16-step-head4950"] == [
        "70.0 / 40.0", "+2.7 / +5.6", "–", "+0.5 / +0.8", "–", "+2.2 / +4.8", "–", "– |",
    ]  # fmt: skip
    # the CIFAR second dose costs 2.0 / 3.0: the estimate, subtracted in its own column
    records[start_factors.JPEG_SECOND_DOSE_RUN] = {
        "test": {"mean_recall": 0.680, "min_recall": 0.370}
    }
    assert start_factors.jpeg_second_dose_cost(records) == {
        "mean_recall": pytest.approx(-0.02),
        "min_recall": pytest.approx(-0.03),
    }
    lines = start_factors.gap_table(records, cost)
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in lines if line.startswith("| ")}
    assert rows["| ours200-bf16-cos"][4:7] == ["+2.0 / +3.0", "+1.7 / +2.0", "+0.2 / -0.2"]
    assert rows["| ours200-bf16-step-head4950"][4:7] == [
        "+2.0 / +3.0", "+2.2 / +4.8", "+0.7 / +2.6",
    ]  # fmt: skip
    del records["ours200-bf16-step-head4950"]
    assert start_factors.jpeg_second_dose_cost(records) is None
    lines = start_factors.gap_table(records, None)
    assert "| ours200-bf16-step-head4950 | not run | | | | | | | |" in lines
    # the range over the last 20 epochs
    record = {"val_mean_recall_per_epoch": [0.1] * 5 + [0.60, 0.64] * 10,
              "val_min_recall_per_epoch": [0.0] * 5 + [0.20, 0.35] * 10}  # fmt: skip
    assert start_factors.last_epochs_range(record) == "4.0 / 15.0"


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


def test_start_factors_best_epoch_gain_is_measured_at_the_best_mean_recall_epoch():
    import start_factors

    record = {
        "val_mean_recall_per_epoch": [0.50, 0.70, 0.60, 0.65],
        "val_min_recall_per_epoch": [0.10, 0.30, 0.40, 0.20],
    }
    gain = start_factors.best_epoch_gain(record)
    assert gain["epoch"] == 2
    assert gain["mean_recall"] == pytest.approx(0.05)
    assert gain["min_recall"] == pytest.approx(0.10)  # at epoch 2, not the min curve's best
    assert start_factors.best_epoch_gain({"val_mean_recall_per_epoch": [0.5]}) is None


def test_start_factors_seed_mean_row_and_seed_table_average_the_seeds():
    import start_factors

    def record(mean: float, minimum: float, seed: int) -> dict:
        recall = [0.9] * 7 + [minimum, 0.5, 0.6]
        return {
            "seed": seed,
            "test": {"mean_recall": mean, "min_recall": minimum, "tail3_recall": 0.5,
                     "per_class_recall": recall},
            "val": {"mean_recall": mean, "min_recall": minimum},
            "val_mean_recall_per_epoch": [mean - 0.01, mean],
            "val_min_recall_per_epoch": [minimum + 0.02, minimum],
        }  # fmt: skip

    seeds = (record(0.66, 0.30, 0), record(0.68, 0.36, 1), record(0.64, 0.33, 2))
    records = dict(zip(start_factors.SEED_RUNS, seeds, strict=True))
    lines = start_factors.gap_table(records, None)
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in lines if line.startswith("| ")}
    # mean of the seeds 66.0 / 33.0 against the paper's 72.7 / 45.6; each seed's last epoch
    # is its best by mean recall, so the pick gains nothing
    assert rows["| step, class 0 at 4950: mean of 3 seeds"][:4] == [
        "66.0 / 33.0", "+6.7 / +12.6", "+0.0 / +0.0 (epoch 2, 2, 2)", "–",
    ]  # fmt: skip
    assert "| ours200-bf16-cos | not run | | | | | | | |" in lines
    seed_rows = [line for line in lines if line.startswith("| ours200-bf16-step-head4950-s")]
    assert [row.split(" | ")[1] for row in seed_rows] == ["1", "2"]
    assert "| 7 |" in seed_rows[0]  # the worst class is the one at min recall
    assert "| mean ± sd over seeds | | 66.0 ± 2.0 | 33.0 ± 3.0 | 50.0 ± 0.0 | | | |" in lines
    # one seed alone: no mean row and no seed table
    one = {start_factors.SEED_RUNS[0]: records[start_factors.SEED_RUNS[0]]}
    assert not any(line.startswith(("| step, class 0", "| mean ± sd"))
                   for line in start_factors.gap_table(one, None))  # fmt: skip


def test_jpeg_cost_names_the_quality_of_standard_tables():
    import io

    from PIL import Image

    import jpeg_cost

    for quality in (60, 75):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 40, 90)).save(buffer, format="JPEG", quality=quality)
        image = Image.open(buffer)
        assert jpeg_cost._standard_quality(image) == quality
        luma, chroma = jpeg_cost._table_means(image)
        assert chroma > luma  # the standard chroma table is coarser
