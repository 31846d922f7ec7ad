"""Bad inputs through the CLI: each is one line on stderr, exit 2, and harms no earlier run.

A tiny good pretrain + finetune run is made once; every case runs in a copy of its output
folder (``{out}``) and must leave that copy byte-identical.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selmix.cli import main
from selmix.models import create_model
from selmix.models.checkpoint import load_checkpoint, save_model

torch.set_num_threads(1)
QUIET = ["--set", "progress=false"]


def _image_tree(root: Path) -> Path:
    """root/{train,test}/class_k/*.png: 3 colour classes, long-tailed train counts."""
    rng = np.random.default_rng(0)
    colours = ((220, 40, 40), (40, 200, 60), (50, 70, 230))
    for split, counts in (("train", (24, 16, 12)), ("test", (6, 6, 6))):
        for label, (colour, count) in enumerate(zip(colours, counts, strict=True)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (12, 12, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _tree_digest(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file under ``folder`` (subfolders included), by relative path."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }  # fmt: skip


def _hugging_face_folders(files: Path) -> None:
    """A ViT built for 16x16 images (the data's are 12x12) and a BertModel, when
    transformers is installed (the cases that use them are skipped otherwise)."""
    if importlib.util.find_spec("transformers") is None:
        return
    import transformers

    torch.manual_seed(0)
    vit = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=1, intermediate_size=16, num_labels=3,
    )  # fmt: skip
    transformers.ViTForImageClassification(vit).save_pretrained(files / "vit16")
    bert = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=16, architectures=["BertModel"],
    )  # fmt: skip
    transformers.BertModel(bert).save_pretrained(files / "bert")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The data, a pre-trained model, a good finetune run and the bad files the cases use."""
    base = tmp_path_factory.mktemp("bad_inputs")
    previous_cache = os.environ.get("SELMIX_CACHE_DIR")
    os.environ["SELMIX_CACHE_DIR"] = str(base / "cache")
    tree = _image_tree(base / "images")
    other_tree = _image_tree(base / "other_images")  # the same pictures in another folder
    data = ["--data", f"imagefolder:{tree}", "--val-per-class", "3", "--device", "cpu"]
    pretrained = base / "pretrained"
    assert main(["pretrain", *data, "--model", "small_cnn", "--out", str(pretrained),
                 "--epochs", "1", "--batch-size", "16", *QUIET]) == 0  # fmt: skip
    good = base / "good"
    assert main(["finetune", *data, "--checkpoint", str(pretrained / "model.pt"),
                 "--out", str(good), "--steps", "4", "--batch-size", "8",
                 "--set", "checkpoint_every=2", "--set", "feedback_every=2",
                 *QUIET]) == 0  # fmt: skip
    assert (good / "finetune_state.pt").is_file() and (good / "log.jsonl").is_file()

    files = base / "files"
    files.mkdir()
    (files / "empty.pt").write_bytes(b"")
    (files / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint at all " * 20)
    torch.save({"model": torch.nn.Linear(2, 2)}, files / "object.pt")
    state = load_checkpoint(pretrained / "model.pt")
    del state["spec"]["num_classes"]
    torch.save(state, files / "no_num_classes.pt")
    save_model(files / "five.pt", create_model("small_cnn", 5, in_channels=3))
    # Fashion-MNIST with a truncated training-images download
    fmnist = files / "fmnist"
    fmnist.mkdir()
    for prefix, count in (("train", 60), ("t10k", 20)):
        labels = struct.pack(">BBBBI", 0, 0, 8, 1, count) + bytes(k % 10 for k in range(count))
        images = struct.pack(">BBBBIII", 0, 0, 8, 3, count, 28, 28) + bytes(count * 784)
        (fmnist / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
        (fmnist / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    whole = (fmnist / "train-images-idx3-ubyte.gz").read_bytes()
    (fmnist / "train-images-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    # CIFAR-10 pickles whose first batch runs a shell command when unpickled
    cifar = files / "cifar-10-batches-py"
    cifar.mkdir()
    good_batch = pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))})
    for name in ["data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (cifar / name).write_bytes(good_batch)

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {files / 'code-ran'}",)

    (cifar / "data_batch_1").write_bytes(pickle.dumps({b"data": RunsCode(), b"labels": []}))
    # a CIFAR-10 JPEG archive cut short
    archive_buffer = files / "whole.tar.gz"
    with tarfile.open(archive_buffer, "w:gz") as tar:
        tar.add(tree / "train", arcname="cifar10/train")
        tar.add(tree / "test", arcname="cifar10/test")
    cut = archive_buffer.read_bytes()
    (files / "cut.tar.gz").write_bytes(cut[: len(cut) // 2])
    (files / "a_file").write_text("not a folder\n")
    objects = np.array([{"a": 1}], dtype=object)
    np.savez(files / "objects.npz", train_features=objects, train_labels=np.zeros(1))
    empty_class = _image_tree(files / "empty_class")
    for image in (empty_class / "train" / "class_2").iterdir():
        image.unlink()
    no_val_class = _image_tree(files / "no_val_class")  # val/ has classes 0 and 1 only
    for name in ("class_0", "class_1"):
        shutil.copytree(no_val_class / "test" / name, no_val_class / "val" / name)
    renamed = _image_tree(files / "renamed")  # class_1 is called "dog" here
    for split in ("train", "test"):
        (renamed / split / "class_1").rename(renamed / split / "dog")
    # starting weights with a NaN in the head (a selmix model file)
    poisoned = create_model("small_cnn", 3, in_channels=3)
    with torch.no_grad():
        poisoned.head.weight[0, 0] = float("nan")
    save_model(files / "nan_head.pt", poisoned)
    torch.save(poisoned.state_dict(), files / "nan_head_state_dict.pt")
    # a Lightning-style checkpoint: the model's keys under 'model.'
    lightning = {f"model.{k}": v for k, v in create_model("small_cnn", 3).state_dict().items()}
    torch.save({"state_dict": lightning}, files / "lightning.ckpt")
    tiny_class = _image_tree(files / "tiny_class")  # class_2: 8 training images
    for image in sorted((tiny_class / "train" / "class_2").iterdir())[8:]:
        image.unlink()
    _hugging_face_folders(files)
    yield {"tree": tree, "other_tree": other_tree, "pretrained": pretrained, "good": good,
           "files": files}  # fmt: skip
    if previous_cache is None:
        os.environ.pop("SELMIX_CACHE_DIR", None)
    else:
        os.environ["SELMIX_CACHE_DIR"] = previous_cache


# name -> (arguments after `finetune <data> --checkpoint <model> --out {out}`, or a full
#          argv starting with a command; the text the error line must contain)
# {tree} {model} {files} {out} are filled in.
# --overwrite: each case runs into a folder holding a run, which it may replace at its end
FT = ["finetune", "--data", "imagefolder:{tree}", "--val-per-class", "3", "--device", "cpu",
      "--checkpoint", "{model}", "--out", "{out}", "--steps", "4", "--batch-size", "8",
      "--overwrite"]  # fmt: skip
EV = ["evaluate", "--data", "imagefolder:{tree}", "--val-per-class", "3", "--device", "cpu",
      "--checkpoint", "{model}", "--out", "{out}", "--overwrite"]  # fmt: skip
# a resume of the good run, which differs from FT in feedback_every
RESUME = [*FT, "--resume", "{out}/finetune_state.pt", "--set", "feedback_every=2"]
CASES: dict[str, tuple[list[str], str]] = {
    "lr_head inf": ([*FT, "--set", "lr_head=inf"], "lr_head"),
    "lr_head nan": ([*FT, "--set", "lr_head=nan"], "lr_head"),
    "lr_head zero": ([*FT, "--set", "lr_head=0"], "lr_head"),
    "lr_backbone inf": ([*FT, "--set", "lr_backbone=inf"], "lr_backbone"),
    "gain_scale inf": ([*FT, "--set", "gain_scale=inf"], "gain_scale"),
    "gain_scale negative": ([*FT, "--set", "gain_scale=-1"], "gain_scale"),
    "confusion_smoothing inf": ([*FT, "--set", "confusion_smoothing=inf"], "confusion_smoothing"),
    "confusion_smoothing nan": ([*FT, "--set", "confusion_smoothing=nan"], "confusion_smoothing"),
    "momentum inf": ([*FT, "--set", "momentum=inf"], "momentum"),
    "weight_decay inf": ([*FT, "--set", "weight_decay=inf"], "weight_decay"),
    "lam_min nan": ([*FT, "--set", "lam_min=nan"], "lam_min"),
    "steps zero": ([*FT, "--set", "steps=0"], "steps"),
    "steps not a number": ([*FT, "--set", "steps=many"], "steps"),
    "batch_size zero": ([*FT, "--set", "batch_size=0"], "batch_size"),
    "feedback_every zero": ([*FT, "--set", "feedback_every=0"], "feedback_every"),
    "eval_batch_size zero": ([*FT, "--set", "eval_batch_size=0"], "eval_batch_size"),
    "seed 2**70": ([*FT, "--seed", str(2**70)], "seed"),
    "head_classes abc": ([*FT, "--set", "head_classes=abc"], "head_classes"),
    "head_classes 5": ([*FT, "--set", "head_classes=5"], "head_classes"),
    "head_classes [1.5]": ([*FT, "--set", "head_classes=[1.5]"], "head_classes"),
    "head_classes out of range": ([*FT, "--set", "head_classes=[0, 7]"], "head_classes"),
    "frozen_backbone 2": ([*FT, "--set", "frozen_backbone=2"], "frozen_backbone"),
    "progress maybe": ([*FT, "--set", "progress=maybe"], "progress"),
    "augment maybe": ([*FT, "--set", "augment=maybe"], "augment"),
    "normalize_gain 2": ([*FT, "--set", "normalize_gain=2"], "normalize_gain"),
    "objective unknown": ([*FT, "--objective", "max_fun"], "max_fun"),
    "objective_params not a mapping": ([*FT, "--set", "objective_params=[1]"],
                                       "objective_params"),
    "policy unknown": ([*FT, "--set", "policy=random"], "policy"),
    "imbalance inf": ([*FT, "--imbalance", "inf"], "imbalance"),
    "imbalance below 1": ([*FT, "--imbalance", "0.5"], "`imbalance` must be >= 1"),
    "features file of objects": ([*FT, "--data", "features:{files}/objects.npz"], "objects.npz"),
    "empty class folder": ([*FT, "--data", "imagefolder:{files}/empty_class"],
                           "train/class_2/ holds no images"),
    # found before --out is touched, which the byte-identical check below shows
    "validation lacks a class": ([*FT, "--data", "imagefolder:{files}/no_val_class", "--set",
                                  "val_per_class=null"], "`val` has no samples of class(es) [2]"),
    "val_per_class negative": ([*FT, "--val-per-class", "-1"], "val_per_class"),
    "checkpoint missing": ([*FT, "--checkpoint", "{files}/none.pt"], "none.pt"),
    "checkpoint empty": ([*FT, "--checkpoint", "{files}/empty.pt"], "empty.pt"),
    "checkpoint garbage": ([*FT, "--checkpoint", "{files}/garbage.pt"], "garbage.pt"),
    "checkpoint holds objects": ([*FT, "--checkpoint", "{files}/object.pt"], "object.pt"),
    "checkpoint missing keys": ([*FT, "--checkpoint", "{files}/no_num_classes.pt"],
                                "num_classes"),
    "checkpoint other class count": ([*FT, "--checkpoint", "{files}/five.pt"], "5 classes"),
    "resume missing": ([*FT, "--resume", "{files}/none.pt"], "none.pt"),
    "resume garbage": ([*FT, "--resume", "{files}/garbage.pt"], "garbage.pt"),
    "out is a file": ([*FT, "--out", "{files}/a_file"], "out"),
    "truncated fashion-mnist gz": (
        [*FT, "--data", "fashion-mnist:{files}/fmnist"], "train-images-idx3-ubyte.gz"),
    "cifar pickle that runs code": ([*FT, "--data", "cifar10:{files}"], "data_batch_1"),
    "truncated cifar archive": ([*FT, "--data", "cifar10:{files}/cut.tar.gz"], "cut.tar.gz"),
    # resume compatibility: every setting that changes the run
    "resume other imbalance": ([*RESUME, "--imbalance", "5"],
                               "imbalance"),
    "resume other val_per_class": (
        [*RESUME, "--val-per-class", "2"], "val_per_class"),
    "resume other data source": (
        [*RESUME, "--data", "imagefolder:{other_tree}"],
        "data"),
    "resume other max_per_class": (
        [*RESUME, "--imbalance", "2", "--max-per-class", "9"],
        "max_per_class"),
    "resume other seed": ([*RESUME, "--seed", "1"], "seed"),
    # the good run decoded its small tree into memory; streamed, it would be another run
    "resume other storage": ([*RESUME, "--stream", "disk"], "storage"),
    "stream unknown": ([*FT, "--stream", "cloud"], "stream"),
    "num_workers negative": ([*FT, "--num-workers", "-1"], "num_workers"),
    "resume other steps": ([*RESUME, "--steps", "6"],
                           "steps"),
    "head_classes negative": ([*FT, "--set", "head_classes=[-1]"], "head_classes"),
    "seed 2**70 pretrain": (["pretrain", "--data", "imagefolder:{tree}", "--model", "small_cnn",
                             "--out", "{out}", "--seed", str(2**70)], "seed"),
    "head_classes abc pretrain": (["pretrain", "--data", "imagefolder:{tree}", "--model",
                                   "small_cnn", "--out", "{out}", "--set", "head_classes=abc"],
                                  "head_classes"),
    "progress maybe pretrain": (["pretrain", "--data", "imagefolder:{tree}", "--model",
                                 "small_cnn", "--out", "{out}", "--set", "progress=maybe"],
                                "progress"),
    "seed 2**70 evaluate": (["evaluate", "--data", "imagefolder:{tree}", "--checkpoint",
                             "{model}", "--out", "{out}", "--seed", str(2**70)], "seed"),
    "head_classes out of range evaluate": ([*EV, "--set", "head_classes=[5]"], "head_classes"),
    "seed 2**70 baseline": (["baseline", "--method", "crt", "--data", "imagefolder:{tree}",
                             "--checkpoint", "{model}", "--out", "{out}", "--seed", str(2**70)],
                            "seed"),
    "head_classes 5 baseline": (["baseline", "--method", "crt", "--data", "imagefolder:{tree}",
                                 "--checkpoint", "{model}", "--out", "{out}", "--set",
                                 "head_classes=5"], "head_classes"),
    "progress maybe baseline": (["baseline", "--method", "crt", "--data", "imagefolder:{tree}",
                                 "--checkpoint", "{model}", "--out", "{out}", "--set",
                                 "progress=maybe"], "progress"),

    "resume other starting checkpoint": (
        [*RESUME, "--checkpoint", "{other_model}"],
        "checkpoint"),
    "resume other objective": (
        [*RESUME, "--objective", "g_mean"], "objective"),
    # issue 37: each found with the earlier run in --out intact
    "out holds an earlier run, no --overwrite": (
        [item for item in FT if item != "--overwrite"], "pass --overwrite"),
    "nan in the head, head_init none": (
        [*FT, "--checkpoint", "{files}/nan_head.pt", "--set", "head_init=none"],
        "non-finite value(s) (NaN or inf) in 'head.weight'"),
    "nan in the head, head_init auto": (
        [*FT, "--checkpoint", "{files}/nan_head.pt", "--set", "head_init=auto"],
        "non-finite value(s) (NaN or inf) in 'head.weight'"),
    "nan in a state dict's head, --model": (
        [*FT, "--checkpoint", "{files}/nan_head_state_dict.pt", "--model", "small_cnn",
         "--set", "head_init=none"], "non-finite value(s) (NaN or inf) in 'head.weight'"),
    "hf ViT built for 16x16, data 12x12": (
        [*FT, "--checkpoint", "hf:{files}/vit16"], "it is built for 16x16 images"),
    "val_per_class equal to the smallest class": (
        [*FT, "--val-per-class", "12"], "(named 'class_2'): `val_per_class` (--val-per-class)"),
    "no val/ and a class too small to carve one": (
        [*FT, "--data", "imagefolder:{files}/tiny_class", "--set", "val_per_class=null"],
        "class 'class_2' has 8 training samples, too few to carve a validation set"),
    "ckpt_prefix cutting a word": (
        [*FT, "--checkpoint", "{files}/lightning.ckpt", "--model", "small_cnn",
         "--set", "ckpt_prefix=mo"], "`ckpt_prefix` 'mo' leaves keys such as 'del."),
    "OUT/model_state_dict.pt is a folder": (
        [*FT], "has a folder 'model_state_dict.pt' where a run writes a file"),
    "OUT/hf is a file": ([*FT], "has a file 'hf' where a run writes a folder"),
    "hf folder without hf:": ([*FT, "--checkpoint", "{files}/vit16"], "write it as hf:"),
    "BertModel folder": ([*FT, "--checkpoint", "hf:{files}/bert"],
                         "BertModel (model type 'bert'), which is not an image classifier"),
    "ckpt_prefix without its dot": (
        [*FT, "--checkpoint", "{files}/lightning.ckpt", "--model", "small_cnn",
         "--set", "ckpt_prefix=model"], "--set ckpt_prefix=model."),
    "an interrupted run's staging folder, no --overwrite": (
        [item for item in FT if item != "--overwrite"] + ["--out", "{tmp}/fresh"],
        "holds an interrupted run"),
    "pretrain into a used out, no --overwrite": (
        ["pretrain", "--data", "imagefolder:{tree}", "--val-per-class", "3", "--model",
         "small_cnn", "--out", "{out}", "--device", "cpu"], "pass --overwrite"),
    "baseline into a used out, no --overwrite": (
        ["baseline", "--method", "crt", "--data", "imagefolder:{tree}", "--val-per-class", "3",
         "--checkpoint", "{model}", "--out", "{out}", "--device", "cpu"], "pass --overwrite"),
    # `selmix evaluate --out` is staged as the other commands are
    "evaluate into a used out, no --overwrite": (
        [item for item in EV if item != "--overwrite"], "pass --overwrite"),
    "evaluate: checkpoint garbage": ([*EV, "--checkpoint", "{files}/garbage.pt"], "garbage.pt"),
    "evaluate: checkpoint other class count": ([*EV, "--checkpoint", "{files}/five.pt"],
                                               "5 classes"),
    "evaluate: nan in the head": ([*EV, "--checkpoint", "{files}/nan_head.pt"],
                                  "non-finite value(s) (NaN or inf) in 'head.weight'"),
    "evaluate: hf ViT built for 16x16, data 12x12": (
        [*EV, "--checkpoint", "hf:{files}/vit16"], "it is built for 16x16 images"),
    "evaluate: empty class folder": ([*EV, "--data", "imagefolder:{files}/empty_class"],
                                     "train/class_2/ holds no images"),
    "evaluate: out is a file": ([*EV, "--out", "{files}/a_file"], "is not a folder"),
    "evaluate: OUT/metrics.json is a folder": (
        [*EV], "has a folder 'metrics.json' where a run writes a file"),
    "evaluate: preprocessing model, none recorded": (
        [*EV, "--preprocessing", "model"], "records no preprocessing"),
    "evaluate: an interrupted run's staging folder, no --overwrite": (
        [item for item in EV if item != "--overwrite"] + ["--out", "{tmp}/fresh"],
        "holds an interrupted run"),
}  # fmt: skip

#: what a case puts in --out (or beside it) before it runs, after the good run is copied
SETUP = {
    "OUT/model_state_dict.pt is a folder": lambda out: (out / "model_state_dict.pt").mkdir(),
    "OUT/hf is a file": lambda out: (out / "hf").write_text("not a folder"),
    "an interrupted run's staging folder, no --overwrite": lambda out: (
        out.with_name("fresh.partial").mkdir(),
        (out.with_name("fresh.partial") / "finetune_state.pt").write_bytes(b"a checkpoint")),
    "evaluate: OUT/metrics.json is a folder": lambda out: (
        (out / "metrics.json").unlink(), (out / "metrics.json").mkdir()),
    "evaluate: an interrupted run's staging folder, no --overwrite": lambda out: (
        out.with_name("fresh.partial").mkdir(),
        (out.with_name("fresh.partial") / "finetune_state.pt").write_bytes(b"a checkpoint")),
}
NEEDS_TRANSFORMERS = {"hf ViT built for 16x16, data 12x12", "hf folder without hf:",
                      "BertModel folder",
                      "evaluate: hf ViT built for 16x16, data 12x12"}  # fmt: skip


def _fill(argv: list[str], world: dict[str, Path], out: Path) -> list[str]:
    values = {
        "tree": str(world["tree"]),
        "other_tree": str(world["other_tree"]),
        "model": str(world["pretrained"] / "model.pt"),
        "other_model": str(world["files"] / "five.pt"),
        "files": str(world["files"]),
        "out": str(out),
        "tmp": str(out.parent),
    }
    return [item.format(**values) for item in argv]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_the_previous_run_intact(
    case: str, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if case in NEEDS_TRANSFORMERS and importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers")
    out = tmp_path / "run"
    shutil.copytree(world["good"], out)
    if case in SETUP:
        SETUP[case](out)
    before = _tree_digest(out)
    argv, expected = CASES[case]
    capsys.readouterr()
    # evaluate has no progress bar (nor a `progress` setting)
    quiet = [] if argv[0] == "evaluate" or any(item.startswith("progress=") for item in argv) \
        else QUIET
    status = main([*_fill(argv, world, out), *quiet])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert not (world["files"] / "code-ran").exists(), "a data file ran code"
    assert "Traceback" not in captured.err
    assert status == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "error" in lines[0] and expected in lines[0], lines[0]
    assert "weights_only" not in lines[0] and "allow_pickle" not in lines[0]
    assert _tree_digest(out) == before, "the failed run changed the previous run's files"


def test_there_are_at_least_30_cases() -> None:
    assert len(CASES) >= 30


def test_class_name_warning_says_which_names_differ(
    world: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    argv = ["evaluate", "--data", f"imagefolder:{world['files'] / 'renamed'}", "--checkpoint",
            str(world["pretrained"] / "model.pt"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    # sorted, the data's classes are class_0, class_2, dog: indices 1 and 2 differ
    assert "1: 'class_1' vs 'class_2'; 2: 'class_2' vs 'dog'" in warnings[0], warnings[0]


# -- run-level behaviour ------------------------------------------------------------------------
def _finetune_argv(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return _fill([*FT, *extra, *QUIET], world, out)


def _log_steps(path: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_checkpoint_every_has_a_default_and_a_flag(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selmix.engine.config import CHECKPOINT_EVERY
    from selmix.finetune import FinetuneConfig, Trainer

    assert FinetuneConfig().checkpoint_every == CHECKPOINT_EVERY
    out = tmp_path / "run"
    assert main(_finetune_argv(world, out, "--set", "feedback_every=2")) == 0
    assert (out / "finetune_state.pt").is_file(), "a default run left nothing to resume from"
    saved: list[int] = []
    original = Trainer.save_checkpoint

    def record(self: Trainer) -> None:
        saved.append(self.step)
        original(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", record)
    other = tmp_path / "flag"
    assert main(_finetune_argv(world, other, "--checkpoint-every", "1")) == 0
    assert saved == [1, 2, 3, 4], saved  # every step, the last one at the end


def test_resume_leaves_no_duplicate_log_records(world: dict[str, Path], tmp_path: Path) -> None:
    from selmix.models.checkpoint import save_checkpoint

    out = tmp_path / "run"
    shutil.copytree(world["good"], out)
    # a run killed after it logged step 4 but before its step-4 checkpoint: the checkpoint
    # says step 2 while log.jsonl already has step 4
    state = load_checkpoint(out / "finetune_state.pt")
    state["step"] = 2
    state["history"] = [record for record in state["history"] if record.get("step", 0) <= 2]
    save_checkpoint(out / "finetune_state.pt", state)
    assert _log_steps(out / "log.jsonl") == [0, 2, 4]
    assert main(_finetune_argv(world, out, "--set", "feedback_every=2", "--set",
                               "checkpoint_every=2", "--resume",
                               str(out / "finetune_state.pt"))) == 0  # fmt: skip
    assert _log_steps(out / "log.jsonl") == [0, 2, 4]


def test_a_real_interrupted_run_resumes_with_the_log_of_one_run(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the step-3 checkpoint and the step-4 log record: the resumed run's log
    and result are those of an uninterrupted run."""
    import json

    from selmix.finetune import Trainer

    whole = tmp_path / "whole"
    args = ("--set", "feedback_every=2", "--checkpoint-every", "3")
    assert main(_finetune_argv(world, whole, *args)) == 0

    out = tmp_path / "run"
    original = Trainer.feedback

    def killed_after_step_4(self: Trainer) -> dict:
        record = original(self)
        if self.step == 4:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(Trainer, "feedback", killed_after_step_4)
    assert main(_finetune_argv(world, out, *args)) == 130
    # the interrupted run lives in the staging folder until it ends
    staging = tmp_path / "run.partial"
    assert not out.exists()
    assert _log_steps(staging / "log.jsonl") == [0, 2, 4]
    assert load_checkpoint(staging / "finetune_state.pt")["step"] == 3
    monkeypatch.setattr(Trainer, "feedback", original)
    resume = ["--resume", str(staging / "finetune_state.pt")]
    assert main(_finetune_argv(world, out, *args, *resume)) == 0
    assert not staging.exists()
    assert _log_steps(out / "log.jsonl") == [0, 2, 4]

    def untimed(path: Path) -> list[dict]:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "feedback_seconds"} for r in records]

    assert untimed(out / "log.jsonl") == untimed(whole / "log.jsonl")
    assert (out / "metrics.json").read_text() == (whole / "metrics.json").read_text()


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    finetune_module = importlib.import_module("selmix.finetune")
    from selmix.models.checkpoint import save_checkpoint

    def interrupted_after_a_checkpoint(*args: object, config: object, **kwargs: object) -> None:
        save_checkpoint(config.checkpoint_path, {"format": "selmix-finetune-v1"})
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "finetune", interrupted_after_a_checkpoint)
    out = tmp_path / "run"
    shutil.copytree(world["good"], out)
    before = _tree_digest(out)
    status = main(_finetune_argv(world, out, "--set", "checkpoint_every=2"))
    err = capsys.readouterr().err
    assert status == 130
    assert _tree_digest(out) == before, "the interrupted run changed the earlier run"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    state = str(tmp_path / "run.partial" / "finetune_state.pt")
    assert f"the checkpoint is '{state}'" in lines[0]
    assert "to continue: selmix finetune " in lines[0] and lines[0].endswith(f"--resume {state}")


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The previous run's checkpoint in --out is not this run's: it is never named, and
    the earlier run stays as it was (no staging folder is left: nothing to resume)."""
    finetune_module = importlib.import_module("selmix.finetune")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "finetune", interrupted)
    out = tmp_path / "run"
    shutil.copytree(world["good"], out)
    before = _tree_digest(out)
    assert main(_finetune_argv(world, out, "--set", "checkpoint_every=2")) == 130
    err = capsys.readouterr().err
    assert "nothing to resume from" in err and "every 2 steps" in err, err
    assert str(out / "finetune_state.pt") not in err
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("tty", [False, True])
def test_no_progress_flag(
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tty: bool,
) -> None:
    import selmix._progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(selmix._progress, "progress_enabled", lambda enabled, stream=None: (
        enabled and tty))  # fmt: skip
    argv = _fill([*FT, "--set", "checkpoint_every=100"], world, tmp_path / "on")
    assert main(argv) == 0
    shown = capsys.readouterr().err
    assert "selmix min_recall" in shown  # progress is on by default
    if not tty:
        assert "\r" not in shown and "selmix min_recall: 4/4 (100%)" in shown
    assert main(_fill([*FT, "--no-progress"], world, tmp_path / "off")) == 0
    assert "selmix min_recall" not in capsys.readouterr().err


def test_progress_bar_iterates_like_tqdm() -> None:
    from selmix._progress import progress_bar

    stream = _Stream(tty=False)
    items = list(progress_bar(range(3, 23), "pretrain", stream=stream, leave=False))
    assert items == list(range(3, 23))
    assert stream.text.splitlines()[-1] == "pretrain: 20/20 (100%)"
    resumed = _Stream(tty=False)
    bar = progress_bar(100, "x", stream=resumed, initial=55)
    _drive(bar, 45)
    assert [line.split()[1] for line in resumed.text.splitlines()] == [
        "60/100", "70/100", "80/100", "90/100", "100/100",
    ]  # fmt: skip
    assert progress_bar(range(5), "x", disable=True, stream=resumed).iterable is not None


def test_val_lacking_only_the_last_class_names_the_missing_class() -> None:
    import selmix
    from selmix.data import ImageTensorDataset

    images = torch.zeros(12, 3, 8, 8, dtype=torch.uint8)
    train = ImageTensorDataset(images, torch.tensor([0, 1, 2] * 4))
    val = ImageTensorDataset(images[:6], torch.tensor([0, 1] * 3))  # K inferred as 2
    model = create_model("small_cnn", 3, in_channels=3)
    with pytest.raises(ValueError, match=r"no samples of class\(es\) \[2\]"):
        selmix.finetune(model, train, val, objective="min_recall", steps=1, batch_size=4,
                        device="cpu", progress=False)  # fmt: skip


# -- the validation helpers the CLI and the library use ----------------------------------------
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), np.float32("inf")])
def test_non_finite_numbers_are_rejected_with_the_argument_name(value: float) -> None:
    from selmix._validation import check_finite, check_in_range, check_positive

    with pytest.raises(ValueError, match="`lr_head` must be a finite number > 0, got"):
        check_positive("lr_head", value)
    with pytest.raises(ValueError, match="`confusion_smoothing` must be a finite number >= 0"):
        check_positive("confusion_smoothing", value, strict=False)
    with pytest.raises(ValueError, match="`momentum` must be a finite number"):
        check_in_range("momentum", value, 0.0, 1.0)
    with pytest.raises(ValueError, match="`shift` must be a finite number, got"):
        check_finite("shift", value)


def test_lr_head_inf_message_is_exactly_as_documented() -> None:
    from selmix._validation import check_positive

    with pytest.raises(ValueError) as raised:
        check_positive("lr_head", float("inf"))
    assert str(raised.value) == "`lr_head` must be a finite number > 0, got inf"
    assert check_positive("lr_head", 3e-3) == 3e-3


@pytest.mark.parametrize("value", [2, 0, 1, "maybe", "true", None, 1.0])
def test_check_bool_rejects_everything_but_booleans(value: object) -> None:
    from selmix._validation import check_bool

    with pytest.raises(TypeError, match="`frozen_backbone` must be true or false, got"):
        check_bool("frozen_backbone", value)


def test_check_bool_accepts_booleans() -> None:
    from selmix._validation import check_bool

    assert check_bool("progress", True) is True and check_bool("progress", np.bool_(False)) is False


@pytest.mark.parametrize("seed", [2**70, 2**64, -(2**63) - 1])
def test_seeds_outside_torchs_range_are_one_clear_line(seed: int) -> None:
    from selmix._validation import as_generator, check_seed

    with pytest.raises(ValueError, match=r"`seed` must be an integer in \[-2\*\*63, 2\*\*64\)"):
        check_seed("seed", seed)
    with pytest.raises(ValueError, match="`seed` must be an integer in"):
        as_generator(seed)


def test_seed_edges_that_torch_accepts_pass() -> None:
    from selmix._validation import check_seed

    for seed in (0, 2**64 - 1, -(2**63)):
        torch.Generator().manual_seed(check_seed("seed", seed))
    with pytest.raises(TypeError, match="`seed` must be an int"):
        check_seed("seed", 1.5)


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("abc", TypeError, "must be a list of class indices .*got str 'abc'"),
        (5, TypeError, "must be a list of class indices .*got int 5"),
        ([1.5], TypeError, "must hold integer class indices .*got 1.5"),
        ([True], TypeError, "must hold integer class indices"),
        ([0, 10], ValueError, r"in \[0, 10\), got 10"),
        ([-1], ValueError, r"in \[0, 10\), got -1"),
        ([1, 1], ValueError, r"class\(es\) \[1\] more than once"),
        ([], ValueError, "at least one head and one tail class"),
        (list(range(10)), ValueError, "at least one head and one tail class"),
    ],
)
def test_check_head_classes(value: object, error: type, match: str) -> None:
    from selmix._validation import check_head_classes

    with pytest.raises(error, match="`head_classes` .*" + match):
        check_head_classes(value, 10)


def test_check_head_classes_returns_sorted_ints() -> None:
    from selmix._validation import check_head_classes

    assert check_head_classes((3, 0, 1), 10) == [0, 1, 3]


@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.0, 2.7]), np.array([0.5, 1.0])])
def test_float_labels_are_rejected_not_truncated(labels: object) -> None:
    from selmix._validation import check_labels

    with pytest.raises(TypeError, match="`train` labels must be integers, got torch.float"):
        check_labels("train", labels, 3)


def test_check_labels_names_a_missing_last_class() -> None:
    from selmix._validation import check_labels

    with pytest.raises(ValueError, match=r"`val` has no samples of class\(es\) \[9\]"):
        check_labels("val", torch.arange(9).repeat(2), 10, every_class=True)


# -- progress bars ------------------------------------------------------------------------------
class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def _drive(bar: object, steps: int) -> None:
    for step in range(steps):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    bar.close()


def test_progress_to_a_file_is_a_few_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    from selmix._progress import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = _Stream(tty=False)
    _drive(progress_bar(4000, "selmix min_recall", stream=stream), 4000)
    lines = stream.text.splitlines()
    assert "\r" not in stream.text
    assert len(lines) == 10 and lines[-1].startswith("selmix min_recall: 4000/4000 (100%)")
    assert len(stream.text) < 1000  # a tqdm bar redrawn 4000 times is ~300 kB


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from selmix._progress import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = _Stream(tty=True)
    _drive(progress_bar(50, "pretrain", stream=stream, mininterval=0), 50)
    assert "\r" in stream.text and "50/50" in stream.text


@pytest.mark.parametrize("how", ["TQDM_DISABLE", "enabled=False"])
@pytest.mark.parametrize("tty", [True, False])
def test_progress_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, how: str, tty: bool) -> None:
    from selmix._progress import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    if how == "TQDM_DISABLE":
        monkeypatch.setenv("TQDM_DISABLE", "1")
    stream = _Stream(tty=tty)
    _drive(progress_bar(100, "x", enabled=how != "enabled=False", stream=stream), 100)
    assert stream.text == ""


def test_progress_every_percent_none_prints_nothing_off_a_terminal() -> None:
    from selmix._progress import progress_bar

    stream = _Stream(tty=False)
    _drive(progress_bar(100, "x", every_percent=None, stream=stream), 100)
    assert stream.text == ""


# -- runs that go wrong after the checks ----------------------------------------------------------
def test_lr_head_1e3_warns_once_that_the_run_is_diverging(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = _finetune_argv(world, tmp_path / "run", "--lr-head", "1e3", "--steps", "8",
                          "--set", "feedback_every=2", "--frozen-backbone")  # fmt: skip
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "diverging" in line]
    assert len(lines) == 1, lines
    assert "warning" in lines[0] and "lr_head" in lines[0]


def test_a_sensible_run_does_not_warn(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = _finetune_argv(world, tmp_path / "run", "--steps", "8", "--set", "feedback_every=2")
    assert main(argv) == 0
    assert "diverging" not in capsys.readouterr().err


def test_a_batch_size_beyond_memory_is_one_line_naming_batch_size(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 2**50 pairs: 8 PiB of indices, beyond any address space (no overcommit setting lets
    # it through, so the test never risks the machine's memory)
    argv = _finetune_argv(world, tmp_path / "run", "--batch-size", str(2**50))
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "`batch_size`" in errors[0], errors
    assert "Traceback" not in errors[0]


def test_a_run_failing_mid_training_leaves_its_own_files_only(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The previous run stays in --out as it was; the failed run's files (its config and
    a named checkpoint, with finite weights) are in the staging folder beside it."""
    import re

    import yaml

    out = tmp_path / "run"
    shutil.copytree(world["good"], out)
    before = _tree_digest(out)
    argv = _finetune_argv(world, out, "--lr-head", "1e30", "--set", "lr_backbone=1e30",
                          "--checkpoint-every", "1", "--steps", "20")  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err
    assert _tree_digest(out) == before
    staging = tmp_path / "run.partial"
    if (staging / "finetune_state.pt").is_file():
        assert yaml.safe_load((staging / "config.yaml").read_text())["lr_head"] == 1e30
    else:
        assert not staging.exists()
    named = re.search(r"checkpoint with finite weights is '([^']+)' \(step (\d+)\)", err)
    if named:
        state = load_checkpoint(named.group(1))
        assert state["step"] == int(named.group(2)) and state["config"]["lr_head"] == 1e30
        floats = [v for v in state["model"].values() if v.is_floating_point()]
        assert all(torch.isfinite(v).all() for v in floats)


def test_non_finite_weights_are_never_checkpointed_nor_a_foreign_checkpoint_named(
    tmp_path: Path,
) -> None:
    import selmix
    from selmix.data.formats import FeatureTensorDataset

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 20 + [1] * 8 + [2] * 4)
    data = FeatureTensorDataset(torch.randn(32, 5, generator=generator), labels, 3)
    foreign = tmp_path / "state.pt"
    foreign.write_bytes(b"an earlier run's checkpoint")
    model = create_model("linear", 3, in_channels=5)

    def poison(record: dict) -> None:
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError) as raised:
        selmix.finetune(model, data, data, "min_recall", steps=4, batch_size=8,
                        checkpoint_path=str(foreign), checkpoint_every=1, callback=poison,
                        progress=False)  # fmt: skip
    assert "checkpoint" not in str(raised.value)
    assert foreign.read_bytes() == b"an earlier run's checkpoint"


# -- the ecosystem options ------------------------------------------------------------------------
def test_tensorboard_option_logs_the_run_and_its_gain_images(
    world: dict[str, Path], tmp_path: Path
) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    board = tmp_path / "tb"
    argv = _finetune_argv(world, tmp_path / "run", "--tensorboard", str(board),
                          "--set", "feedback_every=2")  # fmt: skip
    assert main(argv) == 0
    events = accumulator.EventAccumulator(str(board), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("objective")] == [0, 2, 4]
    assert [e.step for e in events.Images("gain")] == [0, 2, 4]
    logged = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"gain"' not in logged  # the log keeps its records as they were


def test_tensorboard_without_the_package_is_one_line_before_touching_out(
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    out = tmp_path / "run"
    shutil.copytree(world["good"], out)
    before = _snapshot(out)
    assert main(_finetune_argv(world, out, "--tensorboard", str(tmp_path / "tb"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "selmix[tensorboard]" in err[0]
    assert _snapshot(out) == before


def test_pretrain_accepts_timm_names(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = _fill(["pretrain", "--data", "imagefolder:{tree}", "--model", "timm:resnet10t",
                  "--out", "{out}", "--epochs", "1", "--batch-size", "64", "--device", "cpu",
                  *QUIET], world, tmp_path / "run")  # fmt: skip
    status = main(argv)
    err = capsys.readouterr().err
    assert "unknown `model`" not in err
    if importlib.util.find_spec("timm") is None:
        assert status == 2 and "timm" in err and len(err.strip().splitlines()) == 1
    else:
        assert status == 0, err


def test_a_checkpoint_of_non_finite_weights_is_not_written(tmp_path: Path) -> None:
    from selmix.data.formats import FeatureTensorDataset
    from selmix.finetune import FinetuneConfig, Trainer

    labels = torch.tensor([0] * 20 + [1] * 8 + [2] * 4)
    data = FeatureTensorDataset(torch.randn(32, 5), labels, 3)
    path = tmp_path / "state.pt"
    config = FinetuneConfig(steps=4, batch_size=8, checkpoint_path=str(path), progress=False)
    trainer = Trainer(create_model("linear", 3, in_channels=5), data, data, None, config)
    trainer.step = 1
    trainer.save_checkpoint()
    assert trainer.good_checkpoint == (str(path), 1)
    written = path.read_bytes()
    with torch.no_grad():
        trainer.model.head.weight[0, 0] = float("inf")
    trainer.step = 2
    trainer.save_checkpoint()
    assert path.read_bytes() == written and trainer.good_checkpoint == (str(path), 1)


def test_a_streamed_run_through_the_cli_matches_the_in_memory_run(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """--stream disk decodes each batch from the tree; without augmentation (small images
    keep the same crop/flip either way) it trains the same model as the in-memory run."""
    import torch

    runs = {}
    for storage in ("memory", "disk"):
        out = tmp_path / storage
        argv = _finetune_argv(world, out, "--stream", storage, "--num-workers", "0",
                              "--set", "augment=false", "--set", "select=last")  # fmt: skip
        assert main(argv) == 0
        runs[storage] = load_checkpoint(out / "model.pt")["state_dict"]
    for name, tensor in runs["memory"].items():
        torch.testing.assert_close(runs["disk"][name], tensor)


# -- issue 37: a finished run is never lost -------------------------------------------------------
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _used_out(world: dict[str, Path], tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """--out holding the good run, and the checksums of its files."""
    out = tmp_path / "run"
    shutil.copytree(world["good"], out)
    return out, _tree_digest(out)


def test_ctrl_c_of_a_new_run_into_a_used_out_leaves_the_earlier_run_intact(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """A real SIGINT to a `selmix finetune` process once it has written a checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    out, before = _used_out(world, tmp_path)
    staging = tmp_path / "run.partial"
    argv = _fill([*FT, "--steps", "100000", "--checkpoint-every", "2", *QUIET], world, out)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "selmix", *argv], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (staging / "finetune_state.pt").is_file():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert _tree_digest(out) == before, "Ctrl-C changed the earlier run"
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1 and f"--resume {staging / 'finetune_state.pt'}" in lines[0], err
    assert (staging / "finetune_state.pt").is_file()


def test_kill_9_into_a_used_out_then_resume_from_the_staging_folder(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """Killed (SIGKILL) right after its step-2 checkpoint: the earlier run is intact, and
    --resume from OUT.partial/ ends with the uninterrupted run's log and metrics in --out."""
    import json
    import subprocess
    import sys
    import textwrap

    args = ["--set", "feedback_every=2", "--checkpoint-every", "2"]
    whole = tmp_path / "whole"
    assert main(_finetune_argv(world, whole, *args)) == 0

    out, before = _used_out(world, tmp_path)
    argv = _finetune_argv(world, out, *args)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {SRC!r})
        import torch
        torch.set_num_threads(1)
        from selmix.finetune import Trainer
        original = Trainer.save_checkpoint
        def save_then_die(self):
            original(self)
            if self.step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        Trainer.save_checkpoint = save_then_die
        from selmix.cli import main
        sys.exit(main({argv!r}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert result.returncode == -9, result.stderr
    assert _tree_digest(out) == before, "a killed run changed the earlier run"
    staging = tmp_path / "run.partial"
    assert load_checkpoint(staging / "finetune_state.pt")["step"] == 2
    assert main([*argv, "--resume", str(staging / "finetune_state.pt")]) == 0
    assert not staging.exists()

    def untimed(path: Path) -> list[dict]:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "feedback_seconds"} for r in records]

    assert untimed(out / "log.jsonl") == untimed(whole / "log.jsonl")
    assert (out / "metrics.json").read_text() == (whole / "metrics.json").read_text()


def test_a_failed_export_keeps_the_finished_run_and_says_so_in_one_line(
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    import selmix.models.export

    def refused(model: object, folder: Path, formats: list[str], source: object) -> None:
        (Path(folder) / "model_state_dict.pt").write_bytes(b"half an export")
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    monkeypatch.setattr(selmix.models.export, "export_model", refused)
    out, before = _used_out(world, tmp_path)
    (out / "hf").mkdir()  # an earlier run's export
    (out / "hf" / "config.json").write_text("{}")
    capsys.readouterr()
    assert main(_finetune_argv(world, out, "--export", "state_dict")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1, lines
    assert str(tmp_path / "run.partial") not in lines[0]
    assert "the run finished and is in" in lines[0] and "`export` failed" in lines[0], lines
    assert "Permission denied" in lines[0]
    after = _tree_digest(out)
    assert after["model.pt"] != before["model.pt"], "the finished model was not kept"
    assert {"model.pt", "metrics.json", "timings.json", "config.yaml", "log.jsonl"} <= set(after)
    assert "model_state_dict.pt" not in after and not (out / "hf").exists()
    assert not (tmp_path / "run.partial").exists()


def test_a_rerun_without_export_leaves_no_stale_export(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out, before = _used_out(world, tmp_path)
    (out / "hf").mkdir()
    (out / "hf" / "config.json").write_text("{}")
    (out / "model_state_dict.pt").write_bytes(b"an earlier export")
    (out / "notes.txt").write_text("the user's own file\n")
    assert main(_finetune_argv(world, out)) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "hf" not in names and "model_state_dict.pt" not in names, names
    assert (out / "notes.txt").read_text() == "the user's own file\n"
    assert _tree_digest(out)["model.pt"] != before["model.pt"]
    assert not (tmp_path / "run.partial").exists()


def test_a_read_only_earlier_export_is_refused_before_the_run(
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import stat

    import selmix.cli.staging

    out, _ = _used_out(world, tmp_path)
    (out / "hf").mkdir()
    (out / "hf" / "config.json").write_text("{}")
    (out / "hf").chmod(0o555)
    before = _tree_digest(out)
    if os.geteuid() == 0:  # root writes anywhere: read the mode bits as another user would
        real = selmix.cli.staging._writable
        monkeypatch.setattr(selmix.cli.staging, "_writable", lambda folder: (
            real(folder) and bool(Path(folder).stat().st_mode & stat.S_IWUSR)))  # fmt: skip
    try:
        capsys.readouterr()
        assert main(_finetune_argv(world, out, "--export", "state_dict")) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "read-only folder" in lines[0], lines
        assert "hf" in lines[0] and "chmod" in lines[0]
        assert _tree_digest(out) == before
        assert not (tmp_path / "run.partial").exists()
    finally:
        (out / "hf").chmod(0o755)


def _live_staging(tmp_path: Path) -> Path:
    """``run.partial/`` owned by a live process on this host (the test's parent)."""
    from selmix._io import HOSTNAME

    staging = tmp_path / "run.partial"
    staging.mkdir()
    (staging / ".selmix-owner").write_text(f"{HOSTNAME}.{os.getppid()}\n")
    return staging


def test_a_live_run_writing_the_staging_folder_is_not_disturbed(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, before = _used_out(world, tmp_path)
    staging = _live_staging(tmp_path)
    capsys.readouterr()
    assert main(_finetune_argv(world, out)) == 2
    err = capsys.readouterr().err
    assert "another run is writing" in err and err.count("\n") == 1, err
    assert _tree_digest(out) == before and (staging / ".selmix-owner").is_file()


def test_hidden_files_and_folders_in_an_image_tree_are_skipped(tmp_path: Path) -> None:
    from selmix.data import load_data

    plain = _image_tree(tmp_path / "plain")
    hidden = _image_tree(tmp_path / "hidden")
    # a notebook's checkpoint copies of class_0's pictures under class_2, a hidden class
    # folder and a hidden file
    shutil.copytree(hidden / "train" / "class_0", hidden / "train" / "class_2" /
                    ".ipynb_checkpoints")  # fmt: skip
    shutil.copytree(hidden / "train" / "class_1", hidden / "train" / ".trash")
    shutil.copy(hidden / "train" / "class_1" / "0.png", hidden / "train" / "class_1" / ".0.png")
    got = load_data(f"imagefolder:{hidden}", val_per_class=3, cache_dir=str(tmp_path / "c1"))
    want = load_data(f"imagefolder:{plain}", val_per_class=3, cache_dir=str(tmp_path / "c2"))
    assert got.classes == want.classes == ["class_0", "class_1", "class_2"]
    assert got.train.class_counts().tolist() == want.train.class_counts().tolist()
    assert torch.equal(got.train.images, want.train.images)


PRETRAIN = ["pretrain", "--data", "imagefolder:{tree}", "--val-per-class", "3", "--model",
            "small_cnn", "--out", "{out}", "--device", "cpu", "--epochs", "1", "--batch-size",
            "16", "--overwrite", *QUIET]  # fmt: skip
BASELINE = ["baseline", "--method", "crt", "--data", "imagefolder:{tree}", "--val-per-class", "3",
            "--checkpoint", "{model}", "--out", "{out}", "--device", "cpu", "--set", "epochs=1",
            "--overwrite", *QUIET]  # fmt: skip


@pytest.mark.parametrize("command", ["pretrain", "baseline"])
@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_pretrain_and_baseline_failing_into_a_used_out_leave_the_earlier_run(
    command: str,
    failure: type,
    world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        raise failure("stopped")

    # the modules, not the functions of the same name that `selmix` exports
    module = importlib.import_module("selmix.engine.pretrain" if command == "pretrain" else
                                     "selmix.baselines")  # fmt: skip
    monkeypatch.setattr(module, command, fails)
    out, before = _used_out(world, tmp_path)
    argv = PRETRAIN if command == "pretrain" else BASELINE
    assert main(_fill(argv, world, out)) == (130 if failure is KeyboardInterrupt else 1)
    assert _tree_digest(out) == before
    assert not (tmp_path / "run.partial").exists()  # no checkpoint: nothing kept


@pytest.mark.parametrize("command", ["pretrain", "baseline"])
def test_pretrain_and_baseline_with_overwrite_replace_the_earlier_run(
    command: str, world: dict[str, Path], tmp_path: Path
) -> None:
    out, before = _used_out(world, tmp_path)
    argv = PRETRAIN if command == "pretrain" else BASELINE
    assert main(_fill(argv, world, out)) == 0
    names = sorted(p.name for p in out.iterdir())
    # the finetune run's own files are gone, this run's are there
    assert "finetune_state.pt" not in names and "log.jsonl" not in names, names
    assert {"model.pt", "metrics.json", "config.yaml"} <= set(names)
    assert _tree_digest(out)["model.pt"] != before["model.pt"]
    assert "overwrite" not in (out / "config.yaml").read_text()
    assert not (tmp_path / "run.partial").exists()


def test_an_hf_export_into_a_used_out_replaces_the_earlier_export(
    world: dict[str, Path], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=12, patch_size=4, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=1, intermediate_size=16, num_labels=3,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit12")
    out, _ = _used_out(world, tmp_path)
    (out / "hf").mkdir()
    (out / "hf" / "old.txt").write_text("an earlier export\n")
    (out / "hf.partial").mkdir()  # a killed export of an older selmix
    argv = _finetune_argv(world, out, "--checkpoint", f"hf:{tmp_path / 'vit12'}",
                          "--export", "hf")  # fmt: skip
    assert main(argv) == 0
    assert (out / "hf" / "config.json").is_file() and not (out / "hf" / "old.txt").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "hf"))) == ["hf"]
    assert not (tmp_path / "run.partial").exists()
    back = transformers.ViTForImageClassification.from_pretrained(out / "hf")
    assert back.config.image_size == 12


def test_the_staging_folder_is_a_sibling_of_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selmix.cli.options import UsageError
    from selmix.cli.staging import staging_path

    assert staging_path("runs/a") == Path("runs/a.partial")
    assert staging_path("runs/a/") == Path("runs/a.partial")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert staging_path(".") == tmp_path / "run.partial"  # --out . : beside the folder
    with pytest.raises(UsageError, match="`out` must be a folder below"):
        staging_path("/")


def test_who_may_use_a_staging_folder(tmp_path: Path) -> None:
    """A dead run's folder with a checkpoint: resumed, or discarded with --overwrite; one
    without a checkpoint: cleared by the next run; a live run's on this host: never; one
    of another host: only by the resume that names it (a job requeued on another node)."""
    from selmix._io import HOSTNAME
    from selmix.cli.options import UsageError
    from selmix.cli.staging import check_out

    out, staging = tmp_path / "run", tmp_path / "run.partial"
    staging.mkdir()
    state = staging / "finetune_state.pt"
    (staging / "config.yaml").write_text("steps: 4\n")
    check_out(out)  # no checkpoint: nothing to continue
    state.write_bytes(b"a checkpoint")
    with pytest.raises(UsageError, match=f"continue it with --resume {state}"):
        check_out(out)
    check_out(out, overwrite=True)
    check_out(out, resume=state)
    owner = staging / ".selmix-owner"
    owner.write_text(f"{HOSTNAME}.{os.getppid()}\n")  # alive, on this host
    for kwargs in ({}, {"overwrite": True}, {"resume": state}):
        with pytest.raises(UsageError, match="another run is writing"):
            check_out(out, **kwargs)
    check_out(out, writer=False)  # a torchrun rank other than 0 writes nothing
    owner.write_text("elsewhere.12345\n")
    with pytest.raises(UsageError, match="another run is writing"):
        check_out(out, overwrite=True)
    check_out(out, resume=state)


def test_ctrl_c_of_a_resume_before_its_own_checkpoint_names_the_one_it_started_from(
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    finetune_module = importlib.import_module("selmix.finetune")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "finetune", interrupted)
    out, before = _used_out(world, tmp_path)
    state = out / "finetune_state.pt"
    argv = _fill(RESUME, world, out)
    capsys.readouterr()
    assert main([*argv, *QUIET]) == 130
    err = capsys.readouterr().err
    assert f"the checkpoint is '{state}'" in err and err.rstrip().endswith(f"--resume {state}")
    assert _tree_digest(out) == before
    assert not (tmp_path / "run.partial").exists()


# -- `selmix evaluate --out`: staged like the other commands -------------------------------------
def _evaluate_argv(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return _fill([*EV, *extra], world, out)


def test_evaluate_into_a_new_out_writes_its_metrics_and_config(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import json

    import yaml

    out = tmp_path / "new" / "evaluation"
    assert main(_evaluate_argv(world, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.json"]
    assert set(json.loads((out / "metrics.json").read_text())) == {"test"}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert "overwrite" not in config and config["checkpoint"].endswith("model.pt")
    assert "# preprocessing source:" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["evaluation"]  # no staging left


def test_evaluate_with_overwrite_replaces_the_earlier_run_but_keeps_its_checkpoint(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """The model evaluated may live in --out: it stays; the earlier run's other files go."""
    import json

    out, before = _used_out(world, tmp_path)
    assert main(_evaluate_argv(world, out, "--checkpoint", str(out / "model.pt"))) == 0
    after = _tree_digest(out)
    assert after["model.pt"] == before["model.pt"]
    assert sorted(after) == ["config.yaml", "metrics.json", "model.pt"], sorted(after)
    assert set(json.loads((out / "metrics.json").read_text())) == {"test"}
    assert not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize("where", ["evaluating", "writing"])
def test_ctrl_c_of_evaluate_into_a_used_out_leaves_the_earlier_run_intact(
    where: str, world: dict[str, Path], tmp_path: Path
) -> None:
    """A real SIGINT to a `selmix evaluate` process, while it evaluates or once it has
    written part of its files: exit 130, the earlier run byte for byte, no staging left."""
    import subprocess
    import sys
    import textwrap

    out, before = _used_out(world, tmp_path)
    target = ("selmix.engine.evaluate", "evaluate") if where == "evaluating" else (
        "selmix.cli.evaluate", "_write_yaml")  # fmt: skip
    script = textwrap.dedent(f"""
        import importlib, os, signal, sys, time
        sys.path.insert(0, {SRC!r})
        import torch
        torch.set_num_threads(1)
        module = importlib.import_module({target[0]!r})
        original = getattr(module, {target[1]!r})
        def then_ctrl_c(*args, **kwargs):
            result = original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the signal's KeyboardInterrupt arrives here
            return result
        setattr(module, {target[1]!r}, then_ctrl_c)
        from selmix.cli import main
        sys.exit(main({_evaluate_argv(world, out)!r}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["selmix evaluate: interrupted"], result.stderr
    assert _tree_digest(out) == before, "Ctrl-C changed the earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_evaluate_beside_a_live_run_writing_the_staging_folder_is_refused(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, before = _used_out(world, tmp_path)
    staging = _live_staging(tmp_path)
    capsys.readouterr()
    assert main(_evaluate_argv(world, out)) == 2
    err = capsys.readouterr().err
    assert "another run is writing" in err and err.count("\n") == 1, err
    assert _tree_digest(out) == before and sorted(p.name for p in staging.iterdir()) == [
        ".selmix-owner"
    ]
