"""Starting models from other libraries' files, through `selmix finetune` and back (#26).

Each route writes a model the way its library does (a torchvision state dict, timm weights in
safetensors, a Hugging Face save_pretrained folder, a checkpoint written by Lightning's own
Trainer), fine-tunes it with `selmix finetune ... --export`, loads the exported files back
with that library and checks that its logits are the fine-tuned model's (the one selmix
saved in model.pt) on the same inputs, and that `selmix evaluate` on the exported file gives
the test metrics the run reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import selmix
from selmix.cli import main
from selmix.data import load_data
from selmix.models.checkpoint import load_checkpoint

torch.set_num_threads(1)
QUIET = ["--set", "progress=false"]
SIZE = 16  # image side; the ViT below has image_size 16


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{train,test}/class_k/*.png: 3 colour classes, long-tailed train counts."""
    root = tmp_path_factory.mktemp("formats") / "images"
    rng = np.random.default_rng(0)
    colours = ((220, 40, 40), (40, 200, 60), (50, 70, 230))
    for split, counts in (("train", (24, 16, 12)), ("test", (6, 6, 6))):
        for label, (colour, count) in enumerate(zip(colours, counts, strict=True)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                noise = rng.normal(0, 40, (SIZE, SIZE, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def data_args(tree: Path) -> list[str]:
    return ["--data", f"imagefolder:{tree}", "--val-per-class", "3", "--device", "cpu"]


def finetune_args(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", *data_args(tree), "--out", str(out), "--steps", "4", "--batch-size", "8",
            "--set", "feedback_every=2", "--select", "last", *extra, *QUIET]  # fmt: skip


def selmix_inputs(tree: Path) -> torch.Tensor:
    """The test images exactly as selmix feeds them to the model (normalised)."""
    test = load_data(f"imagefolder:{tree}", val_per_class=3).test
    images, _ = test.batch(range(len(test)))
    return images


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return selmix.models.output_tensor(model(images))


def selmix_logits(out: Path, images: torch.Tensor) -> torch.Tensor:
    """The logits of the model selmix returned, rebuilt from its model.pt."""
    model, _ = selmix.load_model(out / "model.pt")
    return logits(model, images)


def evaluated(tree: Path, tmp: Path, *checkpoint: str) -> dict:
    """`selmix evaluate`'s test metrics of a model named as --checkpoint [--model] name it."""
    out = tmp / "evaluate"
    assert main(["evaluate", *data_args(tree), *checkpoint, "--out", str(out),
                 "--overwrite"]) == 0
    return json.loads((out / "metrics.json").read_text())["test"]


def reported(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["after"]


def changed(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(start[key], end[key]) for key in start)


# -- the four routes ----------------------------------------------------------------------------
def test_torchvision_resnet18_state_dict_in_and_out(tree: Path, tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import load_file

    torch.manual_seed(0)
    start = torchvision.models.resnet18(num_classes=3)
    torch.save(start.state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "run"
    start_args = ["--model", "torchvision:resnet18", "--checkpoint", str(tmp_path / "r18.pth")]
    assert main(finetune_args(tree, out, *start_args, "--export", "safetensors,state_dict")) == 0
    images = selmix_inputs(tree)
    expected = selmix_logits(out, images)
    for state in (
        torch.load(out / "model_state_dict.pt", weights_only=True),
        load_file(str(out / "model.safetensors")),
    ):
        back = torchvision.models.resnet18(num_classes=3)
        back.load_state_dict(state)  # strict: the keys are torchvision's own
        assert torch.equal(logits(back, images), expected)
        assert changed(start.state_dict(), state), "the export is the starting model"
    # and back in: the exported file is a starting point like the original
    again = evaluated(tree, tmp_path, "--model", "torchvision:resnet18", "--checkpoint",
                      str(out / "model.safetensors"))  # fmt: skip
    assert again == reported(out)
    # model.pt names its architecture, so it needs no --model
    assert evaluated(tree, tmp_path, "--checkpoint", str(out / "model.pt")) == reported(out)


def test_timm_model_in_safetensors_in_and_out(tree: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    start = timm.create_model("test_resnet", num_classes=3)
    save_file(start.state_dict(), str(tmp_path / "start.safetensors"))
    out = tmp_path / "run"
    start_args = [
        "--model",
        "timm:test_resnet",
        "--checkpoint",
        str(tmp_path / "start.safetensors"),
    ]
    assert main(finetune_args(tree, out, *start_args, "--export", "safetensors")) == 0
    assert not (out / "model_state_dict.pt").exists()  # only what was asked for
    images = selmix_inputs(tree)
    back = timm.create_model("test_resnet", num_classes=3)
    state = load_file(str(out / "model.safetensors"))
    back.load_state_dict(state)
    assert changed(start.state_dict(), state)
    assert torch.equal(logits(back, images), selmix_logits(out, images))
    again = evaluated(tree, tmp_path, "--model", "timm:test_resnet", "--checkpoint",
                      str(out / "model.safetensors"))  # fmt: skip
    assert again == reported(out)


def test_hugging_face_vit_folder_in_and_out(tree: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=3,
        id2label={0: "class_0", 1: "class_1", 2: "class_2"},
        label2id={"class_0": 0, "class_1": 1, "class_2": 2},
    )  # fmt: skip
    start = transformers.ViTForImageClassification(config)
    start.save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    assert main(finetune_args(tree, out, "--checkpoint", f"hf:{tmp_path / 'vit'}",
                              "--export", "hf,safetensors")) == 0  # fmt: skip
    images = selmix_inputs(tree)
    # selmix's fine-tuned weights (model.pt) in the starting architecture
    fine_tuned = transformers.ViTForImageClassification.from_pretrained(tmp_path / "vit")
    fine_tuned.load_state_dict(load_checkpoint(out / "model.pt")["state_dict"])
    expected = logits(fine_tuned, images)
    back = transformers.ViTForImageClassification.from_pretrained(out / "hf", local_files_only=True)
    assert torch.equal(logits(back, images), expected)
    assert back.config.id2label == start.config.id2label
    assert changed(start.state_dict(), back.state_dict())
    from_safetensors = transformers.ViTForImageClassification(config)
    from_safetensors.load_state_dict(load_file(str(out / "model.safetensors")))
    assert torch.equal(logits(from_safetensors, images), expected)
    assert evaluated(tree, tmp_path, "--checkpoint", f"hf:{out / 'hf'}") == reported(out)
    # selmix's own model.pt records the configuration, so it rebuilds without the folder
    assert torch.equal(selmix_logits(out, images), expected)
    assert evaluated(tree, tmp_path, "--checkpoint", str(out / "model.pt")) == reported(out)


def test_lightning_checkpoint_in_and_out(tree: Path, tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")
    from safetensors.torch import load_file

    class Classifier(lightning.LightningModule):
        """A LightningModule as users write them: the network under `self.model`, a loss
        with a class-weight buffer beside it."""

        def __init__(self) -> None:
            super().__init__()
            self.model = selmix.create_model("small_cnn", 3)
            self.loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: tuple, index: int) -> torch.Tensor:
            return self.loss(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, SIZE, SIZE), torch.arange(8) % 3)
    trainer = lightning.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    start = Classifier()
    trainer.fit(start, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "lit.ckpt")
    start_state = {k: v.clone() for k, v in start.state_dict().items()}

    out = tmp_path / "run"
    start_args = ["--model", "small_cnn", "--checkpoint", str(tmp_path / "lit.ckpt")]
    assert main(finetune_args(tree, out, *start_args, "--export", "safetensors,state_dict")) == 0
    images = selmix_inputs(tree)
    expected = selmix_logits(out, images)
    for state in (
        load_file(str(out / "model.safetensors")),
        torch.load(out / "model_state_dict.pt", weights_only=True),
    ):
        back = Classifier()
        back.load_state_dict(state)  # strict: the LightningModule's own keys, loss included
        assert torch.equal(back.loss.weight, torch.tensor([1.0, 2.0, 3.0]))
        assert torch.equal(logits(back, images), expected)
        assert changed(start_state, state)
    # the prefix found automatically is the one given explicitly
    auto = evaluated(
        tree, tmp_path, "--model", "small_cnn", "--checkpoint", str(tmp_path / "lit.ckpt")
    )
    explicit = evaluated(tree, tmp_path, "--model", "small_cnn", "--checkpoint",
                         str(tmp_path / "lit.ckpt"), "--set", "ckpt_prefix=model.")  # fmt: skip
    assert auto == explicit
    started = json.loads((out / "metrics.json").read_text())["before"]
    assert auto == started  # the run started from the Lightning weights
    again = evaluated(tree, tmp_path, "--model", "small_cnn", "--checkpoint",
                      str(out / "model.safetensors"))  # fmt: skip
    assert again == reported(out)


# -- the library API ----------------------------------------------------------------------------
def test_class_count_is_read_from_the_head_when_the_data_does_not_give_it(tmp_path: Path) -> None:
    import torchvision

    from selmix.models.loading import load_start_model

    start = torchvision.models.resnet18(num_classes=7)
    torch.save({"state_dict": start.state_dict()}, tmp_path / "r18.pt")
    model, meta, source = load_start_model(tmp_path / "r18.pt", "torchvision:resnet18")
    assert model.fc.out_features == 7 and meta == {} and source.prefix == ""
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(model, x), logits(start, x))


def test_a_data_parallel_prefix_is_found_and_put_back(tmp_path: Path) -> None:
    from selmix.models.export import original_state_dict
    from selmix.models.loading import load_start_model

    start = selmix.create_model("small_cnn", 3)
    state = {f"module.{k}": v for k, v in start.state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    model, _, source = load_start_model(tmp_path / "ddp.pt", "small_cnn", num_classes=3)
    assert source.prefix == "module."
    assert original_state_dict(model, source).keys() == state.keys()


# -- errors: one line, exit 2, --out untouched --------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torchvision

    files = tmp_path_factory.mktemp("bad_model_files")
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), files / "r18_five.pth")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), files / "r18.pth")
    grey = selmix.create_model("small_cnn", 3, in_channels=1)
    torch.save(grey.state_dict(), files / "grey.pt")
    two = {f"{owner}.{k}": v for owner in ("model", "ema")
           for k, v in selmix.create_model("small_cnn", 3).state_dict().items()}  # fmt: skip
    torch.save({"state_dict": two}, files / "two_copies.ckpt")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=SIZE, patch_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=1, intermediate_size=16, num_labels=5,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(files / "vit_five")
    return files


ERRORS: dict[str, tuple[list[str], list[str]]] = {
    "class count": (["--model", "torchvision:resnet18", "--checkpoint", "{files}/r18_five.pth"],
                    ["5 classes", "'fc.weight'", "[5, 512]", "the data has 3"]),
    "missing key": (["--model", "torchvision:resnet34", "--checkpoint", "{files}/r18.pth"],
                    ["lacks the key 'layer1.2.conv1.weight'", "[64, 64, 3, 3]"]),
    "shape": (["--model", "small_cnn", "--checkpoint", "{files}/grey.pt"],
              ["has shape [32, 1, 3, 3] in the file but [32, 3, 3, 3] in the model"]),
    "state dict without --model": (["--checkpoint", "{files}/r18.pth"],
                                   ["not a selmix model file", "`model`"]),
    "two prefixes": (["--model", "small_cnn", "--checkpoint", "{files}/two_copies.ckpt"],
                     ["'ema.', 'model.'", "ckpt_prefix"]),
    "prefix matching nothing": (["--model", "small_cnn", "--checkpoint",
                                 "{files}/two_copies.ckpt", "--set", "ckpt_prefix=net."],
                                ["`ckpt_prefix` 'net.' matches no key"]),
    "export hf of a state dict": (["--model", "torchvision:resnet18", "--checkpoint",
                                   "{files}/r18.pth", "--export", "hf"], ["hf:DIR"]),
    "export unknown": (["--model", "torchvision:resnet18", "--checkpoint", "{files}/r18.pth",
                        "--export", "onnx"], ["unknown `export` format 'onnx'"]),
    "unknown torchvision model": (["--model", "torchvision:resnet1000", "--checkpoint",
                                   "{files}/r18.pth"], ["resnet1000"]),
    "hf folder missing": (["--checkpoint", "hf:{files}/none"], ["no such folder"]),
    "hf class count": (["--checkpoint", "hf:{files}/vit_five"],
                       ["is for 5 classes but the data has 3"]),
    "hf folder with --model": (["--checkpoint", "hf:{files}", "--model", "small_cnn"],
                               ["`model` must not be given"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_starting_model_is_one_line_and_exit_2(
    case: str, tree: Path, bad_files: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv, expected = ERRORS[case]
    out = tmp_path / "run"
    filled = [item.format(files=bad_files) for item in argv]
    capsys.readouterr()
    status = main(finetune_args(tree, out, *filled))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out.exists(), "a run that failed its checks touched --out"


@pytest.mark.parametrize("package, argv", [
    ("transformers", ["--checkpoint", "hf:{files}/vit_five"]),
    ("timm", ["--model", "timm:test_resnet", "--checkpoint", "{files}/r18.pth"]),
])  # fmt: skip
def test_a_missing_extra_names_what_to_install(
    package: str, argv: list[str], tree: Path, bad_files: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    status = main(finetune_args(tree, tmp_path / "run", *[a.format(files=bad_files) for a in argv]))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert f"pip install 'selmix[{package}]'" in lines[0], lines[0]
