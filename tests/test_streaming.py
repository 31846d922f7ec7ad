"""Streaming image folders from disk through worker processes (selmix.data.streaming)."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from selmix.data import (
    DatasetAdapter,
    ImageTensorDataset,
    StreamingImageDataset,
    image_folder,
    load_data,
    load_image_folder,
)
from selmix.finetune import finetune
from selmix.models import create_model
from selmix.models.checkpoint import load_checkpoint

CLASSES = ("ant", "bee", "cat")


def write_tree(root: Path, per_class: dict[str, int], side: int, suffix: str = ".png") -> Path:
    """Random-noise images with a class-dependent tint, so classes are learnable."""
    rng = np.random.default_rng(side)
    for split, count in per_class.items():
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 160, (side, side + 3, 3), dtype=np.uint8)
                pixels[:, :, k] += 90
                Image.fromarray(pixels).save(folder / f"{i:03d}{suffix}")
    return root


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("small"), {"train": 16, "test": 4}, 16)


@pytest.fixture(scope="module")
def large_tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("large"), {"train": 10, "test": 3}, 72, ".jpg")


def test_streamed_small_tree_gives_the_in_memory_batches(small_tree):
    in_memory = load_image_folder(small_tree, image_size=16, stream=False)
    assert isinstance(in_memory["train"], ImageTensorDataset)
    streamed = {
        workers: load_image_folder(small_tree, image_size=16, stream=True, num_workers=workers)
        for workers in (0, 2)
    }
    assert isinstance(streamed[0]["train"], StreamingImageDataset)
    assert streamed[2]["train"].num_workers == 2
    torch.testing.assert_close(streamed[0]["train"].mean, in_memory["train"].mean)
    torch.testing.assert_close(streamed[0]["train"].std, in_memory["train"].std)
    index = torch.tensor([5, 0, 47, 16, 16, 31, 2])
    for augment in (False, True):
        expected = in_memory["train"].batch(
            index, augment, torch.Generator().manual_seed(3)
        )  # fmt: skip
        for splits in streamed.values():
            images, labels = splits["train"].batch(index, augment, torch.Generator().manual_seed(3))
            assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
    test = streamed[2]["test"]
    assert torch.equal(test.batch(range(len(test)))[0], in_memory["test"].batch(range(12))[0])
    # subsets share the workers and keep the rows
    part = streamed[2]["train"].subset([47, 5])
    assert part.pool is streamed[2]["train"].pool
    assert torch.equal(part.batch([0, 1])[0], in_memory["train"].batch([47, 5])[0])


def test_imagenet_transforms_are_seeded_per_image_whatever_the_workers(large_tree):
    splits = {
        workers: load_image_folder(large_tree, stream=True, num_workers=workers, crop_size=32)
        for workers in (0, 2)
    }
    train = splits[0]["train"]
    assert train.image_shape == (3, 32, 32) and not train.batch_crop
    index = torch.arange(0, 30, 2)
    batches = {}
    for workers, split in splits.items():
        generator = torch.Generator().manual_seed(7)
        batches[workers] = split["train"].batch(index, augment=True, generator=generator)[0]
        # one seed per batch is drawn from the caller's generator, no more
        reference = torch.Generator().manual_seed(7)
        torch.randint(0, 1 << 62, (1,), generator=reference)
        assert torch.equal(generator.get_state(), reference.get_state())
    assert batches[0].shape == (15, 3, 32, 32)
    assert torch.equal(batches[0], batches[2])
    other = train.batch(index, augment=True, generator=torch.Generator().manual_seed(8))[0]
    assert not torch.allclose(other, batches[0])
    # evaluation batches are deterministic and leave the generator alone
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    eval_a = splits[2]["test"].batch(range(9), generator=generator)[0]
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(eval_a, splits[0]["test"].batch(range(9))[0])


def test_image_folder_chooses_memory_or_streaming_by_size(small_tree, monkeypatch):
    files = [path for *_, path in image_folder._tree_files(small_tree, ("train", "test"))]
    assert len(files) == 60
    # 60 RGB images of 16 x 19 pixels
    assert image_folder.estimate_decoded_bytes(files) == 60 * 3 * 16 * 19
    assert image_folder.estimate_decoded_bytes(files, (8, 8)) == 60 * 3 * 8 * 8
    monkeypatch.setattr(image_folder, "available_memory", lambda: 4 * 60 * 3 * 16 * 19 - 4)
    assert isinstance(load_image_folder(small_tree)["train"], StreamingImageDataset)
    monkeypatch.setattr(image_folder, "available_memory", lambda: 4 * 60 * 3 * 16 * 19)
    assert isinstance(load_image_folder(small_tree)["train"], ImageTensorDataset)
    assert isinstance(
        load_image_folder(small_tree, stream=True, num_workers=0)["train"],
        StreamingImageDataset,
    )
    splits = load_data(f"imagefolder:{small_tree}", val_per_class=2, stream=True, num_workers=0)
    assert isinstance(splits.train, StreamingImageDataset) and len(splits.val) == 6


def test_streaming_settings_are_validated(small_tree):
    with pytest.raises(TypeError, match="`stream` must be None, True or False"):
        load_image_folder(small_tree, stream="yes")
    with pytest.raises(ValueError, match="`num_workers` must be"):
        load_image_folder(small_tree, stream=True, num_workers=-1)
    with pytest.raises(ValueError, match="`memory_fraction` must lie in"):
        load_image_folder(small_tree, memory_fraction=0)
    with pytest.raises(ValueError, match="pass `image_size`"):
        mixed = small_tree.parent / "mixed"
        write_tree(mixed, {"train": 2}, 12)
        Image.new("RGB", (10, 10)).save(mixed / "train" / "ant" / "z.png")
        load_image_folder(mixed, stream=True, num_workers=0)


def test_a_broken_file_names_itself_and_the_pool_recovers(tmp_path):
    root = write_tree(tmp_path / "tree", {"train": 3}, 16)
    splits = load_image_folder(root, stream=True, num_workers=2)
    (root / "train" / "bee" / "001.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bee/001.png cannot be decoded"):
        splits["train"].batch(range(9))
    assert splits["train"].batch([0, 1, 2, 6, 7])[0].shape == (5, 3, 16, 19)


class NoisyDataset(Dataset):
    """A user's data set whose transform draws from torch's global generator."""

    def __init__(self) -> None:
        self.images = torch.arange(20 * 3 * 8 * 8, dtype=torch.float32).reshape(20, 3, 8, 8)
        self.targets = [i % 4 for i in range(20)]

    def __len__(self) -> int:
        return 20

    def __getitem__(self, index: int):
        return self.images[index] + torch.rand(3, 8, 8), self.targets[index]


def test_dataset_adapter_workers_give_the_main_process_batches():
    adapters = {w: DatasetAdapter(NoisyDataset(), num_workers=w) for w in (0, 2)}
    index = [3, 19, 0, 7, 7, 12]
    batches = {
        w: a.batch(index, augment=True, generator=torch.Generator().manual_seed(1))[0]
        for w, a in adapters.items()
    }
    assert torch.equal(batches[0], batches[2])
    again = adapters[2].batch(index, augment=True, generator=torch.Generator().manual_seed(2))[0]
    assert not torch.equal(again, batches[2])
    assert adapters[2].subset([1, 2]).num_workers == 2


class Recording:
    """Passes a data set through, recording the indices of every batch."""

    def __init__(self, data) -> None:
        self.data = data
        self.calls: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices, *args, **kwargs):
        self.calls.append(torch.as_tensor(indices).clone())
        return self.data.batch(indices, *args, **kwargs)


SETTINGS = dict(
    steps=6, feedback_every=3, batch_size=8, eval_batch_size=16, frozen_backbone=False,
    select="last", progress=False, objective="mean_recall", lr_head=0.05, seed=4,
    head_init="none",  # the kill counts optimiser steps; head_init="auto" takes some
)  # fmt: skip


def test_streamed_and_in_memory_fine_tuning_agree(small_tree):
    torch.manual_seed(0)
    start = create_model("small_cnn", 3, in_channels=3)
    models, recorded = {}, {}
    for stream in (False, True):
        splits = load_data(
            f"imagefolder:{small_tree}", val_per_class=4, seed=1, stream=stream, num_workers=2
        )
        train = Recording(splits.train)
        models[stream] = copy.deepcopy(start)
        finetune(models[stream], train, splits.val, augment=False, **SETTINGS)
        recorded[stream] = train.calls
    assert len(recorded[True]) == len(recorded[False]) > 6
    for streamed, in_memory in zip(recorded[True], recorded[False], strict=True):
        assert torch.equal(streamed, in_memory)
    for key, value in models[False].state_dict().items():
        torch.testing.assert_close(models[True].state_dict()[key], value, msg=key)
    assert not torch.equal(models[True].head.weight, start.head.weight)


def test_streamed_run_killed_and_resumed_matches_the_uninterrupted_run(
    large_tree, tmp_path, monkeypatch
):
    splits = load_image_folder(large_tree, stream=True, num_workers=2, crop_size=16)
    train, val = splits["train"], splits["test"]  # ImageNet transforms, per-image seeds
    settings = dict(SETTINGS, steps=8, checkpoint_every=4, augment=True)
    torch.manual_seed(0)
    start = create_model("small_cnn", 3, in_channels=3)
    reference = copy.deepcopy(start)
    finetune(reference, train, val, checkpoint_path=str(tmp_path / "a.pt"), **settings)

    calls = {"n": 0}
    original_step = torch.optim.SGD.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during step 6, after the checkpoint of step 4
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(
            copy.deepcopy(start), train, val,
            checkpoint_path=str(tmp_path / "b.pt"), **settings,
        )  # fmt: skip
    monkeypatch.setattr(torch.optim.SGD, "step", original_step)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 4

    resumed = copy.deepcopy(start)
    finetune(
        resumed, train, val, checkpoint_path=str(tmp_path / "b.pt"),
        resume=tmp_path / "b.pt", **settings,
    )  # fmt: skip
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert not torch.equal(reference.head.weight, start.head.weight)


def test_imagenet_lt_batches_are_decoded_by_workers_with_the_same_crops(large_tree, tmp_path):
    from selmix.data.formats import ImageListDataset

    paths = [p.relative_to(large_tree).as_posix() for p in sorted(large_tree.rglob("*.jpg"))]
    labels = [CLASSES.index(Path(p).parts[1]) for p in paths]
    lists = {
        w: ImageListDataset(large_tree, paths, labels, 3, resize=40, crop=32, num_workers=w)
        for w in (0, 2)
    }
    index = [0, 5, 12, 30, 38, 3]
    batches = {
        w: data.batch(index, augment=True, generator=torch.Generator().manual_seed(5))[0]
        for w, data in lists.items()
    }
    assert batches[0].shape == (6, 3, 32, 32)
    assert torch.equal(batches[0], batches[2])
    assert torch.equal(lists[0].batch(index)[0], lists[2].batch(index)[0])
    assert lists[2].subset([1, 2]).num_workers == 2


def test_the_unlabelled_pool_asks_for_in_memory_data(small_tree):
    with pytest.raises(ValueError, match="pass `stream=False`"):
        load_data(
            f"imagefolder:{small_tree}", val_per_class=2, stream=True, num_workers=0,
            unlabelled_max_per_class=2,
        )  # fmt: skip
