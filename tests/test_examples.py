"""Tests of the scripts in examples/: features files through the CLI, and the own-loop recipe."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

import selmix
from selmix.cli import main as cli_main
from selmix.data import load_data
from selmix.data.formats import load_features_file

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_features_file_encodes_each_split_and_keeps_the_models_head(tmp_path):
    make = load_example("make_features_file")
    torch.manual_seed(0)
    model = selmix.create_model("small_cnn", 10, in_channels=1)
    selmix.save_model(tmp_path / "cnn.pt", model)
    make.main([
        "--checkpoint", str(tmp_path / "cnn.pt"), "--data", "demo",
        "--out", str(tmp_path / "f.npz"), "--head-out", str(tmp_path / "head.pt"),
    ])  # fmt: skip
    splits = load_features_file(tmp_path / "f.npz")
    demo = load_data("demo")
    assert {name: len(data) for name, data in splits.items()} == {
        "train": len(demo.train), "val": len(demo.val), "test": len(demo.test),
    }  # fmt: skip
    assert splits["test"].classes == demo.classes
    head, _ = selmix.load_model(tmp_path / "head.pt")
    model.eval()
    images, _ = demo.test.batch(range(8))
    with torch.no_grad():
        # the linear model on the stored features is the CNN on the images
        torch.testing.assert_close(
            head(splits["test"].features[:8]), model(images), rtol=1e-4, atol=1e-4
        )


def write_separable_features(path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 2

    def split(counts):
        labels = np.repeat(np.arange(4), counts)
        return (centres[labels] + rng.normal(size=(labels.size, 8))).astype(np.float32), labels

    arrays = {}
    for name, counts in (("train", [80, 40, 20, 8]), ("val", [10] * 4), ("test", [30] * 4)):
        arrays[f"{name}_features"], arrays[f"{name}_labels"] = split(counts)
    np.savez(path, **arrays)


def test_features_file_end_to_end_through_the_cli(tmp_path, capsys):
    features = tmp_path / "emb.npz"
    write_separable_features(features)
    quiet = ["--set", "progress=false", "--device", "cpu"]
    assert cli_main(["pretrain", "--data", f"features:{features}", "--model", "linear",
                     "--out", str(tmp_path / "pre"), "--epochs", "2", *quiet]) == 0  # fmt: skip
    assert cli_main(["finetune", "--data", f"features:{features}",
                     "--checkpoint", str(tmp_path / "pre" / "model.pt"),
                     "--out", str(tmp_path / "ft"), "--objective", "min_recall", "--steps", "60",
                     "--feedback-every", "10", "--frozen-backbone", *quiet]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    # the CE head neglects the rarest class; SelMix for min recall lifts it
    assert metrics["after"]["min_recall"] > metrics["before"]["min_recall"] + 0.2
    log = (tmp_path / "ft" / "log.jsonl").read_text().splitlines()
    assert len(log) == 7
    model, _ = selmix.load_model(tmp_path / "ft" / "model.pt")
    assert model.selmix_spec["name"] == "linear" and model.head.in_features == 8


def test_own_loop_example_improves_the_objective_on_the_demo_data(capsys):
    own_loop = load_example("own_loop")
    history = own_loop.main(["--fast", "--seed", "0"])
    assert [r["step"] for r in history] == [0, 10, 20, 30, 40]
    assert history[-1]["objective"] > history[0]["objective"] + 0.03
    assert "validation objective (mean_recall)" in capsys.readouterr().out


def test_own_loop_example_can_train_the_backbone_too():
    own_loop = load_example("own_loop")
    data = load_data("demo", max_per_class=300, imbalance=100.0)
    torch.manual_seed(0)
    model = selmix.create_model("small_cnn", 10, in_channels=1)
    before = [p.detach().clone() for p in model.features.parameters()]
    own_loop.selmix_loop(model, data.train, data.val, steps=2, train_backbone=True)
    after = list(model.features.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_own_loop_frozen_leaves_the_backbone_alone():
    own_loop = load_example("own_loop")
    data = load_data("demo", max_per_class=300, imbalance=100.0)
    torch.manual_seed(0)
    model = selmix.create_model("small_cnn", 10, in_channels=1)
    before = [p.detach().clone() for p in model.features.parameters()]
    head_before = model.head.weight.detach().clone()
    own_loop.selmix_loop(model, data.train, data.val, steps=2, train_backbone=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.features.parameters(), strict=True))
    assert not torch.equal(head_before, model.head.weight)


def test_saliency_mix_puts_the_box_on_the_salient_pixel_of_x2():
    saliency_mix = load_example("saliency_mix")
    first = torch.zeros(3, 1, 28, 28)
    second = torch.zeros(3, 1, 28, 28)
    spots = [(5, 20), (27, 0), (14, 14)]
    for image, (row, col) in zip(second, spots, strict=True):
        image[0, row, col] = 10.0
    lam = torch.tensor([0.75, 0.75, 0.96])
    for labels in ("first", "mixed"):
        mixed = saliency_mix.SaliencyCutMix(labels)(first, second, lam, torch.Generator())
        for image, (row, col) in zip(mixed.inputs, spots, strict=True):
            assert image[0, row, col] == 10.0  # the salient pixel was pasted
        if labels == "mixed":
            # 14 x 14 boxes (rows c - 7 .. c + 6) clipped at the border: rows 0..11 and
            # columns 13..26 for (5, 20), rows 20..27 and columns 0..6 for the corner;
            # 5 x 5 for lam = 0.96
            expected = 1 - torch.tensor([12 * 14, 8 * 7, 25.0]) / 784
            torch.testing.assert_close(mixed.first_weight, expected)
        else:
            assert mixed.first_weight is None


def test_saliency_mix_example_fine_tunes_the_whole_model_with_it(capsys):
    saliency_mix = load_example("saliency_mix")
    result = saliency_mix.main(["--fast", "--seed", "0"])
    assert result.config.mixup == "saliency_cutmix" and not result.config.frozen_backbone
    assert "mixup: saliency_cutmix" in capsys.readouterr().out
    assert result.history[-1]["step"] == 20
