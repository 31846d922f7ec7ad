"""A starting model's own preprocessing (#37): its input size and normalisation are used,
recorded in config.yaml and model.pt and named on the console; `--image-size` resizes
trees of mixed sizes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selmix.cli import main
from selmix.data import load_data
from selmix.models.checkpoint import load_checkpoint
from selmix.models.preprocessing import (
    Preprocessing,
    hf_preprocessing,
    model_preprocessing,
    resolve_preprocessing,
    torchvision_preprocessing,
)

torch.set_num_threads(1)
QUIET = ["--set", "progress=false"]
MEAN = [0.25, 0.5, 0.75]  # far from ImageNet's and from the tree's own statistics
STD = [0.125, 0.25, 0.375]


def write_tree(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """root/{train,test}/class_k/*.png, 3 colour classes; image i has sizes[i % len]."""
    rng = np.random.default_rng(0)
    colours = ((220, 40, 40), (40, 200, 60), (50, 70, 230))
    for split, counts in (("train", (14, 10, 8)), ("test", (4, 4, 4))):
        for label, (colour, count) in enumerate(zip(colours, counts, strict=True)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                width, height = sizes[index % len(sizes)]
                noise = rng.normal(0, 40, (height, width, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("prep") / "images", [(16, 16)])


def finetune(tree: Path, out: Path, *extra: str) -> int:
    return main(["finetune", "--data", f"imagefolder:{tree}", "--val-per-class", "2",
                 "--device", "cpu", "--out", str(out), "--steps", "2", "--batch-size", "8",
                 "--set", "feedback_every=1", *extra, *QUIET])  # fmt: skip


def recorded(out: Path) -> dict:
    """The `# preprocessing KEY: JSON` comment lines of a run's config.yaml."""
    found = {}
    for line in (out / "config.yaml").read_text().splitlines():
        if line.startswith("# preprocessing "):
            key, _, value = line[len("# preprocessing ") :].partition(": ")
            found[key] = json.loads(value)
    return found


def tree_stats(tree: Path) -> list[float]:
    return load_data(f"imagefolder:{tree}", val_per_class=2).train.mean.tolist()


def test_timm_pretrained_cfg_sets_normalisation_and_size(
    tree: Path, tmp_path: Path, capsys
) -> None:
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(
        "test_resnet", num_classes=3,
        pretrained_cfg_overlay={"mean": tuple(MEAN), "std": tuple(STD), "input_size": (3, 20, 20),
                                "interpolation": "bicubic"},
    )  # fmt: skip
    save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    weights = tmp_path / "timm" / "model.safetensors"
    out = tmp_path / "run"
    assert finetune(tree, out, "--model", "timm:test_resnet", "--checkpoint", str(weights)) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("preprocessing:")]
    assert len(line) == 1 and "timm pretrained_cfg" in line[0] and "20x20" in line[0]
    notes = recorded(out)
    assert notes["mean"] == pytest.approx(MEAN) and notes["std"] == pytest.approx(STD)
    assert notes["image_size"] == [20, 20]
    assert notes["model_interpolation"] == model.pretrained_cfg["interpolation"] == "bicubic"
    assert notes["resize"] == "bicubic"  # the model's own resize, applied
    meta = load_checkpoint(out / "model.pt")["meta"]
    # the data were normalised with the model's statistics, not the tree's own
    assert meta["mean"] == pytest.approx(MEAN) and meta["std"] == pytest.approx(STD)
    assert tree_stats(tree) != pytest.approx(MEAN, abs=0.05)
    # with --preprocessing data the tree's own statistics come back
    out_data = tmp_path / "run_data"
    assert finetune(tree, out_data, "--model", "timm:test_resnet", "--checkpoint", str(weights),
                    "--preprocessing", "data") == 0  # fmt: skip
    assert recorded(out_data)["mean"] == "data statistics"
    data_meta = load_checkpoint(out_data / "model.pt")["meta"]
    assert data_meta["mean"] == pytest.approx(tree_stats(tree))
    # model.pt carries it on: evaluate normalises as the run did and reports its metrics
    evaluated = tmp_path / "evaluate"
    assert main(["evaluate", "--data", f"imagefolder:{tree}", "--val-per-class", "2",
                 "--device", "cpu", "--checkpoint", str(out / "model.pt"),
                 "--out", str(evaluated)]) == 0  # fmt: skip
    test = json.loads((evaluated / "metrics.json").read_text())["test"]
    assert test == json.loads((out / "metrics.json").read_text())["after"]
    assert recorded(evaluated)["resize"] == "bicubic"  # the resize model.pt carries on


def test_hugging_face_processor_sets_normalisation(tree: Path, tmp_path: Path, capsys) -> None:
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=3,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    processor = transformers.ViTImageProcessor(
        image_mean=MEAN, image_std=STD, size={"height": 16, "width": 16}
    )
    processor.save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    assert finetune(tree, out, "--checkpoint", f"hf:{tmp_path / 'vit'}") == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("preprocessing:")]
    assert len(line) == 1 and "Hugging Face image processor" in line[0]
    notes = recorded(out)
    assert notes["mean"] == pytest.approx(MEAN) and notes["std"] == pytest.approx(STD)
    assert notes["image_size"] == [16, 16]
    assert notes["source"].endswith("preprocessor_config.json)")
    meta = load_checkpoint(out / "model.pt")["meta"]
    assert meta["mean"] == pytest.approx(MEAN)
    # a baseline from the same folder is normalised the same way, so the two compare
    baseline_out = tmp_path / "baseline"
    argv = ["baseline", "--data", f"imagefolder:{tree}", "--val-per-class", "2", "--device",
            "cpu", "--checkpoint", f"hf:{tmp_path / 'vit'}", "--method", "posthoc_la",
            "--out", str(baseline_out), "--set", "progress=false"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert line[0] in printed
    assert any(x.startswith("verdict: min recall ") for x in printed)
    baseline_meta = load_checkpoint(baseline_out / "model.pt")["meta"]
    assert baseline_meta["preprocessing"]["mean"] == pytest.approx(MEAN)
    assert recorded(baseline_out) == notes  # and its config.yaml records it too


def test_a_model_without_preprocessing_keeps_the_data_statistics(
    tree: Path, tmp_path: Path
) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    save_file(
        timm.create_model("test_resnet", num_classes=3).state_dict(),
        str(tmp_path / "w.safetensors"),
    )
    out = tmp_path / "run"
    assert finetune(tree, out, "--model", "timm:test_resnet", "--checkpoint",
                    str(tmp_path / "w.safetensors")) == 0  # fmt: skip
    assert recorded(out)["source"] == "data statistics"
    assert load_checkpoint(out / "model.pt")["meta"]["mean"] == pytest.approx(tree_stats(tree))
    # 'model' asks for the model's and takes timm's default for the architecture
    prep = resolve_preprocessing("model", tmp_path / "w.safetensors", "timm:test_resnet")
    assert prep.from_model and prep.source.startswith("timm pretrained_cfg (timm default")


@pytest.mark.parametrize("stream", ["memory", "disk"])
def test_mixed_image_sizes_run_with_image_size(tmp_path: Path, stream: str, capsys) -> None:
    mixed = write_tree(tmp_path / "mixed", [(16, 16), (24, 12), (10, 20)])
    from selmix.models import create_model
    from selmix.models.checkpoint import save_model

    save_model(tmp_path / "start.pt", create_model("small_cnn", 3, in_channels=3),
               {"classes": ["class_0", "class_1", "class_2"]})  # fmt: skip
    common = ["--checkpoint", str(tmp_path / "start.pt"), "--stream", stream,
              "--num-workers", "0"]  # fmt: skip
    # without it: one line naming the setting, exit 2
    assert finetune(mixed, tmp_path / "refused", *common) == 2
    assert "image_size" in capsys.readouterr().err
    out = tmp_path / "run"
    assert finetune(mixed, out, *common, "--image-size", "12") == 0
    assert "images resized to 12x12" in capsys.readouterr().out
    assert recorded(out)["image_size"] == [12, 12]
    assert json.loads((out / "metrics.json").read_text())["after"]


def test_image_size_overrides_the_model_and_unresizable_data_keep_their_size(
    tmp_path: Path,
) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": MEAN, "image_std": STD, "size": {"height": 20, "width": 20}})
    )
    checkpoint = f"hf:{tmp_path}"
    chosen = resolve_preprocessing("auto", checkpoint, image_size=12)
    assert (chosen.image_size, chosen.model_image_size) == ((12, 12), (20, 20))
    assert chosen.describe().endswith(
        "images resized to 12x12 (bilinear) (the model's input size is 20x20)"
    )
    kept = resolve_preprocessing("auto", checkpoint, resizable=False)
    assert (kept.image_size, kept.model_image_size) == (None, (20, 20))
    assert kept.mean == pytest.approx(MEAN)  # the normalisation applies to every source
    assert kept.to_dict()["image_size"] == "native"
    with pytest.raises(ValueError, match=r"`image_size` must be an int >= 1 or \[H, W\], got 0"):
        resolve_preprocessing("auto", checkpoint, image_size=0)


def test_torchvision_weights_are_known_by_their_download_name(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    found = torchvision_preprocessing("resnet18", tmp_path / "resnet18-f37072fd.pth")
    assert found is not None and found.source == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    assert found.image_size == (224, 224) and found.mean == pytest.approx((0.485, 0.456, 0.406))
    assert found.crop_pct == pytest.approx(224 / 256)
    assert torchvision_preprocessing("resnet18", tmp_path / "mine.pth") is None
    auto = model_preprocessing(tmp_path / "mine.pth", "torchvision:resnet18")
    assert auto is None


def test_a_processor_without_normalisation_maps_to_identity(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"do_normalize": False, "size": {"shortest_edge": 24}, "resample": 3})
    )
    found = hf_preprocessing(tmp_path)
    assert found is not None
    assert (found.mean, found.std, found.image_size) == ((0.0,), (1.0,), (24, 24))
    assert found.interpolation == "bicubic"


def test_bad_choices_and_inputs_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="`preprocessing` must be one of auto, model, data, got 'x'"
    ):
        resolve_preprocessing("x", tmp_path / "m.pt")
    with pytest.raises(ValueError, match="`preprocessing` is 'model' but `checkpoint`"):
        resolve_preprocessing("model", tmp_path / "m.pt", "small_cnn")
    with pytest.raises(ValueError, match="`image_size` applies to imagefolder:DIR data only"):
        load_data("demo", image_size=16)
    with pytest.raises(ValueError, match="`normalization` mean must be 1 finite value"):
        load_data("demo", normalization=([0.1, 0.2, 0.3], [1.0, 1.0, 1.0]))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5], "image_std": [0]})
    )
    with pytest.raises(ValueError, match="`std` must be > 0"):
        hf_preprocessing(tmp_path)


def test_normalization_replaces_the_data_statistics() -> None:
    plain = load_data("demo", val_per_class=5)
    changed = load_data("demo", val_per_class=5, normalization=([0.5], [0.25]))
    for name in ("train", "val", "test"):
        assert getattr(changed, name).mean.tolist() == [0.5]
    images, _ = plain.test.batch(range(4))
    again, _ = changed.test.batch(range(4))
    raw = images * plain.test.std.view(1, -1, 1, 1) + plain.test.mean.view(1, -1, 1, 1)
    assert torch.allclose(again, (raw - 0.5) / 0.25, atol=1e-4)


class MixedReader(torch.utils.data.Dataset):
    """Items of two sizes, as a tree whose header sample missed the odd ones gives."""

    def __getitem__(self, item: tuple) -> torch.Tensor:
        side = 8 if item[0] % 5 else 6
        return torch.zeros(3, side, side, dtype=torch.uint8)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_streamed_batch_of_mixed_sizes_names_image_size(num_workers: int) -> None:
    from selmix.data.streaming import WorkerPool

    pool = WorkerPool(MixedReader(), num_workers)
    try:
        assert pool.load([(1, False, None), (2, False, None)]).shape == (2, 3, 8, 8)
        with pytest.raises(ValueError, match=r"differ in size \(3x6x6 and 3x8x8, C x H x W\); "
                           r"pass `image_size` \(--image-size N\)"):  # fmt: skip
            pool.load([(row, False, None) for row in range(6)])
    finally:
        pool.close()


def test_normalization_reaches_the_unlabelled_pool(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "images", [(8, 8)])
    splits = load_data(f"imagefolder:{root}", val_per_class=2, max_per_class=4,
                       unlabelled_max_per_class=2, normalization=(MEAN, STD))  # fmt: skip
    assert splits.unlabelled is not None
    assert splits.unlabelled.mean.tolist() == pytest.approx(MEAN)
    assert splits.unlabelled.std.tolist() == pytest.approx(STD)
    assert splits.train.mean.tolist() == pytest.approx(MEAN)


# -- what of the model's preprocessing is applied, and what is only recorded --------------------
def test_a_real_timm_config_resizes_bicubic_and_names_the_crop_it_does_not_apply() -> None:
    """timm's resnet18 (no download: pretrained=False carries the pretrained_cfg) expects a
    bicubic resize and a 0.95 centre crop; the run resizes whole images bicubic, does not
    crop, and its console line says so."""
    timm = pytest.importorskip("timm")
    from selmix.models.preprocessing import timm_preprocessing

    cfg = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    chosen = timm_preprocessing(cfg, "resnet18")
    assert chosen.image_size == (224, 224)
    assert (chosen.interpolation, chosen.crop_pct) == (cfg["interpolation"], cfg["crop_pct"])
    assert chosen.mean == pytest.approx(cfg["mean"]) and chosen.std == pytest.approx(cfg["std"])
    line = chosen.describe()
    assert "images resized to 224x224 (bicubic)" in line
    assert line.endswith("not applied: its centre crop 0.95 (recorded)")
    saved = chosen.to_dict()
    assert (saved["resize"], saved["model_interpolation"], saved["model_crop_pct"]) == (
        "bicubic", "bicubic", 0.95)  # fmt: skip
    # the data's own statistics: the model's resize is not used either
    data = dataclasses.replace(chosen, mean=None, std=None)
    assert data.resize == "bilinear" and "(bilinear)" in data.describe()


@pytest.mark.parametrize(
    "processor, kwargs, interpolation, crop, not_applied",
    [
        ("ConvNextImageProcessor", {}, "bicubic", 0.875,
         "not applied: its centre crop 0.875 (recorded)"),
        ("CLIPImageProcessor", {}, "bicubic", 1.0, None),
        ("ViTImageProcessor", {}, "bilinear", None, None),
    ],
)  # fmt: skip
def test_a_saved_hugging_face_processor_names_what_is_not_applied(
    processor: str, kwargs: dict, interpolation: str, crop: float | None,
    not_applied: str | None, tmp_path: Path,
) -> None:  # fmt: skip
    transformers = pytest.importorskip("transformers")
    made = getattr(transformers, processor)(**kwargs)
    made.save_pretrained(tmp_path)
    chosen = hf_preprocessing(tmp_path)
    assert chosen is not None
    assert chosen.mean == pytest.approx(made.image_mean)
    assert chosen.std == pytest.approx(made.image_std)
    assert (chosen.interpolation, chosen.crop_pct) == (interpolation, crop)
    line = chosen.describe()
    if not_applied is None:
        assert "not applied" not in line, line
    else:
        assert line.endswith(not_applied), line


# -- the model's resize method, applied on every decoding path ---------------------------------
def test_interpolation_resizes_with_that_pil_filter_in_memory_streamed_and_cached(
    tmp_path: Path,
) -> None:
    from selmix.data.image_folder import load_image_folder

    root = write_tree(tmp_path / "images", [(16, 12)])
    first = root / "train" / "class_0" / "0.png"  # sample 0: classes, then names, sorted
    with Image.open(first) as image:
        bicubic = np.asarray(image.convert("RGB").resize((8, 6), Image.Resampling.BICUBIC))
        bilinear = np.asarray(image.convert("RGB").resize((8, 6), Image.Resampling.BILINEAR))
    assert np.abs(bicubic.astype(int) - bilinear.astype(int)).max() > 0  # they differ here

    def load(interpolation: str, **options) -> dict:
        return load_image_folder(root, (6, 8), interpolation=interpolation, **options)

    in_memory = load("bicubic", stream=False)["train"]
    assert in_memory.images[0].permute(1, 2, 0).numpy().tolist() == bicubic.tolist()
    plain = load("bilinear", stream=False)["train"]
    assert plain.images[0].permute(1, 2, 0).numpy().tolist() == bilinear.tolist()
    # the streamed tree decodes the same pixels, so it serves the same batches
    streamed = load("bicubic", stream=True, num_workers=0)["train"]
    assert torch.equal(streamed.batch([0, 5])[0], in_memory.batch([0, 5])[0])
    # each method has its own cache file; reading one back gives its own pixels
    cache = tmp_path / "cache"
    for method, expected in (("bilinear", bilinear), ("bicubic", bicubic), ("bicubic", bicubic)):
        images = load(method, stream=False, cache_dir=cache)["train"].images
        assert images[0].permute(1, 2, 0).numpy().tolist() == expected.tolist()
    assert len(list(cache.glob("imagefolder-*.npz"))) == 2


def test_interpolation_is_validated_where_it_enters(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "images", [(8, 8)])
    unknown = r"unknown `interpolation` 'cubic'; expected one of .*bicubic"
    with pytest.raises(ValueError, match=unknown):
        load_data(f"imagefolder:{root}", val_per_class=2, image_size=4, interpolation="cubic")
    with pytest.raises(ValueError, match="`interpolation` applies to imagefolder:DIR data only"):
        load_data("demo", interpolation="bicubic")
    # a model whose interpolation PIL does not have ("random") is resized bilinear and says so
    chosen = Preprocessing("a model", (0.5,), (0.5,), (4, 4), interpolation="random")
    assert chosen.resize == "bilinear"
    assert chosen.describe().endswith("not applied: its random resize (recorded)")
