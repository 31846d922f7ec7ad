"""More data sources: embeddings files, CIFAR-100, STL-10 and ImageNet-LT, read from disk.

Each source has a reader (usable on its own) and an entry in :data:`FORMATS`, through which
:func:`selmix.data.load_data` and the command line accept these specs:

* ``features:FILE``: pre-computed feature vectors (embeddings) with their labels, in an
  ``.npz`` or ``.pt`` file (:func:`load_features_file` gives the exact keys). The model is
  then ``linear``, a linear head on the fixed features.
* ``cifar100:DIR``: torchvision's CIFAR-100 pickles (``cifar-100-python/{train,test,meta}``).
* ``stl10:DIR``: the STL-10 binary files (``stl10_binary/{train,test}_{X,y}.bin``).
* ``imagenet-lt:DIR``: an ImageNet tree and the ImageNet-LT list files
  ``ImageNet_LT_{train,val,test}.txt`` (``relative/path.JPEG label`` per line); images are
  decoded when a batch asks for them, never all at once.

Nothing is downloaded. Every reader checks its files where they enter and raises a one-line
error that names the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selmix._validation import check_int
from selmix.data.base import BatchDataset
from selmix.data.readers import read_cifar_batch, read_data_pickle
from selmix.data.semisup_split import UnlabelledDataset
from selmix.data.streaming import WorkerPool, seeded_items, to_device
from selmix.data.tensor_dataset import ImageTensorDataset, channel_stats

__all__ = [
    "FEATURE_KEYS",
    "FORMATS",
    "FeatureTensorDataset",
    "ImageListDataset",
    "Source",
    "load_cifar100",
    "load_features_file",
    "load_imagenet_lt",
    "load_stl10",
    "load_stl10_unlabelled",
    "read_image_list",
]

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STL10_SIDE = 96
STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip

# Keys of a features file: "<split>_features" (float [N, d]) and "<split>_labels" (int [N]).
FEATURE_SPLITS = ("train", "val", "test")
FEATURE_KEYS = tuple(f"{s}_{kind}" for s in FEATURE_SPLITS for kind in ("features", "labels"))


@dataclass
class Source:
    """What a format reader gives :func:`selmix.data.load_data`.

    Attributes:
        train: the full training split; ``load_data`` draws the (long-tailed) training set
            and, unless ``val`` is given, the validation set from it.
        test: the test split.
        val: the source's own validation split, or None.
        default_val_per_class: validation samples per class carved from ``train`` when
            ``val`` is None and the caller gives no ``val_per_class``; None means half the
            smallest class, at most 50 (:func:`selmix.data.sources.carved_val_per_class`).
    """

    train: Any
    test: Any
    val: Any = None
    default_val_per_class: int | None = None


# --------------------------------------------------------------------------------------------
# Embeddings files


class FeatureTensorDataset(BatchDataset):
    """Feature vectors [N, d] with labels, with selmix's data-set interface.

    ``batch`` returns the vectors as they are: there is no augmentation of features (the
    ``augment`` and ``generator`` arguments are accepted and ignored) and no normalisation.

    Args:
        features: float Tensor[N, d] (stored as float32).
        labels: integer Tensor[N] with values in [0, K).
        num_classes: K.
        classes: class names (length K); defaults to ``["0", ..., "K-1"]``.
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        num_classes: int,
        classes: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError(
                "`features` must be a Tensor[N, d], got "
                f"{getattr(features, 'shape', type(features).__name__)}"
            )
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() != features.shape[0]:
            raise ValueError(
                f"`labels` must be a Tensor[N] with N = {features.shape[0]}, got shape "
                f"{tuple(labels.shape)}"
            )
        check_int("num_classes", num_classes, minimum=2)
        self.features = features.float()
        self.labels = labels.long()
        self.num_classes = num_classes
        self.classes = (
            [str(c) for c in classes]
            if classes is not None
            else [str(k) for k in range(num_classes)]
        )
        if len(self.classes) != num_classes:
            raise ValueError(f"`classes` must have {num_classes} names, got {len(self.classes)}")

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.features[index], int(self.labels[index])

    def __repr__(self) -> str:
        n, d = self.features.shape
        return f"FeatureTensorDataset({n} vectors of {d} features, {self.num_classes} classes)"

    @property
    def num_features(self) -> int:
        """d."""
        return self.features.shape[1]

    def _batch(
        self,
        index: Tensor,
        augment: bool,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> tuple[Tensor, Tensor]:
        """``(features [B, d], labels [B])`` of the given samples (on ``device`` if given)."""
        features, labels = self.features[index], self.labels[index]
        if device is not None:
            features, labels = features.to(device), labels.to(device)
        return features, labels

    def subset(self, indices: Any) -> FeatureTensorDataset:
        """A new data set of the given samples (same classes)."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return FeatureTensorDataset(
            self.features[index], self.labels[index], self.num_classes, self.classes
        )


def load_features_file(path: str | os.PathLike) -> dict[str, FeatureTensorDataset]:
    """Reads an embeddings file: train / val / test feature matrices and their labels.

    The file is an ``.npz`` (``numpy.savez``) or a ``.pt`` (``torch.save`` of a dict; read
    with ``weights_only=True``, so it never runs code) holding:

    ====================  =============================  ==========
    key                   value                          required
    ====================  =============================  ==========
    ``train_features``    float [N_train, d]             yes
    ``train_labels``      int [N_train], in [0, K)       yes
    ``test_features``     float [N_test, d]              yes
    ``test_labels``       int [N_test]                   yes
    ``val_features``      float [N_val, d]               no
    ``val_labels``        int [N_val]                    with val
    ``classes``           K names (str array / list)     no
    ====================  =============================  ==========

    Without ``val_*``, :func:`~selmix.data.load_data` carves a balanced validation set from
    the training vectors. K is ``len(classes)`` or else the largest label + 1.

    Args:
        path: the ``.npz`` or ``.pt`` file.

    Returns:
        ``{"train": ..., "test": ...}`` and ``"val"`` if present, each a
        :class:`FeatureTensorDataset` with the same K and d.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: unreadable, a key missing, or shapes or
            labels that disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    arrays = _read_feature_arrays(path)

    def bad(reason: str) -> ValueError:
        return ValueError(f"features file {path} {reason}")

    required = ("train_features", "train_labels", "test_features", "test_labels")
    missing = [key for key in required if key not in arrays]
    if missing:
        raise bad(f"lacks {', '.join(missing)} (keys: {', '.join(sorted(arrays)) or 'none'})")
    if ("val_features" in arrays) != ("val_labels" in arrays):
        raise bad("must hold both val_features and val_labels, or neither")
    splits = [s for s in FEATURE_SPLITS if f"{s}_features" in arrays]
    tensors: dict[str, tuple[Tensor, Tensor]] = {}
    for split in splits:
        features = torch.as_tensor(np.asarray(arrays[f"{split}_features"]))
        labels = torch.as_tensor(np.asarray(arrays[f"{split}_labels"]))
        if not features.dtype.is_floating_point or features.dim() != 2:
            raise bad(
                f"has {split}_features of {features.dtype} {tuple(features.shape)}; "
                "expected a float matrix [N, d]"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise bad(
                f"has {split}_labels of {labels.dtype} {tuple(labels.shape)}; expected int [N]"
            )
        if labels.numel() != features.shape[0]:
            raise bad(f"has {features.shape[0]} {split}_features rows but {labels.numel()} labels")
        if labels.numel() == 0:
            raise bad(f"has an empty {split} split")
        if not torch.isfinite(features).all():
            raise bad(f"has non-finite values in {split}_features")
        tensors[split] = (features, labels.long())
    dims = {split: f.shape[1] for split, (f, _) in tensors.items()}
    if len(set(dims.values())) != 1:
        raise bad(f"has feature matrices of different widths {dims}")
    classes = None
    if "classes" in arrays:
        classes = [str(c) for c in np.asarray(arrays["classes"]).reshape(-1).tolist()]
    largest = max(int(labels.max()) for _, labels in tensors.values())
    smallest = min(int(labels.min()) for _, labels in tensors.values())
    num_classes = len(classes) if classes is not None else largest + 1
    if smallest < 0 or largest >= num_classes:
        raise bad(f"has labels in [{smallest}, {largest}]; expected [0, {num_classes})")
    if num_classes < 2:
        raise bad(f"has {num_classes} class; SelMix needs at least 2")
    return {
        split: FeatureTensorDataset(features, labels, num_classes, classes)
        for split, (features, labels) in tensors.items()
    }


def _read_feature_arrays(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"it holds a {type(state).__name__}, not a dict")
            return dict(state)
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as error:  # noqa: BLE001 - any failure to read means a bad file
        raise ValueError(
            f"features file {path} is not a readable .npz or .pt dict: {_read_error(error)}"
        ) from None


def _read_error(error: BaseException) -> str:
    """Why a features file could not be read, without numpy's or torch's advice to load it
    unsafely (allow_pickle / weights_only=False would run code from the file)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if any(word in text for word in ("allow_pickle", "pickled", "weights_only", "Weights only")):
        return (
            "it holds Python objects (pickled data) rather than plain arrays; refused, as "
            "loading them could run code"
        )
    return text


def _features_source(location: str, cache_dir: Any = None) -> Source:
    splits = load_features_file(location)
    return Source(train=splits["train"], test=splits["test"], val=splits.get("val"))


# --------------------------------------------------------------------------------------------
# CIFAR-100 (torchvision's python pickles)


def load_cifar100(root: str | os.PathLike, train: bool = True) -> ImageTensorDataset:
    """Loads CIFAR-100 from torchvision's pickles (100 fine classes).

    Args:
        root: the ``cifar-100-python`` folder (holding ``train``, ``test`` and ``meta``) or
            its parent.
        train: the training split (500 images per class) or the test split (100 per class).

    Returns:
        ImageTensorDataset of uint8 [N, 3, 32, 32] with CIFAR-100's mean and std and its
        fine class names (from ``meta`` when present).

    Raises:
        FileNotFoundError: naming the missing folder or file.
        ValueError: one line naming a corrupt file.
    """
    root = Path(root)
    folder = next((f for f in (root, root / "cifar-100-python") if (f / "train").is_file()), None)
    if folder is None:
        raise FileNotFoundError(
            f"no CIFAR-100 pickles in {root}: expected cifar-100-python/train (and test, meta)"
        )
    path = folder / ("train" if train else "test")
    images, labels = read_cifar_batch(path, "CIFAR-100 file", "CIFAR-100", b"fine_labels")
    if labels and not 0 <= min(labels) <= max(labels) < 100:
        raise ValueError(
            f"CIFAR-100 file {path} has fine labels in [{min(labels)}, {max(labels)}]; "
            "expected 0..99"
        )
    classes = [str(k) for k in range(100)]
    meta = folder / "meta"
    if meta.is_file():
        try:
            names: Any = read_data_pickle(meta, "CIFAR-100 meta file")
            classes = [n.decode() for n in names[b"fine_label_names"]]
        except (TypeError, KeyError, AttributeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"CIFAR-100 meta file {meta} has no b'fine_label_names' list: {error}"
            ) from None
    return ImageTensorDataset(
        torch.from_numpy(images),
        torch.tensor(labels, dtype=torch.long),
        CIFAR100_MEAN,
        CIFAR100_STD,
        classes,
    )


def _cifar100_source(location: str, cache_dir: Any = None) -> Source:
    # 50 of each class's 500 images are held out, so the default long tail starts at
    # N_1 = 450 with a disjoint balanced validation set (the clean variant of docs/maths.md s. 7)
    return Source(
        train=load_cifar100(location, train=True),
        test=load_cifar100(location, train=False),
        default_val_per_class=50,
    )


# --------------------------------------------------------------------------------------------
# STL-10 (binary files)


def load_stl10(root: str | os.PathLike, split: str = "train") -> ImageTensorDataset:
    """Loads a labelled STL-10 split from its binary files.

    ``<split>_X.bin`` holds N x 3 x 96 x 96 uint8 values, each channel stored column by
    column (as the original MATLAB export); ``<split>_y.bin`` holds N labels in 1..10.

    Args:
        root: the ``stl10_binary`` folder or its parent.
        split: ``"train"`` (5,000 images) or ``"test"`` (8,000).

    Returns:
        ImageTensorDataset of uint8 [N, 3, 96, 96]; mean and std are measured on the
        images; class names come from ``class_names.txt`` when present.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: one line naming a file whose size or labels are wrong.
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    folder = _stl10_folder(root)
    images = _read_stl10_images(folder / f"{split}_X.bin")
    labels_path = folder / f"{split}_y.bin"
    if not labels_path.is_file():
        raise FileNotFoundError(f"STL-10 label file not found: {labels_path}")
    labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64)
    if labels.size != images.shape[0]:
        raise ValueError(
            f"STL-10 label file {labels_path} has {labels.size} labels for "
            f"{images.shape[0]} images in {split}_X.bin"
        )
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(
            f"STL-10 label file {labels_path} has labels in [{labels.min()}, {labels.max()}]; "
            "expected 1..10"
        )
    classes = STL10_CLASSES
    names = folder / "class_names.txt"
    if names.is_file():
        classes = [line.strip() for line in names.read_text().splitlines() if line.strip()]
        if len(classes) != 10:
            raise ValueError(f"STL-10 class file {names} has {len(classes)} names; expected 10")
    mean, std = channel_stats(images)
    return ImageTensorDataset(images, torch.from_numpy(labels - 1), mean, std, classes, padding=12)


def load_stl10_unlabelled(
    root: str | os.PathLike,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
) -> Any:
    """STL-10's 100,000 unlabelled images (``unlabeled_X.bin``), memory-mapped.

    The file (2.7 GB) is not read into memory: batches read the images they need.

    Args:
        root: the ``stl10_binary`` folder or its parent.
        mean, std: normalisation, normally the labelled training set's.

    Returns:
        An :class:`~selmix.data.UnlabelledDataset` (10 classes, no hidden labels), for
        ``finetune(..., unlabelled=...)``.
    """

    images = _read_stl10_images(_stl10_folder(root) / "unlabeled_X.bin", memory_map=True)
    return UnlabelledDataset(images, mean, std, 10, classes=STL10_CLASSES, padding=12)


def _stl10_folder(root: str | os.PathLike) -> Path:
    root = Path(root)
    for folder in (root, root / "stl10_binary"):
        if (folder / "train_X.bin").is_file() or (folder / "unlabeled_X.bin").is_file():
            return folder
    raise FileNotFoundError(f"no STL-10 binary files in {root}: expected stl10_binary/train_X.bin")


def _read_stl10_images(path: Path, memory_map: bool = False) -> Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"STL-10 image file not found: {path}")
    per_image = 3 * STL10_SIDE * STL10_SIDE
    size = path.stat().st_size
    if size == 0 or size % per_image:
        raise ValueError(
            f"STL-10 image file {path} has {size} bytes, not a whole number of "
            f"3 x 96 x 96 images ({per_image} bytes each)"
        )
    shape = (size // per_image, 3, STL10_SIDE, STL10_SIDE)
    array: np.ndarray
    if memory_map:
        # copy-on-write: torch wants a writable buffer, the file itself is never changed
        array = np.memmap(path, dtype=np.uint8, mode="c", shape=shape)
    else:
        array = np.fromfile(path, dtype=np.uint8).reshape(shape)
    # each channel is stored column-major: swap to rows first
    images = torch.from_numpy(array).transpose(2, 3)
    return images if memory_map else images.contiguous()


def _stl10_source(location: str, cache_dir: Any = None) -> Source:
    train = load_stl10(location, "train")
    test = load_stl10(location, "test")
    test.mean, test.std = train.mean, train.std  # one normalisation for both splits
    return Source(train=train, test=test, default_val_per_class=50)


# --------------------------------------------------------------------------------------------
# ImageNet-LT (a tree of images and list files), decoded lazily


class ImageListDataset(BatchDataset):
    """Images named by a list of files, decoded only when a batch asks for them.

    Evaluation batches resize the shorter side to ``resize`` and take the central
    ``crop x crop``; augmented batches take a random ``crop x crop`` window of the resized
    image and flip half of them (with the given generator, so the same generator state
    gives the same batch). Values are normalised with ``mean`` and ``std``.

    Args:
        root: the folder the paths are relative to.
        paths: image paths relative to ``root``.
        labels: integer labels, one per path.
        num_classes: K.
        classes: class names (length K); defaults to ``["0", ..., "K-1"]``.
        resize: shorter side after resizing.
        crop: side of the square crop.
        mean, std: per-channel normalisation in [0, 1] units (ImageNet's by default).
        num_workers: processes decoding each batch (persistent DataLoader workers, see
            :class:`~selmix.data.WorkerPool`); None: ``min(4, cores - 1)``; 0: the main
            process. Augmented batches are the same whatever the number: each image's
            crop and flip come from a seed drawn per batch from the caller's generator.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        paths: Sequence[str],
        labels: Tensor | Sequence[int],
        num_classes: int,
        classes: Sequence[str] | None = None,
        *,
        resize: int = 256,
        crop: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_workers: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if self.labels.numel() != len(self.paths):
            raise ValueError(f"`labels` must have one entry per path ({len(self.paths)})")
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.classes = (
            [str(c) for c in classes]
            if classes is not None
            else [str(k) for k in range(num_classes)]
        )
        self.resize = check_int("resize", resize, minimum=1)
        self.crop = check_int("crop", crop, minimum=1)
        if crop > resize:
            raise ValueError(f"`crop` must be <= `resize` ({resize}), got {crop}")
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.pool = WorkerPool(_ImageListReader(self), num_workers)

    @property
    def num_workers(self) -> int:
        """Processes decoding each batch (0: the main process)."""
        return self.pool.num_workers

    def __repr__(self) -> str:
        return (
            f"ImageListDataset({len(self)} images under {self.root}, {self.num_classes} classes, "
            f"{self.crop}x{self.crop})"
        )

    def _batch(
        self,
        index: Tensor,
        augment: bool,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> tuple[Tensor, Tensor]:
        """Decodes the given images: ``(float32 [B, 3, crop, crop], labels [B])``."""
        images = self.pool.load(seeded_items(index.tolist(), augment, True, generator))
        if not images.numel():
            images = torch.empty(0, 3, self.crop, self.crop)
        images = (images - self.mean[:, None, None]) / self.std[:, None, None]
        labels = self.labels[index]
        if device is not None:
            images, labels = to_device(images, device), labels.to(device)
        return images, labels

    def subset(self, indices: Any) -> ImageListDataset:
        """A view of the given samples (same root, classes and transforms)."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        return ImageListDataset(
            self.root, [self.paths[i] for i in index], self.labels[index], self.num_classes,
            self.classes, resize=self.resize, crop=self.crop, mean=self.mean.tolist(),
            std=self.std.tolist(), num_workers=self.num_workers,
        )  # fmt: skip

    def _load(self, index: int, augment: bool, generator: torch.Generator | None) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.root / self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                width, height = image.size
                scale = self.resize / min(width, height)
                size = (max(self.crop, round(width * scale)), max(self.crop, round(height * scale)))
                image = image.resize(size, Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except FileNotFoundError:
            raise FileNotFoundError(f"ImageNet-LT image not found: {path}") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            detail = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"ImageNet-LT image {path} cannot be decoded: {detail}") from None
        height, width = array.shape[:2]
        if augment:
            top = int(torch.randint(0, height - self.crop + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - self.crop + 1, (1,), generator=generator))
            flip = bool(torch.rand(1, generator=generator) < 0.5)
        else:
            top, left, flip = (height - self.crop) // 2, (width - self.crop) // 2, False
        window = array[top : top + self.crop, left : left + self.crop]
        tensor = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1).float() / 255
        return tensor.flip(2) if flip else tensor


class _ImageListReader(torch.utils.data.Dataset):
    """``reader[(i, augment, seed)]``: image i of an :class:`ImageListDataset`, its random
    crop and flip drawn from a generator seeded with ``seed``."""

    def __init__(self, dataset: ImageListDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, bool, int | None]) -> Tensor:
        index, augment, seed = item
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return self.dataset._load(index, augment, generator)


def read_image_list(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Reads an ImageNet-LT list file: one ``relative/path label`` per line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file and line number of a malformed entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet-LT list file not found: {path}")
    paths, labels = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"ImageNet-LT list file {path} is not text: {error}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(
                f"ImageNet-LT list file {path} line {number} must be 'path label' with a "
                f"label >= 0, got {line.strip()[:80]!r}"
            )
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise ValueError(f"ImageNet-LT list file {path} has no entries")
    return paths, labels


def load_imagenet_lt(
    root: str | os.PathLike, resize: int = 256, crop: int = 224
) -> dict[str, ImageListDataset]:
    """The ImageNet-LT splits: ``ImageNet_LT_{train,val,test}.txt`` over an ImageNet tree.

    The list files are looked for in ``root`` (and ``root/ImageNet_LT``); the image paths in
    them (``train/n01440764/n01440764_10026.JPEG 0``) are relative to ``root``. Only the
    lists are read here; images are decoded batch by batch (:class:`ImageListDataset`).
    K is the largest label + 1 over the three lists (1,000 for the real files).

    Args:
        root: the ImageNet folder.
        resize, crop: see :class:`ImageListDataset`.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``; ``val`` and ``test`` are present when
        their list files are (``train`` and ``test`` are required).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-LT folder not found: {root}")
    lists = {}
    for split in ("train", "val", "test"):
        for folder in (root, root / "ImageNet_LT"):
            if (folder / f"ImageNet_LT_{split}.txt").is_file():
                lists[split] = read_image_list(folder / f"ImageNet_LT_{split}.txt")
                break
    for required in ("train", "test"):
        if required not in lists:
            raise FileNotFoundError(
                f"ImageNet-LT list file ImageNet_LT_{required}.txt not found in {root}"
            )
    num_classes = max(max(labels) for _, labels in lists.values()) + 1
    return {
        split: ImageListDataset(root, paths, labels, num_classes, resize=resize, crop=crop)
        for split, (paths, labels) in lists.items()
    }


def _imagenet_lt_source(location: str, cache_dir: Any = None) -> Source:
    splits = load_imagenet_lt(location)
    return Source(train=splits["train"], test=splits["test"], val=splits.get("val"))


# Spec prefix -> reader, consulted by selmix.data.load_data("<prefix>:<location>").
FORMATS: dict[str, Callable[..., Source]] = {
    "features": _features_source,
    "cifar100": _cifar100_source,
    "stl10": _stl10_source,
    "imagenet-lt": _imagenet_lt_source,
}
