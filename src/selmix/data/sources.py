"""Data sources and :func:`load_data`, which splits one into train / val / test.

Sources: Fashion-MNIST IDX files, CIFAR-10 (torchvision pickles, JPEG tree or archive),
image folders and the packaged Fashion-MNIST-LT demo. :func:`load_data` turns any of them
into a long-tailed training set, a balanced validation set and the official test set.

Every source is decoded into an :class:`~selmix.data.ImageTensorDataset` of uint8 images,
except image folders too large for memory, which are streamed from disk
(:class:`~selmix.data.StreamingImageDataset`). Sources made of many small image files
(the CIFAR-10 JPEG tree or archive, image folders) are decoded once into an ``.npz``
cache, so later runs load in about a second.

The layers below: :mod:`selmix.data.readers` (IDX files and CIFAR pickles),
:mod:`selmix.data.image_folder` (image trees and archives, streamed or decoded with a
cache) and :mod:`selmix.data.formats` (the further sources of :data:`FORMATS`); none of them
imports this module. :data:`SOURCES` holds every source's loader, by spec prefix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from selmix._validation import check_int, check_positive
from selmix.core.estimates import SMALL_VALIDATION
from selmix.data.augment import check_resize_method
from selmix.data.formats import FORMATS, Source  # features, cifar100, stl10, imagenet-lt
from selmix.data.image_folder import (
    _cached_decode,
    _is_archive,
    _resolve_cache_dir,
    available_memory,
    estimate_decoded_bytes,
    load_image_folder,
)
from selmix.data.longtail import long_tail_counts, long_tail_split
from selmix.data.readers import read_cifar_batch, read_data_pickle, read_idx
from selmix.data.semisup_split import UnlabelledDataset
from selmix.data.tensor_dataset import ImageTensorDataset

# the readers and the image folders have modules of their own (below this one); their
# names stay importable from here
__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEMO_FILE",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "SOURCES",
    "DataSplits",
    "SourceOptions",
    "available_memory",
    "estimate_decoded_bytes",
    "load_cifar10",
    "load_data",
    "load_demo",
    "load_fashion_mnist",
    "load_image_folder",
    "read_cifar_batch",
    "read_data_pickle",
    "read_idx",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

DEMO_FILE = "fashion_mnist_lt_demo.npz"
# Validation samples per class carved from Fashion-MNIST's and CIFAR-10's training split
# when none is given.
_OFFICIAL_VAL_PER_CLASS = 500
#: Fewest validation images per class carved by default: fewer cannot tell SelMix's steps
#: apart (a class's recall on 3 images moves in steps of 33 points).
MIN_CARVED_VAL_PER_CLASS = 5


def carved_val_per_class(sizes: Tensor, classes: Sequence[str] | None = None) -> int:
    """The default validation images per class carved from a training split without its
    own validation set: half the smallest class (it keeps as many to train on), at most
    :data:`selmix.core.estimates.SMALL_VALIDATION` (50, where the per-class estimates SelMix
    steers by stop being noisy).

    Args:
        sizes: training samples per class, Tensor[K].
        classes: the class names, for the message.

    Raises:
        ValueError: the smallest class cannot spare :data:`MIN_CARVED_VAL_PER_CLASS`
            images; the message names it and ``val_per_class``.
    """

    smallest = int(sizes.min())
    per_class = min(SMALL_VALIDATION, smallest // 2)
    if per_class < MIN_CARVED_VAL_PER_CLASS:
        k = int(sizes.argmin())
        name = classes[k] if classes else k
        raise ValueError(
            f"class {name!r} has {smallest} training samples, too few to carve a validation "
            f"set SelMix can steer by ({MIN_CARVED_VAL_PER_CLASS} per class, keeping as many "
            "to train on): add a val/ folder, or set `val_per_class` (--val-per-class) yourself"
        )
    return per_class


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)


def load_fashion_mnist(root: str | os.PathLike, train: bool = True) -> ImageTensorDataset:
    """Loads Fashion-MNIST from its original IDX files.

    Args:
        root: the folder holding ``train-images-idx3-ubyte.gz`` etc. (``.gz`` or unpacked;
            torchvision's ``FashionMNIST/raw`` below ``root`` works too).
        train: the 60,000-image training split, or the 10,000-image test split.

    Returns:
        ImageTensorDataset of uint8 [N, 1, 28, 28], mean 0.2860 and std 0.3530, with
        Fashion-MNIST's class names.
    """
    prefix = "train" if train else "t10k"
    root = Path(root)
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST files in {root} disagree: images {tuple(images.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    return ImageTensorDataset(
        images.unsqueeze(1).contiguous(),
        labels.long(),
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        FASHION_MNIST_CLASSES,
    )


def _find_idx(root: Path, stem: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder not found: {root}")
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {root}")


# --------------------------------------------------------------------------------------------
# CIFAR-10


def load_cifar10(
    root: str | os.PathLike,
    train: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ImageTensorDataset:
    """Loads CIFAR-10 from any of its three common forms.

    ``root`` may be:

    * torchvision's pickle format: the ``cifar-10-batches-py`` folder or its parent (read
      directly, no cache, by :func:`read_data_pickle`, which builds only plain data and
      never runs code from the files);
    * an image tree ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``, in ``root`` or in
      ``root/cifar10``;
    * a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of that tree (or a folder holding
      ``cifar10-jpeg.tar.gz``). It is decoded straight from the compressed stream, without
      unpacking the files.

    Image trees and archives are decoded once (both splits) into
    ``<cache_dir>/cifar10-<key>.npz``, where the key depends on the source's path, size and
    modification time; delete that file to force decoding again. Classes are the sorted
    folder names and images are ordered by class then file name, so the result does not
    depend on the order of the files in the archive.

    Args:
        root: see above.
        train: the training split (50,000 images) or the test split (10,000).
        cache_dir: folder for decoded caches; defaults to ``$SELMIX_CACHE_DIR``, else
            ``$XDG_CACHE_HOME/selmix``, else ``~/.cache/selmix``.

    Returns:
        ImageTensorDataset of uint8 [N, 3, 32, 32] with CIFAR-10's mean and std.
    """
    split = "train" if train else "test"
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"CIFAR-10 source not found: {root}")
    pickles = _find_cifar_pickles(root)
    if pickles is not None:
        images, labels, classes = _read_cifar_pickles(pickles, train)
    else:
        source = _find_cifar_tree(root)
        decoded = _cached_decode(
            "cifar10", source, ("train", "test"), None, _resolve_cache_dir(cache_dir)
        )
        if split not in decoded.splits:
            raise FileNotFoundError(f"CIFAR-10 source {source} has no {split}/ folder")
        images, labels = decoded.splits[split]
        classes = decoded.classes
    if tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(
            f"CIFAR-10 images must be 3x32x32, got {'x'.join(map(str, images.shape[1:]))} in {root}"
        )
    return ImageTensorDataset(images, labels, CIFAR10_MEAN, CIFAR10_STD, classes)


def _find_cifar_pickles(root: Path) -> Path | None:
    for folder in (root, root / "cifar-10-batches-py"):
        if folder.is_dir() and (folder / "data_batch_1").is_file():
            return folder
    return None


def _read_cifar_pickles(folder: Path, train: bool) -> tuple[Tensor, Tensor, list[str]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        data, batch_labels = read_cifar_batch(path, "CIFAR-10 batch file", "CIFAR", b"labels")
        images.append(data)
        labels.extend(batch_labels)
    classes = [str(k) for k in range(10)]
    meta = folder / "batches.meta"
    if meta.is_file():
        meta_data = read_data_pickle(meta, "CIFAR-10 meta file")
        try:
            classes = [n.decode() for n in meta_data[b"label_names"]]  # type: ignore[index]
        except (TypeError, KeyError, AttributeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"CIFAR-10 meta file {meta} has no b'label_names' list of names: {error}"
            ) from None
    return (
        torch.from_numpy(np.concatenate(images)),
        torch.tensor(labels, dtype=torch.long),
        classes,
    )


def _find_cifar_tree(root: Path) -> Path:
    if root.is_file():
        if not _is_archive(root):
            raise ValueError(f"`root` must be a folder or a .tar.gz/.tgz/.tar archive, got {root}")
        return root
    for candidate in (root / "cifar10", root):
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            return candidate
    archive = root / "cifar10-jpeg.tar.gz"
    if archive.is_file():
        return archive
    raise FileNotFoundError(
        f"no CIFAR-10 data found in {root}: expected cifar-10-batches-py/, "
        "cifar10/{train,test}/<class>/, {train,test}/<class>/ or cifar10-jpeg.tar.gz"
    )


# --------------------------------------------------------------------------------------------
# Splits


@dataclass
class DataSplits:
    """The data sets of one experiment.

    Attributes:
        train: the (long-tailed) labelled training set.
        val: the balanced validation set, disjoint from ``train``.
        test: the official test set.
        unlabelled: the unlabelled pool of the semi-supervised setting, disjoint from
            ``train`` and ``val``: an :class:`~selmix.data.UnlabelledDataset` whose
            ``labels`` are -1 (the true ones are in ``hidden_labels``, for reporting), or
            None.
        classes: class names, ``classes[k]`` for label k.
    """

    train: ImageTensorDataset
    val: ImageTensorDataset
    test: ImageTensorDataset
    unlabelled: UnlabelledDataset | None = None
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.classes:
            self.classes = list(self.train.classes)

    @property
    def num_classes(self) -> int:
        """K."""
        return len(self.classes)

    def describe(self) -> str:
        """A few lines with each split's size and per-class counts."""
        lines = []
        for name in ("train", "val", "test", "unlabelled"):
            data = getattr(self, name)
            if data is None:
                continue
            labels = data.hidden_labels if name == "unlabelled" else data.labels
            if labels is None:
                lines.append(f"{name}: {len(data)} images")
            else:
                counts = torch.bincount(labels.cpu(), minlength=self.num_classes).tolist()
                hidden = " (hidden labels)" if name == "unlabelled" else ""
                lines.append(f"{name}: {len(data)} images, per class{hidden} {counts}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SourceOptions:
    """What :func:`load_data` passes every source's loader besides the location.

    Attributes:
        cache_dir: decoded-image cache folder (see :func:`load_cifar10`).
        stream: ``"imagefolder:DIR"`` only: decode into memory or stream from disk.
        num_workers: processes decoding a streamed tree.
        image_size: ``"imagefolder:DIR"`` only: the side (or ``(H, W)``) to resize to.
        interpolation: ``"imagefolder:DIR"`` only: the resize method.
    """

    cache_dir: str | os.PathLike | None = None
    stream: bool | None = None
    num_workers: int | None = None
    image_size: int | tuple[int, int] | None = None
    interpolation: str = "bilinear"


SourceLoader = Callable[[str, SourceOptions], Source]


def _fashion_mnist_source(location: str, options: SourceOptions) -> Source:
    return Source(
        train=load_fashion_mnist(location, train=True),
        test=load_fashion_mnist(location, train=False),
        default_val_per_class=_OFFICIAL_VAL_PER_CLASS,
    )


def _cifar10_source(location: str, options: SourceOptions) -> Source:
    return Source(
        train=load_cifar10(location, train=True, cache_dir=options.cache_dir),
        test=load_cifar10(location, train=False, cache_dir=options.cache_dir),
        default_val_per_class=_OFFICIAL_VAL_PER_CLASS,
    )


def _image_folder_source(location: str, options: SourceOptions) -> Source:
    folder = load_image_folder(
        location,
        options.image_size,
        cache_dir=options.cache_dir,
        stream=options.stream,
        num_workers=options.num_workers,
        interpolation=options.interpolation,
    )
    if "test" not in folder:
        raise FileNotFoundError(f"image folder {location} must contain a test/ folder")
    return Source(train=folder["train"], test=folder["test"], val=folder.get("val"))


def _format_source(read: Callable[..., Source]) -> SourceLoader:
    """A :data:`~selmix.data.formats.FORMATS` reader as a loader (it takes only the cache)."""

    def load(location: str, options: SourceOptions) -> Source:
        return read(location, cache_dir=options.cache_dir)

    return load


#: Spec prefix -> loader: ``load_data("<prefix>:<location>")`` calls
#: ``SOURCES[prefix](location, options)``. The packaged ``"demo"`` is no source (it comes
#: already split) and has no entry.
SOURCES: dict[str, SourceLoader] = {
    "fashion-mnist": _fashion_mnist_source,
    "cifar10": _cifar10_source,
    "imagefolder": _image_folder_source,
    **{prefix: _format_source(read) for prefix, read in FORMATS.items()},
}


def load_data(
    spec: str,
    imbalance: float | None = None,
    max_per_class: int | None = None,
    val_per_class: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    unlabelled_max_per_class: int | None = None,
    unlabelled_imbalance: float | None = None,
    stream: bool | None = None,
    num_workers: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    interpolation: str | None = None,
) -> DataSplits:
    """Loads a data source and splits it into long-tailed train, balanced val and test.

    Specs: ``"fashion-mnist:DIR"``, ``"cifar10:DIR_OR_ARCHIVE"`` (see :func:`load_cifar10`),
    ``"imagefolder:DIR"`` (see :func:`load_image_folder`) and ``"demo"``, the packaged
    Fashion-MNIST-LT subset (see :func:`load_demo`), which is already split: there,
    ``imbalance`` (>= 100) and ``max_per_class`` (<= 1500; default 1500) subsample its
    training set and ``val_per_class`` (<= 100) its validation set. The formats of
    :mod:`selmix.data.formats` add ``"features:FILE"`` (embeddings), ``"cifar100:DIR"``,
    ``"stl10:DIR"`` and ``"imagenet-lt:DIR"``. Every ``"<prefix>:PATH"`` spec is looked up in
    :data:`SOURCES`.

    The validation set takes ``val_per_class`` samples of every class from the official
    training split (default 500 for Fashion-MNIST and CIFAR-10, 10% of the smallest class
    for image folders); an image folder's own ``val/`` is used instead when it exists. The
    training set is then drawn from the rest: with ``imbalance``, class k keeps
    ``long_tail_counts(N_1, K, imbalance)[k]`` samples with ``N_1 = max_per_class`` or, by
    default, the smallest number of samples any class has left (4500 for CIFAR-10 with 500
    held out, the clean CIFAR-10-LT of docs/maths.md section 7); without it, every remaining
    sample is kept (at most ``max_per_class`` per class). The test set is the official one.

    With ``unlabelled_max_per_class`` (M_1), an unlabelled pool with
    ``long_tail_counts(M_1, K, unlabelled_imbalance or 1)`` samples per class is drawn from
    what is left, for the semi-supervised setting (rho_u = imbalance for matched, 1 for
    uniform, 1/imbalance for inverted), served with hidden labels. It is the split that
    :func:`~selmix.data.semi_supervised_split` draws for the same seed.

    Args:
        spec: the source, as above.
        imbalance: rho > 0 for a long-tailed training set, or None.
        max_per_class: N_1 (with ``imbalance``) or a per-class cap (without).
        val_per_class: validation samples per class.
        seed: seed of the class-wise permutations; the same seed gives the same split.
        cache_dir: decoded-image cache folder (see :func:`load_cifar10`).
        unlabelled_max_per_class: M_1, or None for no unlabelled pool.
        unlabelled_imbalance: rho_u (default 1, uniform).
        stream: ``"imagefolder:DIR"`` only: None decodes the tree into memory when it fits
            (a quarter of the available memory) and streams it from disk otherwise; True or
            False forces either (see :func:`load_image_folder`).
        num_workers: processes decoding a streamed tree (None: ``min(4, cores - 1)``).
        image_size: ``"imagefolder:DIR"`` only: resize every image to this side (an int) or
            ``(H, W)``, so trees of mixed sizes load; None keeps the images' own size.
        normalization: ``(mean, std)``, per channel in [0, 1] units, that every split is
            normalised with instead of the training images' statistics (a pretrained
            model's own, see :mod:`selmix.models.preprocessing`); None: the data's.
        interpolation: ``"imagefolder:DIR"`` only: how ``image_size`` resizes, one of
            :data:`selmix.data.augment.RESIZE_METHODS` (a pretrained model's own, e.g.
            ``"bicubic"`` for most timm models); None: bilinear.

    Returns:
        DataSplits(train, val, test, unlabelled, classes).

    Raises:
        ValueError: for an unknown spec prefix (listing the known ones) or a class with too
            few samples for the requested split.
        FileNotFoundError: if the source's files are missing.
    """
    if not isinstance(spec, str):
        raise TypeError(f"`spec` must be a str such as 'cifar10:DIR', got {type(spec).__name__}")
    check_int("seed", seed)
    if imbalance is not None and check_positive("imbalance", imbalance) < 1:
        raise ValueError(
            f"`imbalance` must be >= 1 (the largest class count over the smallest), got {imbalance}"
        )
    if max_per_class is not None:
        check_int("max_per_class", max_per_class, minimum=1)
    if val_per_class is not None:
        check_int("val_per_class", val_per_class, minimum=0)
    if unlabelled_max_per_class is not None:
        check_int("unlabelled_max_per_class", unlabelled_max_per_class, minimum=1)
    if unlabelled_imbalance is not None:
        check_positive("unlabelled_imbalance", unlabelled_imbalance)
        if unlabelled_max_per_class is None:
            raise ValueError("`unlabelled_imbalance` needs `unlabelled_max_per_class` (M_1)")
    if stream is not None and not isinstance(stream, bool):
        raise TypeError(f"`stream` must be None, True or False, got {stream!r}")
    prefix, _, location = spec.partition(":")
    if image_size is not None and prefix != "imagefolder":
        raise ValueError(
            f"`image_size` applies to imagefolder:DIR data only, got {image_size!r} with "
            f"data {spec!r}"
        )
    if interpolation is not None:
        check_resize_method(interpolation)
        if prefix != "imagefolder":
            raise ValueError(
                f"`interpolation` applies to imagefolder:DIR data only, got "
                f"{interpolation!r} with data {spec!r}"
            )
    if spec == "demo":
        demo = _subsample_demo(
            imbalance, max_per_class, val_per_class, seed, unlabelled_max_per_class
        )
        return _normalised(demo, normalization)
    load = SOURCES.get(prefix)
    if load is None or not location:
        known = ", ".join(f"'{p}:PATH'" for p in SOURCES) + ", 'demo'"
        raise ValueError(f"unknown data `spec` {spec!r}; expected one of {known}")
    source = load(
        location,
        SourceOptions(
            cache_dir, stream=stream, num_workers=num_workers, image_size=image_size,
            interpolation=interpolation or "bilinear",
        ),  # fmt: skip
    )
    full_train, test, official_val = source.train, source.test, source.val

    num_classes = full_train.num_classes
    sizes = full_train.class_counts()
    if official_val is not None:
        if val_per_class is not None:
            raise ValueError(
                f"`val_per_class` must be None: {location} has its own val/ folder, "
                f"got {val_per_class}"
            )
        val_per_class = 0
    elif val_per_class is None:
        val_per_class = source.default_val_per_class or carved_val_per_class(
            sizes, full_train.classes
        )
    available = (sizes - val_per_class).clamp_min(0).tolist()
    if imbalance is not None and max_per_class is None and min(available) < 1:
        k = available.index(min(available))
        name = full_train.classes[k] if full_train.classes else k
        raise ValueError(
            f"`val_per_class` = {val_per_class} leaves no training sample of class {name!r} "
            f"(it has {int(sizes[k])}); lower `val_per_class` (--val-per-class) below "
            f"{int(sizes[k])}"
        )
    counts = _train_counts(available, imbalance, max_per_class)

    generator = torch.Generator()
    generator.manual_seed(seed)
    train_idx, val_idx = long_tail_split(full_train.labels, counts, val_per_class, generator)
    unlabelled = None
    if unlabelled_max_per_class is not None:
        if not isinstance(full_train, ImageTensorDataset):
            raise ValueError(
                "`unlabelled_max_per_class` needs the training images in memory, but "
                f"{spec!r} is streamed from disk; pass `stream=False`"
            )
        rho_u = 1.0 if unlabelled_imbalance is None else float(unlabelled_imbalance)
        counts_u = long_tail_counts(unlabelled_max_per_class, num_classes, rho_u)
        taken = torch.zeros(len(full_train), dtype=torch.bool)
        taken[train_idx] = True
        taken[val_idx] = True
        rest = (~taken).nonzero().flatten()
        pool_idx, _ = long_tail_split(full_train.labels[rest], counts_u, 0, generator)
        unlabelled = UnlabelledDataset.from_dataset(full_train, rest[pool_idx])
    val = official_val if official_val is not None else full_train.subset(val_idx)
    splits = DataSplits(
        train=full_train.subset(train_idx),
        val=val,
        test=test,
        unlabelled=unlabelled,
        classes=list(full_train.classes),
    )
    return _normalised(splits, normalization)


def _normalised(
    splits: DataSplits, normalization: tuple[Sequence[float], Sequence[float]] | None
) -> DataSplits:
    """``splits`` with every image split normalised with ``(mean, std)``; a single value
    serves every channel. Splits without images (embeddings) are left as they are."""
    if normalization is None:
        return splits
    if not (isinstance(normalization, (tuple, list)) and len(normalization) == 2):
        raise ValueError(f"`normalization` must be (mean, std), got {normalization!r}")
    for dataset in (splits.train, splits.val, splits.test, splits.unlabelled):
        if dataset is None or not isinstance(getattr(dataset, "mean", None), Tensor):
            continue
        channels = dataset.mean.numel()
        pair = []
        for name, values in zip(("mean", "std"), normalization, strict=True):
            tensor = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
            if tensor.numel() == 1:
                tensor = tensor.expand(channels).clone()
            if tensor.numel() != channels or not torch.isfinite(tensor).all():
                raise ValueError(
                    f"`normalization` {name} must be {channels} finite value(s), one per "
                    f"channel of the images, got {list(values)!r}"
                )
            pair.append(tensor)
        if (pair[1] <= 0).any():
            raise ValueError(f"`normalization` std must be > 0, got {pair[1].tolist()}")
        # an unlabelled pool serves its images through the labelled data set it wraps
        target = dataset._data if isinstance(dataset, UnlabelledDataset) else dataset
        target.mean, target.std = pair
    return splits


def _train_counts(
    available: list[int], imbalance: float | None, max_per_class: int | None
) -> list[int]:
    """Training samples per class: long-tailed with ``imbalance``, else all (capped)."""
    if imbalance is not None:
        first = max_per_class if max_per_class is not None else min(available)
        return long_tail_counts(first, len(available), float(imbalance))
    if max_per_class is not None:
        return [min(a, max_per_class) for a in available]
    return list(available)


def _subsample_demo(
    imbalance: float | None,
    max_per_class: int | None,
    val_per_class: int | None,
    seed: int,
    unlabelled_max_per_class: int | None,
) -> DataSplits:
    """The demo subset, optionally subsampled to a steeper tail or a smaller val set."""
    if unlabelled_max_per_class is not None:
        raise ValueError(
            "`unlabelled_max_per_class` must be None for the 'demo' data, which has no "
            f"unlabelled pool, got {unlabelled_max_per_class}"
        )
    splits = load_demo()
    if imbalance is None and max_per_class is None and val_per_class is None:
        return splits
    generator = torch.Generator()
    generator.manual_seed(seed)
    train, val = splits.train, splits.val
    if imbalance is not None or max_per_class is not None:
        available = train.class_counts().tolist()
        # The demo's own tail is N_1 = 1500, rho = 100: default to its head count, not
        # to its smallest class as for a balanced source.
        first = max_per_class if max_per_class is not None else available[0]
        counts = _train_counts(available, imbalance, first)
        try:
            train_idx, _ = long_tail_split(train.labels, counts, 0, generator)
        except ValueError as error:
            raise ValueError(
                f"the 'demo' training set ({available} per class) can only be subsampled, "
                f"so `imbalance` must be >= 100 and `max_per_class` <= 1500: {error}"
            ) from None
        train = train.subset(train_idx)
    if val_per_class is not None:
        per_class = val.class_counts().tolist()
        if val_per_class > min(per_class):
            raise ValueError(
                f"`val_per_class` must be <= {min(per_class)} for the 'demo' data, "
                f"got {val_per_class}"
            )
        val_idx, _ = long_tail_split(val.labels, [val_per_class] * len(per_class), 0, generator)
        val = val.subset(val_idx)
    return DataSplits(train, val, splits.test, None, splits.classes)


def load_demo() -> DataSplits:
    """The packaged Fashion-MNIST-LT subset (rho = 100, N_1 = 1500), already split.

    Built by ``scripts/make_demo_subset.py`` from the official files: a long-tailed training
    set (3,720 images), a balanced validation set (100 per class, disjoint from it, both from
    the official training split) and a balanced test set (300 per class, from the official
    test split). Fashion-MNIST is MIT-licensed (see ``assets/FASHION_MNIST_COPYRIGHT``).
    """
    asset = resources.files("selmix") / "assets" / DEMO_FILE
    with resources.as_file(asset) as path:
        if not path.is_file():
            raise FileNotFoundError(f"the demo data file is missing from the package: {path}")
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    classes = [str(c) for c in arrays["classes"]]
    mean = arrays["mean"].tolist()
    std = arrays["std"].tolist()

    def split(name: str) -> ImageTensorDataset:
        return ImageTensorDataset(
            torch.from_numpy(arrays[f"{name}_images"]),
            torch.from_numpy(arrays[f"{name}_labels"]).long(),
            mean,
            std,
            classes,
        )

    return DataSplits(split("train"), split("val"), split("test"), None, classes)
