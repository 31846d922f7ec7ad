"""Tests of the extra data formats (selmix.data.formats) on tiny files written here."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selmix.core.metrics import head_mask
from selmix.data import load_data
from selmix.data.formats import (
    FeatureTensorDataset,
    ImageListDataset,
    load_cifar100,
    load_features_file,
    load_imagenet_lt,
    load_stl10,
    load_stl10_unlabelled,
    read_image_list,
)

torch.set_num_threads(1)


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message


# --------------------------------------------------------------------------------------------
# features:FILE


def feature_arrays(with_val: bool = True, num_classes: int = 3, dim: int = 5) -> dict:
    rng = np.random.default_rng(0)

    def split(per_class: list[int]) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(num_classes), per_class)
        return rng.normal(size=(labels.size, dim)).astype(np.float32), labels

    arrays = {}
    parts = {"train": [12, 6, 3], "test": [4, 4, 4], **({"val": [2, 2, 2]} if with_val else {})}
    for name, counts in parts.items():
        arrays[f"{name}_features"], arrays[f"{name}_labels"] = split(counts)
    arrays["classes"] = np.array(["cat", "dog", "eel"])
    return arrays


def test_features_npz_loads_every_split_with_its_own_validation_set(tmp_path):
    arrays = feature_arrays()
    np.savez(tmp_path / "f.npz", **arrays)
    data = load_data(f"features:{tmp_path / 'f.npz'}")
    assert isinstance(data.train, FeatureTensorDataset)
    assert data.classes == ["cat", "dog", "eel"]
    assert data.train.class_counts().tolist() == [12, 6, 3]
    torch.testing.assert_close(data.val.features, torch.from_numpy(arrays["val_features"]))
    assert data.test.labels.tolist() == arrays["test_labels"].tolist()
    features, labels = data.train.batch([0, 20], augment=True)  # features are never augmented
    torch.testing.assert_close(features, torch.from_numpy(arrays["train_features"][[0, 20]]))
    assert labels.tolist() == [0, 2]
    assert data.train[0][0].shape == (5,)


def test_features_pt_without_val_gets_a_val_set_carved_from_train(tmp_path):
    arrays = {
        k: torch.as_tensor(v) for k, v in feature_arrays(with_val=False).items() if k != "classes"
    }
    torch.save(arrays, tmp_path / "f.pt")
    data = load_data(f"features:{tmp_path / 'f.pt'}", val_per_class=1, imbalance=2.0)
    assert data.val.class_counts().tolist() == [1, 1, 1]
    # the rarest class has 3 - 1 = 2 left: N_1 = 2, rho = 2 gives [2, 1, 1]
    assert data.train.class_counts().tolist() == [2, 1, 1]
    # train and val are disjoint rows of the file's training matrix
    rows = {tuple(r) for r in data.train.features.tolist()}
    assert not rows & {tuple(r) for r in data.val.features.tolist()}
    assert data.classes == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.pop("test_labels"), "lacks test_labels"),
        (lambda a: a.pop("val_labels"), "both val_features and val_labels"),
        (lambda a: a.update(train_labels=a["train_labels"][:-1]), "21 train_features rows but 20"),
        (lambda a: a.update(val_features=a["val_features"][:, :2]), "different widths"),
        (lambda a: a.update(test_labels=a["test_labels"] + 5), r"labels in \[0, 7\]"),
        (lambda a: a.update(train_features=a["train_labels"]), "expected a float matrix"),
    ],
)
def test_bad_features_files_get_a_one_line_error_naming_the_file(tmp_path, change, match):
    arrays = feature_arrays()
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as error:
        load_features_file(path)
    assert_one_line_naming(error, path)


def test_corrupt_features_file_gets_a_one_line_error(tmp_path):
    for name in ("corrupt.npz", "corrupt.pt"):
        path = tmp_path / name
        path.write_bytes(b"PK\x03\x04 this is not an archive\n" * 3)
        with pytest.raises(ValueError, match="not a readable .npz or .pt") as error:
            load_features_file(path)
        assert_one_line_naming(error, path)
    with pytest.raises(FileNotFoundError, match="features file not found"):
        load_features_file(tmp_path / "missing.npz")


def test_unknown_spec_lists_the_new_formats():
    with pytest.raises(ValueError, match="'features:PATH'.*'cifar100:PATH'.*'imagenet-lt:PATH'"):
        load_data("nosuch:here")


# --------------------------------------------------------------------------------------------
# cifar100:DIR (torchvision's pickles)


def write_cifar100(root: Path, per_class_train: int = 6, per_class_test: int = 2) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.tile(np.arange(100), per_class)
        data = rng.integers(0, 256, size=(labels.size, 3072), dtype=np.uint8)
        batch = {
            b"data": data, b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(), b"filenames": [b"x.png"] * labels.size,
        }  # fmt: skip
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
    with open(folder / "meta", "wb") as file:
        pickle.dump({b"fine_label_names": [f"c{k}".encode() for k in range(100)]}, file)
    return folder


def test_cifar100_reads_the_pickles_and_makes_the_long_tailed_split(tmp_path):
    folder = write_cifar100(tmp_path)
    train = load_cifar100(tmp_path, train=True)
    assert train.images.shape == (600, 3, 32, 32)
    assert train.classes[:2] == ["c0", "c1"] and train.num_classes == 100
    with open(folder / "train", "rb") as file:
        raw = pickle.load(file, encoding="bytes")
    # the 3072 bytes of a row are the R, G and B planes, each row-major 32 x 32
    torch.testing.assert_close(
        train.images[7, 1], torch.from_numpy(raw[b"data"][7, 1024:2048].reshape(32, 32))
    )
    assert train.labels[7] == raw[b"fine_labels"][7]

    data = load_data(f"cifar100:{tmp_path}", imbalance=5.0, max_per_class=5, val_per_class=1)
    counts = data.train.class_counts()
    assert (
        counts[0] == 5
        and counts[-1] == 1
        and counts.tolist() == sorted(counts.tolist(), reverse=True)
    )
    assert data.val.class_counts().tolist() == [1] * 100
    assert len(data.test) == 200
    # head / tail as MATH.md: the 90 most frequent classes are the head
    assert int(head_mask(100).sum()) == 90


def test_cifar100_default_split_holds_out_50_per_class(tmp_path):
    write_cifar100(tmp_path, per_class_train=51, per_class_test=1)
    data = load_data(f"cifar100:{tmp_path}", imbalance=1.0)
    assert data.val.class_counts().tolist() == [50] * 100
    assert data.train.class_counts().tolist() == [1] * 100


def test_corrupt_cifar100_file_gets_a_one_line_error_naming_it(tmp_path):
    folder = write_cifar100(tmp_path, per_class_train=1, per_class_test=1)
    (folder / "train").write_bytes(b"\x80\x02garbage that is not a pickle")
    with pytest.raises(ValueError) as error:
        load_cifar100(tmp_path, train=True)
    assert_one_line_naming(error, folder / "train")
    with open(folder / "test", "wb") as file:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, file)
    with pytest.raises(ValueError, match="b'fine_labels'") as error:
        load_cifar100(tmp_path, train=False)
    assert_one_line_naming(error, folder / "test")
    with open(folder / "test", "wb") as file:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, file)
    with pytest.raises(ValueError, match=r"fine labels in \[0, 100\]") as error:
        load_cifar100(tmp_path, train=False)
    assert_one_line_naming(error, folder / "test")
    with pytest.raises(FileNotFoundError, match="cifar-100-python/train"):
        load_cifar100(tmp_path / "nowhere")


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_cifar100_pickles_cannot_run_code(tmp_path, capsys):
    folder = write_cifar100(tmp_path, per_class_train=1, per_class_test=1)
    with open(folder / "train", "wb") as file:
        pickle.dump({b"data": _RunsCode(), b"fine_labels": [0]}, file)
    with pytest.raises(ValueError, match="refused") as error:
        load_cifar100(tmp_path, train=True)
    assert_one_line_naming(error, folder / "train")
    assert "code ran" not in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# stl10:DIR (binary files)


def write_stl10(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> tuple[Path, dict]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    images = {}
    for name, per_class in (("train", train_per_class), ("test", test_per_class), ("unlabeled", 0)):
        count = 10 * per_class if per_class else 4
        array = rng.integers(0, 256, size=(count, 3, 96, 96), dtype=np.uint8)
        images[name] = array
        # the format stores each channel column by column
        (folder / f"{name}_X.bin").write_bytes(
            np.ascontiguousarray(array.transpose(0, 1, 3, 2)).tobytes()
        )
        if per_class:
            labels = np.tile(np.arange(1, 11, dtype=np.uint8), per_class)
            (folder / f"{name}_y.bin").write_bytes(labels.tobytes())
    return folder, images


def test_stl10_reads_images_in_row_major_order_and_labels_from_zero(tmp_path):
    folder, images = write_stl10(tmp_path)
    train = load_stl10(tmp_path, "train")
    assert train.images.shape == (30, 3, 96, 96)
    torch.testing.assert_close(train.images, torch.from_numpy(images["train"]))
    assert train.labels[:10].tolist() == list(range(10))
    assert train.classes[0] == "airplane"
    data = load_data(f"stl10:{folder}", val_per_class=1)
    assert data.val.class_counts().tolist() == [1] * 10
    assert len(data.test) == 20
    torch.testing.assert_close(data.test.mean, data.train.mean)  # one normalisation
    pool = load_stl10_unlabelled(tmp_path, train.mean, train.std)
    assert len(pool) == 4
    torch.testing.assert_close(pool.images[2], torch.from_numpy(images["unlabeled"][2]))


def test_corrupt_stl10_files_get_a_one_line_error_naming_them(tmp_path):
    folder, _ = write_stl10(tmp_path)
    truncated = folder / "test_X.bin"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a whole number of") as error:
        load_stl10(tmp_path, "test")
    assert_one_line_naming(error, truncated)
    labels = folder / "train_y.bin"
    labels.write_bytes(bytes([1, 2, 11] * 10))
    with pytest.raises(ValueError, match="expected 1..10") as error:
        load_stl10(tmp_path, "train")
    assert_one_line_naming(error, labels)
    labels.write_bytes(bytes([1, 2]))
    with pytest.raises(ValueError, match="2 labels for 30 images") as error:
        load_stl10(tmp_path, "train")
    assert_one_line_naming(error, labels)


# --------------------------------------------------------------------------------------------
# imagenet-lt:DIR (a tree and list files), lazy


def write_imagenet_lt(root: Path) -> dict[str, list[tuple[str, int]]]:
    rng = np.random.default_rng(3)
    lists = {"train": [], "val": [], "test": []}
    counts = {"train": [4, 2, 1], "val": [1, 1, 1], "test": [1, 1, 1]}
    for split, per_class in counts.items():
        for label, count in enumerate(per_class):
            for index in range(count):
                relative = f"{split}/n{label:08d}/img_{index}.png"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / relative)
                lists[split].append((relative, label))
        text = "\n".join(f"{path} {label}" for path, label in lists[split])
        (root / f"ImageNet_LT_{split}.txt").write_text(text + "\n")
    return lists


def test_imagenet_lt_reads_the_lists_and_decodes_only_on_access(tmp_path):
    lists = write_imagenet_lt(tmp_path)
    data = load_data(f"imagenet-lt:{tmp_path}")
    assert isinstance(data.train, ImageListDataset)
    assert data.train.class_counts().tolist() == [4, 2, 1]  # the list's own long tail
    assert data.val.class_counts().tolist() == [1, 1, 1]
    assert data.num_classes == 3
    # nothing was decoded: deleting an image after loading only fails when it is asked for
    victim = tmp_path / lists["test"][0][0]
    victim.unlink()
    images, labels = data.train.batch([0, 6])
    assert images.shape == (2, 3, 224, 224) and labels.tolist() == [0, 2]
    with pytest.raises(FileNotFoundError, match="img_0.png"):
        data.test.batch([0])


def test_image_list_dataset_crops_centre_for_eval_and_randomly_when_augmenting(tmp_path):
    write_imagenet_lt(tmp_path)
    splits = load_imagenet_lt(tmp_path, resize=24, crop=16)
    train = splits["train"]
    centre, _ = train.batch([0])
    again, _ = train.batch([0])
    torch.testing.assert_close(centre, again)
    with Image.open(tmp_path / train.paths[0]) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    # shorter side already 24: no resampling, so the centre crop is exact
    expected = (pixels[:, 4:20, 8:24] - train.mean[:, None, None]) / train.std[:, None, None]
    torch.testing.assert_close(centre[0], expected)
    first, _ = train.batch([0] * 8, augment=True, generator=torch.Generator().manual_seed(0))
    second, _ = train.batch([0] * 8, augment=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, second)
    assert not all(torch.equal(first[0], crop) for crop in first[1:])


def test_corrupt_imagenet_lt_files_get_a_one_line_error_naming_them(tmp_path):
    lists = write_imagenet_lt(tmp_path)
    bad_list = tmp_path / "ImageNet_LT_val.txt"
    bad_list.write_text("val/a.png 0\nval/b.png\n")
    with pytest.raises(ValueError, match="line 2 must be 'path label'") as error:
        read_image_list(bad_list)
    assert_one_line_naming(error, bad_list)
    with pytest.raises(ValueError, match="line 2"):
        load_data(f"imagenet-lt:{tmp_path}")
    bad_list.unlink()
    broken = tmp_path / lists["train"][1][0]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = load_data(f"imagenet-lt:{tmp_path}", val_per_class=1)  # no val list: carved
    assert data.val.class_counts().tolist() == [1, 1, 1]
    train = load_imagenet_lt(tmp_path)["train"]
    with pytest.raises(ValueError, match="cannot be decoded") as error:
        train.batch([1])
    assert_one_line_naming(error, broken)
