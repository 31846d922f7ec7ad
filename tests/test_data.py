"""Tests of selmix.data: datasets, augmentation, long-tailed splits and the sources."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import pickle
import random
import struct
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from selmix.data import (
    DataSplits,
    ImageTensorDataset,
    as_tensor_dataset,
    load_cifar10,
    load_data,
    load_fashion_mnist,
    load_image_folder,
    long_tail_counts,
    long_tail_split,
    random_crop_flip,
    read_idx,
    semi_supervised_split,
)
from selmix.data import image_folder as image_folder_module
from selmix.data.sources import read_data_pickle

torch.set_num_threads(1)

FASHION_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file(),
    reason="the shared Fashion-MNIST files are not available",
)


def random_images(n: int, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


# --------------------------------------------------------------------------------------------
# long_tail_counts


def test_long_tail_counts_match_cifar10_lt():
    counts = long_tail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406
    assert sum(long_tail_counts(4500, 10, 100)) == 11165


def test_long_tail_counts_follow_the_formula():
    for k, n in enumerate(long_tail_counts(1500, 10, 100)):
        assert n == math.floor(1500 * 100 ** (-k / 9))
    counts = long_tail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5 and sum(counts) == 10847  # CIFAR-100-LT
    assert long_tail_counts(7, 4, 1) == [7, 7, 7, 7]


def test_long_tail_counts_inverted_imbalance_increases():
    counts = long_tail_counts(30, 10, 1 / 100)
    assert counts[0] == 30 and counts[-1] == 3000
    assert counts == sorted(counts)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((100, 10, 0), ValueError, r"`imbalance` must be > 0 and finite, got 0"),
        ((100, 10, -2.0), ValueError, r"`imbalance` must be > 0"),
        ((100, 10, float("nan")), ValueError, r"`imbalance` must be > 0 and finite, got nan"),
        ((100, 10, "100"), TypeError, r"`imbalance` must be a number, got str"),
        ((100, 1, 10), ValueError, r"`num_classes` must be >= 2, got 1"),
        ((0, 10, 10), ValueError, r"`max_per_class` must be >= 1, got 0"),
        ((10.5, 10, 10), TypeError, r"`max_per_class` must be an int, got float"),
    ],
)
def test_long_tail_counts_validates(args, error, match):
    with pytest.raises(error, match=match):
        long_tail_counts(*args)


# --------------------------------------------------------------------------------------------
# long_tail_split


def shuffled_labels(per_class: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def test_long_tail_split_is_disjoint_balanced_and_long_tailed():
    labels = shuffled_labels(60, 5)
    counts = long_tail_counts(50, 5, 10)
    train, val = long_tail_split(labels, counts, val_per_class=10, seed=3)
    assert train.dtype == val.dtype == torch.long
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert len(set(train.tolist())) == train.numel()
    assert torch.bincount(labels[train], minlength=5).tolist() == counts
    assert torch.bincount(labels[val], minlength=5).tolist() == [10] * 5


def test_long_tail_split_is_deterministic_given_the_seed():
    labels = shuffled_labels(40, 4)
    counts = [30, 20, 10, 5]
    first = long_tail_split(labels, counts, 5, seed=1)
    again = long_tail_split(labels, counts, 5, seed=1)
    other = long_tail_split(labels, counts, 5, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[1], other[1])
    from_generator = long_tail_split(labels, counts, 5, seed=torch.Generator().manual_seed(1))
    assert torch.equal(from_generator[0], first[0])


def test_long_tail_split_names_the_class_with_too_few_samples():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 4)
    with pytest.raises(ValueError, match=r"class 2 has 4 samples.*2 \+ 3 = 5"):
        long_tail_split(labels, [5, 5, 3], val_per_class=2, seed=0)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\)"):
        long_tail_split(labels, [5, 5], val_per_class=0, seed=0)
    with pytest.raises(ValueError, match=r"`val_per_class` must be >= 0, got -1"):
        long_tail_split(labels, [1, 1, 1], val_per_class=-1, seed=0)


def test_long_tail_split_takes_one_validation_count_per_class():
    labels = shuffled_labels(60, 4)
    counts = [55, 30, 10, 5]
    train, val = long_tail_split(labels, counts, val_per_class=[5, 10, 10, 10], seed=4)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.bincount(labels[train], minlength=4).tolist() == counts
    assert torch.bincount(labels[val], minlength=4).tolist() == [5, 10, 10, 10]
    # Equal per-class counts draw exactly what the single int draws.
    as_int = long_tail_split(labels, [50, 30, 10, 5], val_per_class=10, seed=4)
    as_list = long_tail_split(labels, [50, 30, 10, 5], val_per_class=[10] * 4, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(as_int, as_list, strict=True))
    # The shuffle of each class does not depend on its own validation count, so class 0's
    # training images are a superset when its validation set shrinks.
    first_train = set(as_int[0][labels[as_int[0]] == 0].tolist())
    assert first_train < set(train[labels[train] == 0].tolist())
    with pytest.raises(ValueError, match=r"`val_per_class` must be an int >= 0 or 4 ints"):
        long_tail_split(labels, counts, val_per_class=[5, 10, 10], seed=0)
    with pytest.raises(ValueError, match=r"class 0 has 60 samples.*6 \+ 55 = 61"):
        long_tail_split(labels, counts, val_per_class=[6, 0, 0, 0], seed=0)


# --------------------------------------------------------------------------------------------
# ImageTensorDataset and augmentation


def test_batch_without_augmentation_normalises():
    images = random_images(6)
    data = ImageTensorDataset(images, torch.arange(6) % 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    x, y = data.batch(torch.tensor([4, 1]))
    expected = images[[4, 1]].double() / 255
    expected = (expected - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.5]
    ).view(3, 1, 1)
    assert x.dtype == torch.float32 and y.tolist() == [1, 1]
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=1e-5)
    single, label = data[4]
    torch.testing.assert_close(single, x[0])
    assert label == 1 and isinstance(label, int)


def find_crop(output: np.ndarray, padded: np.ndarray) -> set[tuple[int, int, bool]]:
    """All (dy, dx, flipped) windows of ``padded`` [C, H+2p, W+2p] equal to ``output``."""
    _, h, w = output.shape
    matches = set()
    for dy in range(padded.shape[1] - h + 1):
        for dx in range(padded.shape[2] - w + 1):
            window = padded[:, dy : dy + h, dx : dx + w]
            if np.array_equal(window, output):
                matches.add((dy, dx, False))
            if np.array_equal(window[:, :, ::-1], output):
                matches.add((dy, dx, True))
    return matches


@pytest.mark.parametrize("flip", [True, False])
def test_augmentation_crops_are_shifts_of_the_reflect_padded_image(flip):
    images = random_images(48, channels=2, size=12)
    data = ImageTensorDataset(images, torch.zeros(48, dtype=torch.long), 0.0, 1 / 255, flip=flip)
    x, _ = data.batch(torch.arange(48), augment=True, generator=torch.Generator().manual_seed(0))
    # With mean 0 and std 1/255 normalisation is the identity on the 0..255 pixel values.
    augmented = x.round().to(torch.uint8).numpy()
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    found = []
    for i in range(48):
        matches = find_crop(augmented[i], padded[i])
        assert len(matches) == 1, f"image {i} is not a unique crop of its padded image"
        found.append(matches.pop())
    flips = {f for _, _, f in found}
    assert flips == ({False, True} if flip else {False})
    assert len({(dy, dx) for dy, dx, _ in found}) >= 20  # offsets vary over the 9 x 9 grid


def test_augmentation_is_deterministic_given_the_generator():
    data = ImageTensorDataset(random_images(32), torch.zeros(32, dtype=torch.long), 0.5, 0.25)
    index = torch.arange(32)
    a, _ = data.batch(index, augment=True, generator=torch.Generator().manual_seed(7))
    b, _ = data.batch(index, augment=True, generator=torch.Generator().manual_seed(7))
    c, _ = data.batch(index, augment=True, generator=torch.Generator().manual_seed(8))
    plain, _ = data.batch(index)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, plain)


def test_random_crop_flip_with_padding_zero_only_flips():
    images = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    out = random_crop_flip(images, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(-1))


def test_dataset_works_with_a_dataloader_and_subsets_keep_classes():
    data = ImageTensorDataset(
        random_images(10, channels=1), torch.arange(10) % 5, 0.5, 0.5, list("abcde")
    )
    x, y = next(iter(DataLoader(data, batch_size=4)))
    assert x.shape == (4, 1, 8, 8) and y.tolist() == [0, 1, 2, 3]
    sub = data.subset(torch.tensor([0, 5]))
    assert len(sub) == 2 and sub.num_classes == 5 and sub.classes == list("abcde")
    assert sub.class_counts().tolist() == [2, 0, 0, 0, 0]
    assert torch.equal(sub.images, data.images[[0, 5]])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"images": torch.zeros(2, 1, 4, 4)}, ValueError, r"`images` must be a uint8 Tensor"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, ValueError, r"one entry per image \(2\)"),
        ({"labels": torch.tensor([0.0, 1.0])}, TypeError, "`labels` must hold integers"),
        ({"labels": torch.tensor([0, 5]), "classes": ["a", "b"]}, ValueError, r"\[0, 2\)"),
        ({"std": 0.0}, ValueError, "`std` must be > 0"),
        ({"mean": (0.1, 0.2)}, ValueError, r"`mean` must have one value per channel \(1\)"),
    ],
)
def test_dataset_validates(kwargs, error, match):
    arguments = {
        "images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        "labels": torch.tensor([0, 1]),
        "mean": 0.5,
        "std": 0.5,
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        ImageTensorDataset(**arguments)
    data = ImageTensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [0, 1], 0.5, 0.5)
    with pytest.raises(IndexError, match=r"`indices` must lie in \[0, 2\), got 2"):
        data.batch([0, 2])


class PlainDataset(Dataset):
    """Yields (x, y) with no ``targets`` attribute, so labels must be read by iterating."""

    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 2, 3)
        self.y = [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def test_as_tensor_dataset_wraps_generic_datasets():
    plain = PlainDataset(7)
    wrapped = as_tensor_dataset(plain)
    assert wrapped.labels.tolist() == plain.y and wrapped.num_classes == 3
    x, y = wrapped.batch([6, 2], augment=True)
    assert torch.equal(x, plain.x[[6, 2]]) and y.tolist() == [0, 2]
    sub = wrapped.subset([1, 4])
    assert sub.labels.tolist() == [1, 1] and sub.num_classes == 3 and len(sub) == 2

    tensors = TensorDataset(torch.randn(4, 3), torch.tensor([1, 0, 1, 1]))
    assert as_tensor_dataset(tensors).labels.tolist() == [1, 0, 1, 1]

    plain.targets = [2, 2, 2, 2, 2, 2, 0]  # read in preference to iterating
    assert as_tensor_dataset(plain).labels.tolist() == plain.targets

    native = ImageTensorDataset(random_images(2), [0, 1], 0.5, 0.5)
    assert as_tensor_dataset(native) is native


def test_as_tensor_dataset_rejects_non_tensor_items():
    class Images(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int):
            return Image.new("L", (4, 4)), i

    with pytest.raises(TypeError, match=r"\(Tensor, label\) pairs, got a Image.*ToTensor"):
        as_tensor_dataset(Images()).batch([0, 1])


# --------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_reads_big_endian_data(tmp_path, compress):
    array = np.arange(-12, 12, dtype=np.int16).reshape(2, 3, 4) * 1000
    write_idx(tmp_path / "x.idx", array, 0x0B, compress)
    out = read_idx(tmp_path / "x.idx")
    assert out.dtype == torch.int16 and out.shape == (2, 3, 4)
    assert np.array_equal(out.numpy(), array)


def test_read_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.idx"):
        read_idx(tmp_path / "missing.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "bad.idx")
    write_idx(tmp_path / "short.idx", np.zeros(5, dtype=np.uint8), 0x08, False)
    (tmp_path / "short.idx").write_bytes((tmp_path / "short.idx").read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx(tmp_path / "short.idx")


@needs_fashion_mnist
def test_read_idx_on_the_real_fashion_mnist_labels():
    labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,) and labels.dtype == torch.uint8
    assert torch.bincount(labels.long()).tolist() == [6000] * 10


@needs_fashion_mnist
def test_load_fashion_mnist_test_split():
    test = load_fashion_mnist(FASHION_MNIST, train=False)
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.class_counts().tolist() == [1000] * 10
    assert test.classes[0] == "T-shirt/top" and test.classes[9] == "Ankle boot"
    mean, std = test.images.double().mean() / 255, (test.images.double() / 255).std()
    assert abs(mean - 0.2860) < 0.01 and abs(std - 0.3530) < 0.01
    with pytest.raises(FileNotFoundError, match="not found"):
        load_fashion_mnist(FASHION_MNIST / "nowhere")


@needs_fashion_mnist
def test_load_data_fashion_mnist_long_tailed():
    splits = load_data(f"fashion-mnist:{FASHION_MNIST}", imbalance=100, seed=1)
    assert splits.train.class_counts().tolist() == long_tail_counts(5500, 10, 100)
    assert splits.val.class_counts().tolist() == [500] * 10
    assert len(splits.test) == 10000 and splits.num_classes == 10


# --------------------------------------------------------------------------------------------
# CIFAR-10 and image folders, on tiny synthetic trees


def encoded(value: int, size: tuple[int, int] = (32, 32), mode: str = "RGB", fmt: str = "PNG"):
    """An image whose pixels all carry ``value``, encoded as bytes (PNG keeps them exact)."""
    colour = (value, 255 - value, value // 2) if mode == "RGB" else value
    buffer = io.BytesIO()
    Image.new(mode, (size[1], size[0]), colour).save(buffer, format=fmt)
    return buffer.getvalue()


# (split, class, file name, pixel value): classes in non-sorted order on purpose.
TREE = [
    (split, cls, f"{i:04d}.png", 10 * c + i + (100 if split == "test" else 0))
    for split, n in (("train", 3), ("test", 2))
    for c, cls in enumerate(["truck", "cat", "airplane"])
    for i in range(n)
]


def make_archive(path: Path, entries, seed: int = 0) -> None:
    entries = list(entries)
    random.Random(seed).shuffle(entries)  # archive order must not matter
    with tarfile.open(path, "w:gz") as tar:
        for split, cls, name, value in entries:
            data = encoded(value)
            info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_tree(root: Path, entries, size=(32, 32), mode="RGB") -> None:
    for split, cls, name, value in entries:
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encoded(value, size, mode))


def expected_order(split: str):
    rows = sorted((cls, name, value) for s, cls, name, value in TREE if s == split)
    classes = sorted({cls for _, cls, _, _ in TREE})
    return [classes.index(cls) for cls, _, _ in rows], [value for _, _, value in rows]


def test_load_cifar10_from_archive_orders_and_caches(tmp_path, monkeypatch):
    archive = tmp_path / "tiny-cifar.tar.gz"
    make_archive(archive, TREE)
    cache = tmp_path / "cache"
    train = load_cifar10(archive, train=True, cache_dir=cache)
    assert train.classes == ["airplane", "cat", "truck"]
    assert train.images.shape == (9, 3, 32, 32) and train.images.dtype == torch.uint8
    labels, values = expected_order("train")
    assert train.labels.tolist() == labels
    assert train.images[:, 0, 0, 0].tolist() == values
    assert train.images[:, 1, 5, 5].tolist() == [255 - v for v in values]
    assert len(list(cache.glob("cifar10-*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(image_folder_module, "_decode_entries", no_decoding)
        test = load_cifar10(archive, train=False, cache_dir=cache)
    labels, values = expected_order("test")
    assert test.labels.tolist() == labels and test.images[:, 0, 0, 0].tolist() == values

    # A damaged cache file is decoded again rather than failing.
    cache_file = next(cache.glob("cifar10-*.npz"))
    cache_file.write_bytes(b"not an npz file")
    assert torch.equal(load_cifar10(archive, train=True, cache_dir=cache).images, train.images)


def test_load_cifar10_from_folder_tree_matches_the_archive(tmp_path):
    make_archive(tmp_path / "c.tar.gz", TREE)
    make_tree(tmp_path / "data" / "cifar10", TREE)
    from_archive = load_cifar10(tmp_path / "c.tar.gz", cache_dir=tmp_path / "cache")
    from_tree = load_cifar10(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert torch.equal(from_archive.images, from_tree.images)
    assert torch.equal(from_archive.labels, from_tree.labels)


def test_load_cifar10_decodes_jpeg(tmp_path):
    folder = tmp_path / "train" / "cat"
    folder.mkdir(parents=True)
    (folder / "0000.jpg").write_bytes(encoded(200, fmt="JPEG"))
    data = load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert abs(int(data.images[0, 0, 16, 16]) - 200) <= 3


def _numpy1_names(data: bytes) -> bytes:
    """A protocol-2 pickle as NumPy 1 (which wrote the original CIFAR files) names its types."""
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.mark.parametrize("protocol", [2, 4, 5, "numpy1"])
def test_load_cifar10_from_torchvision_pickles(tmp_path, protocol):
    def dumps(value) -> bytes:
        if protocol == "numpy1":
            return _numpy1_names(pickle.dumps(value, protocol=2))
        return pickle.dumps(value, protocol=protocol)

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": b"training batch",
            b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
            b"labels": [int(name[-1]) % 10 if name != "test_batch" else 9, 0],
            b"filenames": [b"a.png", b"b.png"],
        }
        (folder / name).write_bytes(dumps(batch))
    names = [n.encode() for n in ["plane", "car", "bird", "cat", "deer"]]
    names += [n.encode() for n in ["dog", "frog", "horse", "ship", "truck"]]
    (folder / "batches.meta").write_bytes(dumps({b"label_names": names, b"num_vis": 3072}))
    train = load_cifar10(tmp_path, train=True)
    test = load_cifar10(folder, train=False)
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    assert train.labels.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]
    assert test.classes[0] == "plane" and test.labels.tolist() == [9, 0]
    first = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    assert np.array_equal(train.images[0].numpy().reshape(-1), first)


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 data found"):
        load_cifar10(tmp_path)
    make_tree(tmp_path / "small", [("train", "cat", "a.png", 1)], size=(8, 8))
    with pytest.raises(ValueError, match="3x32x32, got 3x8x8"):
        load_cifar10(tmp_path / "small", cache_dir=tmp_path / "cache")


class _RunsCode:
    """Pickles as a call to ``function(*args)``: what a malicious data file does."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _cifar_folder_with(tmp_path, batch_1: bytes) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        (folder / name).write_bytes(good)
    (folder / "data_batch_1").write_bytes(batch_1)
    return folder


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("where", ["top", "inside the dict", "as an array dtype"])
def test_cifar_pickle_that_runs_code_is_refused_without_running_it(tmp_path, protocol, where):
    marker = tmp_path / "code-ran"
    payload = _RunsCode(os.system, f"touch {marker}")
    if where == "top":
        value = payload
    elif where == "inside the dict":
        value = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload]}
    else:  # an object array unpickles its elements: a place to hide a call
        value = {b"data": np.array([payload], dtype=object), b"labels": [0]}
    folder = _cifar_folder_with(tmp_path, pickle.dumps(value, protocol=protocol))
    with pytest.raises(ValueError, match="data_batch_1 is not readable data") as raised:
        load_cifar10(folder)
    assert not marker.exists(), "the pickle ran code"
    assert "\n" not in str(raised.value)
    assert "posix.system" in str(raised.value) or "object" in str(raised.value)


def test_read_data_pickle_refuses_other_codecs_and_builtins(tmp_path):
    # _codecs.encode is allowed for bytes, but only with latin1
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x03\x00\x00\x00hex\x86R.")
    with pytest.raises(ValueError, match="encoding 'hex' is not allowed"):
        read_data_pickle(path)
    path.write_bytes(pickle.dumps(_RunsCode(eval, "1 + 1")))
    with pytest.raises(ValueError, match="builtins.eval"):
        read_data_pickle(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_data_pickle(tmp_path / "nowhere")


_GOOD_BATCH = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "data_batch_1 is empty"),
        (pickle.dumps(_GOOD_BATCH)[:-40], "data_batch_1 is not readable"),
        (b"\x00garbage bytes", "data_batch_1 is not readable data"),
        (pickle.dumps([1, 2, 3]), "data_batch_1 does not hold a CIFAR batch"),
        (pickle.dumps({**_GOOD_BATCH, b"data": np.zeros((2, 100), np.uint8)}), "CIFAR batch"),
        (pickle.dumps({**_GOOD_BATCH, b"labels": [0]}), "2 images but 1 labels"),
    ],
    ids=["empty", "truncated", "garbage", "a list", "wrong image size", "labels short"],
)
def test_corrupt_cifar_pickles_give_one_line_naming_the_file(tmp_path, content, match):
    folder = _cifar_folder_with(tmp_path, content)
    with pytest.raises(ValueError, match=match) as raised:
        load_cifar10(folder)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_fashion_mnist_gz_names_the_file(tmp_path, cut):
    payload = struct.pack(">BBBBI", 0, 0, 0x08, 1, 5000) + bytes(range(256)) * 19 + bytes(136)
    data = gzip.compress(payload)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is truncated or corrupt"):
        read_idx(path)
    path.write_bytes(data[:2] + b"\xff" * 40)  # gzip magic, then garbage
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        read_idx(path)


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_cifar_archive_names_the_file(tmp_path, cut):
    whole = tmp_path / "whole.tar.gz"
    make_archive(whole, TREE)
    data = whole.read_bytes()
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="cut.tar.gz is truncated or corrupt") as raised:
        load_cifar10(archive, cache_dir=tmp_path / "cache")
    assert "\n" not in str(raised.value)
    assert not list((tmp_path / "cache").glob("*.npz")), "a cut archive must leave no cache"


def test_load_image_folder_splits_and_grey_images(tmp_path):
    entries = [("train", c, f"{i}.png", 40 * k + i) for k, c in enumerate("ab") for i in range(3)]
    entries += [("val", "b", "v.png", 7), ("test", "a", "t.png", 9)]
    make_tree(tmp_path, entries, size=(5, 6), mode="L")
    splits = load_image_folder(tmp_path)
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"].images.shape == (6, 1, 5, 6)
    assert splits["train"].images[:, 0, 0, 0].tolist() == [0, 1, 2, 40, 41, 42]
    assert splits["val"].labels.tolist() == [1] and splits["test"].labels.tolist() == [0]
    assert splits["test"].num_classes == 2 and splits["val"].classes == ["a", "b"]
    assert splits["train"].mean.item() == pytest.approx(126 / 6 / 255, abs=1e-4)


def test_load_image_folder_sizes(tmp_path):
    make_tree(tmp_path, [("train", "a", "0.png", 1)], size=(8, 8))
    make_tree(tmp_path, [("train", "b", "0.png", 2)], size=(6, 10))
    with pytest.raises(
        ValueError, match=r"train/b/0.png is 6x10 but the others are 8x8.*image_size"
    ):
        load_image_folder(tmp_path)
    resized = load_image_folder(tmp_path, image_size=(4, 5))["train"]
    assert resized.images.shape == (2, 3, 4, 5)


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"must contain a train/ folder"):
        load_image_folder(tmp_path)
    make_tree(tmp_path, [("train", "a", "0.png", 1), ("test", "z", "0.png", 2)], size=(4, 4))
    with pytest.raises(ValueError, match=r"test/ has classes \['z'\]"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="`image_size` must be None"):
        load_image_folder(tmp_path, image_size=(0, 3))


# --------------------------------------------------------------------------------------------
# load_data


def make_long_tail_folder(root: Path, per_class: int = 20, test_per_class: int = 2) -> None:
    entries = [
        ("train", f"c{k}", f"{i:03d}.png", 50 * k + i) for k in range(3) for i in range(per_class)
    ]
    entries += [
        ("test", f"c{k}", f"{i}.png", 200 + k) for k in range(3) for i in range(test_per_class)
    ]
    make_tree(root, entries, size=(4, 4), mode="L")


def pixel_ids(data: ImageTensorDataset) -> set[int]:
    return set(data.images[:, 0, 0, 0].tolist())


def test_load_data_image_folder_long_tail_split(tmp_path):
    make_long_tail_folder(tmp_path)
    splits = load_data(f"imagefolder:{tmp_path}", imbalance=4, seed=0)
    assert isinstance(splits, DataSplits) and splits.classes == ["c0", "c1", "c2"]
    # Validation: half the smallest class (10 per class); N_1 = 20 - 10 = 10.
    assert splits.val.class_counts().tolist() == [10, 10, 10]
    assert splits.train.class_counts().tolist() == long_tail_counts(10, 3, 4) == [10, 5, 2]
    assert pixel_ids(splits.train).isdisjoint(pixel_ids(splits.val))
    assert len(splits.test) == 6 and splits.unlabelled is None

    again = load_data(f"imagefolder:{tmp_path}", imbalance=4, seed=0)
    other = load_data(f"imagefolder:{tmp_path}", imbalance=4, seed=1)
    assert torch.equal(again.train.images, splits.train.images)
    assert not torch.equal(other.val.images, splits.val.images)


def test_load_data_caps_and_keeps_everything(tmp_path):
    make_long_tail_folder(tmp_path)
    spec = f"imagefolder:{tmp_path}"
    capped = load_data(spec, max_per_class=5, val_per_class=3)
    assert capped.train.class_counts().tolist() == [5, 5, 5]
    assert capped.val.class_counts().tolist() == [3, 3, 3]
    everything = load_data(spec, val_per_class=0)
    assert everything.train.class_counts().tolist() == [20, 20, 20] and len(everything.val) == 0


def test_load_data_unlabelled_pool_is_disjoint_and_inverted(tmp_path):
    make_long_tail_folder(tmp_path)
    splits = load_data(
        f"imagefolder:{tmp_path}",
        imbalance=4,
        max_per_class=8,
        val_per_class=2,
        unlabelled_max_per_class=4,
        unlabelled_imbalance=0.25,
    )
    assert splits.train.class_counts().tolist() == [8, 4, 2]
    assert (splits.unlabelled.labels == -1).all()
    assert torch.bincount(splits.unlabelled.hidden_labels).tolist() == [4, 8, 16]
    assert "unlabelled: 28 images, per class (hidden labels) [4, 8, 16]" in splits.describe()
    unlabelled = pixel_ids(splits.unlabelled)
    assert unlabelled.isdisjoint(pixel_ids(splits.train))
    assert unlabelled.isdisjoint(pixel_ids(splits.val))


def test_load_data_unlabelled_pool_equals_semi_supervised_split(tmp_path):
    make_long_tail_folder(tmp_path)
    splits = load_data(
        f"imagefolder:{tmp_path}",
        imbalance=4,
        max_per_class=8,
        val_per_class=2,
        seed=5,
        unlabelled_max_per_class=6,
        unlabelled_imbalance=4,
    )
    full = load_image_folder(tmp_path)["train"]
    split = semi_supervised_split(full.labels, 8, 4, 6, 4, val_per_class=2, seed=5)
    assert torch.equal(splits.train.images, full.images[split.labelled])
    assert torch.equal(splits.val.images, full.images[split.val])
    assert torch.equal(splits.unlabelled.images, full.images[split.unlabelled])


def test_load_data_uses_an_image_folders_own_val(tmp_path):
    make_long_tail_folder(tmp_path)
    make_tree(tmp_path, [("val", "c1", "v.png", 222)], size=(4, 4), mode="L")
    splits = load_data(f"imagefolder:{tmp_path}")
    assert splits.val.labels.tolist() == [1] and pixel_ids(splits.val) == {222}
    assert splits.train.class_counts().tolist() == [20, 20, 20]
    with pytest.raises(ValueError, match=r"`val_per_class` must be None: .* own val/ folder"):
        load_data(f"imagefolder:{tmp_path}", val_per_class=2)


@pytest.mark.parametrize(
    ("spec", "kwargs", "error", "match"),
    [
        (
            "mnist:/data",
            {},
            ValueError,
            r"unknown data `spec` 'mnist:/data'.*'cifar10:PATH'.*'demo'",
        ),
        ("cifar10", {}, ValueError, r"unknown data `spec` 'cifar10'"),
        ("demo", {"imbalance": 10}, ValueError, r"'demo' training set .* can only be subsampled"),
        ("demo", {"val_per_class": 101}, ValueError, r"`val_per_class` must be <= 100"),
        ("demo", {"unlabelled_max_per_class": 5}, ValueError, r"no unlabelled pool"),
        ("cifar10:/x", {"imbalance": 0}, ValueError, r"`imbalance` must be > 0, got 0"),
        (
            "cifar10:/x",
            {"unlabelled_imbalance": 1.0},
            ValueError,
            "needs `unlabelled_max_per_class`",
        ),
        ("imagefolder:/no/such/dir", {}, FileNotFoundError, "/no/such/dir"),
        (3, {}, TypeError, "`spec` must be a str"),
        ("demo", {"imbalance": "high"}, TypeError, "`imbalance` must be a number, got str"),
        ("cifar10:/x", {"unlabelled_max_per_class": 0}, ValueError, "must be >= 1, got 0"),
    ],
)
def test_load_data_errors(spec, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_data(spec, **kwargs)


@pytest.mark.parametrize(("per_class", "expected"), [(10, 5), (30, 15), (100, 50), (400, 50)])
def test_the_carved_validation_default_is_half_the_smallest_class_at_most_50(
    per_class, expected
):
    from selmix.data.sources import carved_val_per_class

    sizes = torch.tensor([per_class * 4, per_class * 2, per_class])
    assert carved_val_per_class(sizes, ["a", "b", "c"]) == expected


def test_a_class_too_small_to_carve_a_validation_set_is_named(tmp_path):
    from selmix.data.sources import carved_val_per_class

    with pytest.raises(ValueError, match=r"class 'c' has 9 training samples.*`val_per_class`"):
        carved_val_per_class(torch.tensor([40, 20, 9]), ["a", "b", "c"])
    make_long_tail_folder(tmp_path, per_class=8)
    with pytest.raises(ValueError, match=r"class 'c0' has 8 training samples, too few"):
        load_data(f"imagefolder:{tmp_path}")
    assert load_data(f"imagefolder:{tmp_path}", val_per_class=2).val.class_counts().tolist() == [
        2, 2, 2,
    ]  # fmt: skip


def test_a_val_per_class_taking_a_whole_class_names_it(tmp_path):
    make_long_tail_folder(tmp_path)
    with pytest.raises(ValueError, match=r"no training sample of class 'c0' \(it has 20\)"):
        load_data(f"imagefolder:{tmp_path}", val_per_class=20, imbalance=2)


def test_load_data_too_few_samples_names_the_class(tmp_path):
    make_long_tail_folder(tmp_path)
    with pytest.raises(ValueError, match=r"class 0 has 20 samples"):
        load_data(f"imagefolder:{tmp_path}", imbalance=2, max_per_class=19, val_per_class=2)


def test_demo_subset():
    splits = load_data("demo")
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.train.class_counts().tolist() == long_tail_counts(1500, 10, 100)
    assert splits.val.class_counts().tolist() == [100] * 10
    assert splits.test.class_counts().tolist() == [300] * 10
    assert splits.classes[0] == "T-shirt/top"
    assert splits.train.mean.tolist() == pytest.approx([0.2860])
    asset = resources.files("selmix") / "assets" / "fashion_mnist_lt_demo.npz"
    with resources.as_file(asset) as path, np.load(path) as archive:
        train, val = archive["train_source_index"], archive["val_source_index"]
        info = json.loads(str(archive["info"]))
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert info["imbalance"] == 100 and info["first_class_count"] == 1500
    assert path.stat().st_size < 5_000_000
    notice = resources.files("selmix") / "assets" / "FASHION_MNIST_COPYRIGHT"
    assert "MIT" in notice.read_text()


def test_demo_subset_can_be_subsampled():
    full = load_data("demo")
    steeper = load_data("demo", imbalance=200, val_per_class=20, seed=3)
    assert steeper.train.class_counts().tolist() == long_tail_counts(1500, 10, 200)
    assert steeper.val.class_counts().tolist() == [20] * 10
    assert torch.equal(steeper.test.images, full.test.images)
    assert pixel_rows(steeper.train) <= pixel_rows(full.train)
    again = load_data("demo", imbalance=200, val_per_class=20, seed=3)
    assert torch.equal(again.train.images, steeper.train.images)
    capped = load_data("demo", max_per_class=50)
    assert capped.train.class_counts().tolist() == [50] * 7 + [41, 25, 15]


def pixel_rows(data: ImageTensorDataset) -> set[bytes]:
    return {image.numpy().tobytes() for image in data.images}
