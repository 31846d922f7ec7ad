"""Data sources and :func:`load_data`, which splits one into train / val / test.

Sources: Fashion-MNIST IDX files, CIFAR-10 (torchvision pickles, JPEG tree or archive),
image folders and the packaged Fashion-MNIST-LT demo. :func:`load_data` turns any of them
into a long-tailed training set, a balanced validation set and the official test set.

Every source is decoded into an :class:`~selmix.data.ImageTensorDataset` of uint8 images,
except image folders too large for memory, which are streamed from disk
(:class:`~selmix.data.StreamingImageDataset`). Sources made of many small image files
(the CIFAR-10 JPEG tree or archive, image folders) are decoded once into an ``.npz``
cache, so later runs load in about a second.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selmix._validation import check_int, check_positive
from selmix.data.augment import (
    LARGE_IMAGE_SIDE,
    PILToUint8,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from selmix.data.longtail import long_tail_counts, long_tail_split
from selmix.data.semisup_split import UnlabelledDataset
from selmix.data.streaming import (
    ImageFileReader,
    StreamingImageDataset,
    WorkerPool,
    resolve_num_workers,
)
from selmix.data.tensor_dataset import ImageTensorDataset, channel_stats

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
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# IDX type codes -> numpy dtypes (big-endian, as the format stores them).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Validation samples per class carved from the training split when none is given.
_DEFAULT_VAL_PER_CLASS = {"fashion-mnist": 500, "cifar10": 500}
_SPEC_PREFIXES = ("fashion-mnist", "cifar10", "imagefolder")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)


def read_idx(path: str | os.PathLike) -> Tensor:
    """Reads an IDX file (the MNIST / Fashion-MNIST format), gzip-compressed or not.

    Args:
        path: e.g. ``.../train-images-idx3-ubyte.gz``.

    Returns:
        A tensor with the file's shape and element type, e.g. uint8 [60000, 28, 28] for
        images and uint8 [60000] for labels.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: if the file is not a valid IDX file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as file:
        compressed = file.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:
        # a truncated download or a damaged disk: gzip raises EOFError, BadGzipFile or zlib.error
        raise ValueError(f"IDX file {path} is truncated or corrupt: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: bad magic number {data[:4].hex()}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is not an IDX file: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path} is not a valid IDX file: header says shape {shape} "
            f"({count * dtype.itemsize} bytes) but {len(data) - header} bytes follow"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    # Copy into native byte order: torch needs it, and frombuffer's array is read-only.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


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


def _only_latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes (protocol 2) as _codecs.encode(text, "latin1"); other codecs
    # are never needed by a data file, so they are not callable from one.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _plain_dtype(*args: object) -> np.dtype:
    dtype = np.dtype(*args)  # type: ignore[call-overload]
    if dtype.hasobject:
        # object arrays would unpickle arbitrary Python objects as their elements
        raise pickle.UnpicklingError(f"numpy arrays of dtype {dtype} are not allowed")
    return dtype


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that can only build plain data: containers, numbers, text, numpy arrays.

    Pickle runs whatever callable a file names; a data file needs none but numpy's array
    reconstruction (and ``_codecs.encode`` for bytes in Python 3 pickles), so every other
    global is refused and no code from the file can run.
    """

    # numpy's array constructor under its NumPy 1 and NumPy 2 module names (the CIFAR files
    # were written by NumPy 1); taken from __reduce__ so no private module is imported
    _reconstruct = np.zeros(0).__reduce__()[0]
    _frombuffer = np.zeros(0).__reduce_ex__(5)[0]  # protocol 5's array constructor
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _only_latin1_encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a data file never needs (refused: "
                "a pickle can run code when loaded)"
            ) from None


def read_data_pickle(path: str | os.PathLike, what: str = "data file") -> object:
    """Loads a pickled data file (CIFAR-10/100 batches) without running code from it.

    Only dicts, lists, tuples, bytes, str, numbers and plain (non-object) numpy arrays can be
    built; Python 2 strings come back as ``bytes`` (``encoding="bytes"``), as in the
    original CIFAR files.

    Args:
        path: the pickle file.
        what: how error messages name the file, e.g. ``"CIFAR-10 batch file"``.

    Returns:
        The unpickled object.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupt, or refers to anything but plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty")
    try:
        with open(path, "rb") as file:
            return _DataUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{what} {path} is not readable data: {detail}") from None


def read_cifar_batch(
    path: Path, what: str, kind: str, label_key: bytes
) -> tuple[np.ndarray, list[int]]:
    """Images and labels of one CIFAR pickle (CIFAR-10's and CIFAR-100's share the layout).

    Args:
        path: the pickle file.
        what: how error messages name the file, e.g. ``"CIFAR-10 batch file"``.
        kind: how error messages name the expected content, e.g. ``"CIFAR"``.
        label_key: the key of the labels, ``b"labels"`` or ``b"fine_labels"``.

    Returns:
        ``(images, labels)``: uint8 array [N, 3, 32, 32] and N int labels (unchecked range).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: one line naming the file: unreadable, not a batch dict, or images and
            labels of different counts.
    """
    batch = read_data_pickle(path, what)
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # type: ignore[index]
        labels = [int(label) for label in batch[label_key]]  # type: ignore[index]
    except (TypeError, KeyError, ValueError, IndexError) as error:
        raise ValueError(
            f"{what} {path} does not hold a {kind} batch (a dict with b'data' of N x 3072 "
            f"bytes and {label_key!r}): {type(error).__name__}: {error}"
        ) from None
    if len(labels) != len(data):
        raise ValueError(f"{what} {path} has {len(data)} images but {len(labels)} labels")
    return data, labels


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
# Image folders


def load_image_folder(
    root: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    stream: bool | None = None,
    num_workers: int | None = None,
    train_transform: Callable[[Any], Tensor] | None = None,
    eval_transform: Callable[[Any], Tensor] | None = None,
    crop_size: int = 224,
    memory_fraction: float = 0.25,
) -> dict[str, ImageTensorDataset | StreamingImageDataset]:
    """Loads ``root/train/<class>/*`` and, if present, ``root/val/...`` and ``root/test/...``.

    Classes are the sorted sub-folder names of ``train/`` (every file below a class folder
    counts, as in torchvision's ``ImageFolder``); ``val/`` and ``test/`` may omit classes
    but not add new ones. Images are kept grey (1 channel) if all are grey and converted
    to RGB otherwise.

    **In memory or streamed.** The decoded size of the tree (N x C x H x W bytes, from the
    headers of a sample of its files) is compared with ``memory_fraction`` of the memory
    available: a tree that fits is decoded once into uint8 tensors
    (:class:`~selmix.data.ImageTensorDataset`; every image must then share one size unless
    ``image_size`` is given, and mean and std are measured on all training images); a
    larger one is read batch by batch from disk by ``num_workers`` processes
    (:class:`~selmix.data.StreamingImageDataset`). ``stream`` forces either.

    **Transforms of a streamed tree.** Images larger than
    :data:`~selmix.data.augment.LARGE_IMAGE_SIDE` pixels (shorter side, without
    ``image_size``) get the standard ImageNet transforms: random-resized crop and flip for
    training, resize and ``crop_size`` centre crop for evaluation. Smaller ones (or all,
    with ``image_size``) are decoded as in memory and get the same batched random crop
    (padding 4) and flip, so both paths give the same batches. ``train_transform`` and
    ``eval_transform`` replace either (PIL image -> Tensor[C, H, W]; uint8 output is
    normalised with the measured statistics, float output is used as it is; their
    randomness must come from torch's global generator, which is seeded per image).
    Statistics of a streamed tree come from up to 1,000 evenly spaced training images.

    Args:
        root: the folder holding ``train/``.
        image_size: None (native size), an int (square) or ``(H, W)``: resize every image.
        cache_dir: if given, decoded in-memory tensors are cached there as ``.npz`` (key:
            path and modification times) and later calls read the cache.
        stream: None (choose by size), True (stream) or False (decode into memory).
        num_workers: decoding processes of a streamed tree (None: ``min(4, cores - 1)``;
            0: the main process decodes).
        train_transform, eval_transform: per-image transforms of a streamed tree.
        crop_size: output side of the ImageNet transforms.
        memory_fraction: share of the available memory a tree may take in memory.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` for the splits present, with the same
        classes; streamed splits share one reader and one pool of workers.
    """
    root = Path(root)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"image folder {root} must contain a train/ folder")
    size = _check_image_size(image_size)
    if stream is not None and not isinstance(stream, bool):
        raise TypeError(f"`stream` must be None, True or False, got {stream!r}")
    resolve_num_workers(num_workers)
    check_int("crop_size", crop_size, minimum=1)
    if not (isinstance(memory_fraction, (int, float)) and 0 < memory_fraction <= 1):
        raise ValueError(f"`memory_fraction` must lie in (0, 1], got {memory_fraction!r}")
    if stream is None:
        files = _tree_files(root, ("train", "val", "test"))
        estimate = estimate_decoded_bytes([path for _, _, _, path in files], size)
        stream = estimate > memory_fraction * available_memory()
    if stream:
        return _stream_image_folder(
            root, size, num_workers, train_transform, eval_transform, crop_size
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    decoded = _cached_decode("imagefolder", root, ("train", "val", "test"), size, cache)
    train_images, train_labels = decoded.splits["train"]
    mean, std = channel_stats(train_images)
    return {
        split: ImageTensorDataset(
            images, labels, mean, std, decoded.classes, num_classes=len(decoded.classes)
        )
        for split, (images, labels) in decoded.splits.items()
    }


# (split, class, file name relative to the class folder, path)
_File = tuple[str, str, str, Path]


def _tree_files(root: Path, splits: Sequence[str]) -> list[_File]:
    """The image files of a tree, in the order the in-memory path stores them."""
    files = []
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            continue
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name.startswith("."):
                continue
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and _is_image_name(path.name):
                    files.append(
                        (split, class_dir.name, path.relative_to(class_dir).as_posix(), path)
                    )
    return files


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never stream by default


def estimate_decoded_bytes(
    paths: Sequence[Path], image_size: tuple[int, int] | None = None, sample: int = 64
) -> int:
    """N x C x H x W of decoding ``paths`` to uint8, from the headers of up to ``sample``
    evenly spaced files (only headers are read: PIL decodes pixels lazily)."""
    if not paths:
        return 0
    sizes, grey = _sample_headers(paths, sample)
    channels = 1 if grey else 3
    pixels: float
    if image_size is not None:
        pixels = image_size[0] * image_size[1]
    else:
        pixels = sum(w * h for w, h in sizes) / len(sizes)
    return int(len(paths) * channels * pixels)


def _sample_headers(paths: Sequence[Path], sample: int) -> tuple[list[tuple[int, int]], bool]:
    """(width, height) of up to ``sample`` evenly spaced files, and whether all are grey."""
    from PIL import Image, UnidentifiedImageError

    count = min(len(paths), sample)
    chosen = sorted({round(k * (len(paths) - 1) / max(count - 1, 1)) for k in range(count)})
    sizes, grey = [], True
    for i in chosen:
        try:
            with Image.open(paths[i]) as image:
                sizes.append(image.size)
                grey = grey and image.mode in _GREY_MODES
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {paths[i]}: {error}") from error
    return sizes, grey


def _stream_image_folder(
    root: Path,
    size: tuple[int, int] | None,
    num_workers: int | None,
    train_transform: Callable[[Any], Tensor] | None,
    eval_transform: Callable[[Any], Tensor] | None,
    crop_size: int,
) -> dict[str, ImageTensorDataset | StreamingImageDataset]:
    _check_class_folders(root)
    files = _tree_files(root, ("train", "val", "test"))
    train_files = [f for f in files if f[0] == "train"]
    if not train_files:
        raise FileNotFoundError(f"no training images (train/<class>/<image>) found in {root}")
    classes = sorted({c for _, c, _, _ in train_files})
    index = {c: k for k, c in enumerate(classes)}
    ordered: list[_File] = []
    for split in ("train", "val", "test"):
        split_files = [f for f in files if f[0] == split]
        unknown = sorted({c for _, c, _, _ in split_files if c not in index})
        if unknown:
            raise ValueError(f"{root}: {split}/ has classes {unknown} that train/ does not have")
        ordered += sorted(split_files, key=lambda f: (index[f[1]], f[2]))
    paths = [f[3] for f in ordered]
    sizes, grey = _sample_headers(paths, 64)
    mode = "L" if grey else "RGB"
    batch_crop = False
    if train_transform is not None or eval_transform is not None:
        train_transform = train_transform or eval_transform
        eval_transform = eval_transform or train_transform
    elif size is None and min(min(s) for s in sizes) > LARGE_IMAGE_SIDE:
        train_transform = imagenet_train_transform(crop_size)
        eval_transform = imagenet_eval_transform(crop_size)
    else:
        if size is None and len(set(sizes)) > 1:
            raise ValueError(
                f"{root}: images of {len(set(sizes))} sizes (e.g. {sorted(set(sizes))[:2]}, "
                "width x height) are too small for the ImageNet transforms; pass "
                "`image_size` to resize every image to one size"
            )
        train_transform = eval_transform = PILToUint8(size)
        batch_crop = True
    assert train_transform is not None and eval_transform is not None  # set by each branch
    reader = ImageFileReader(paths, mode, train_transform, eval_transform)
    labels = torch.tensor([index[f[1]] for f in ordered], dtype=torch.long)
    splits = [f[0] for f in ordered]
    pool = WorkerPool(reader, num_workers)
    first = reader[(0, False, None)]
    image_shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))

    def split_set(name: str, mean: Any, std: Any) -> StreamingImageDataset:
        rows = torch.tensor([i for i, s in enumerate(splits) if s == name], dtype=torch.long)
        return StreamingImageDataset(
            reader, labels[rows], classes, mean, std, image_shape, rows=rows,
            random_transform=not batch_crop, batch_crop=batch_crop, pool=pool,
        )  # fmt: skip

    channels = image_shape[0]
    train = split_set("train", torch.zeros(channels), torch.ones(channels))
    if first.dtype == torch.uint8:
        mean, std = train.channel_stats()
    else:
        mean, std = torch.zeros(channels), torch.ones(channels)  # the transform normalises
    return {name: split_set(name, mean, std) for name in ("train", "val", "test") if name in splits}


def _check_image_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        check_int("image_size", image_size, minimum=1)
        return image_size, image_size
    if (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in image_size)
    ):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(f"`image_size` must be None, an int >= 1 or (H, W), got {image_size!r}")


# --------------------------------------------------------------------------------------------
# Decoding image trees and archives, with a cache


@dataclass
class _Decoded:
    classes: list[str]
    splits: dict[str, tuple[Tensor, Tensor]]


def _is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SELMIX_CACHE_DIR"):
        return Path(os.environ["SELMIX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selmix"


def _cache_key(source: Path, size: tuple[int, int] | None) -> str:
    source = source.resolve()
    parts = [str(source), repr(size)]
    if source.is_file():
        stat = source.stat()
        parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    else:
        # Adding or removing a file changes its folder's modification time.
        for folder in sorted(p for p in source.glob("*/*") if p.is_dir()):
            parts.append(f"{folder.relative_to(source)}:{folder.stat().st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _cached_decode(
    name: str,
    source: Path,
    splits: Sequence[str],
    size: tuple[int, int] | None,
    cache_dir: Path | None,
) -> _Decoded:
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_dir / f"{name}-{_cache_key(source, size)}.npz"
        if cache_file.is_file():
            try:
                return _read_cache(cache_file)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                pass  # a damaged or foreign file: decode again and overwrite it
    entries = (
        _archive_entries(source, splits) if source.is_file() else _tree_entries(source, splits)
    )
    decoded = _decode_entries(entries, size, source)
    if cache_file is not None:
        _write_cache(cache_file, decoded)
    return decoded


def _read_cache(path: Path) -> _Decoded:
    with np.load(path, allow_pickle=False) as archive:
        classes = [str(c) for c in archive["classes"]]
        splits = {
            str(split): (
                torch.from_numpy(archive[f"{split}_images"]),
                torch.from_numpy(archive[f"{split}_labels"]).long(),
            )
            for split in archive["splits"]
        }
    return _Decoded(classes, splits)


def _write_cache(path: Path, decoded: _Decoded) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "classes": np.array(decoded.classes),
        "splits": np.array(list(decoded.splits)),
    }
    for split, (images, labels) in decoded.splits.items():
        arrays[f"{split}_images"] = images.numpy()
        arrays[f"{split}_labels"] = labels.numpy()
    # Write then rename, so an interrupted run never leaves a truncated cache behind.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            # plain arrays only, as the cache is read back with allow_pickle=False
            np.savez(file, allow_pickle=False, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# (split, class, file name, encoded bytes)
_Entry = tuple[str, str, str, bytes]


def _archive_entries(archive: Path, splits: Sequence[str]) -> Iterator[_Entry]:
    # Stream mode ("r|*") reads the archive front to back, never seeking or unpacking.
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name).parts
                if len(parts) < 3 or parts[-3] not in splits or not _is_image_name(parts[-1]):
                    continue
                file = tar.extractfile(member)
                if file is not None:
                    yield parts[-3], parts[-2], parts[-1], file.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        # a truncated download: tarfile, gzip and zlib each raise their own type
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"archive {archive} is truncated or corrupt: {detail}") from None


def _check_class_folders(root: Path) -> None:
    """Names an empty ``train/<class>/`` folder of a tree: its class would otherwise vanish,
    or be reported as a ``val/`` or ``test/`` class that train/ does not have."""
    train = root / "train"
    if not train.is_dir():
        return
    for class_dir in sorted(p for p in train.iterdir() if p.is_dir()):
        if class_dir.name.startswith("."):
            continue
        if not any(p.is_file() and _is_image_name(p.name) for p in class_dir.rglob("*")):
            raise ValueError(
                f"{root}: the class folder train/{class_dir.name}/ holds no images; every "
                "class needs training images (add some, or remove the folder)"
            )


def _tree_entries(root: Path, splits: Sequence[str]) -> Iterator[_Entry]:
    _check_class_folders(root)
    for split, class_name, name, path in _tree_files(root, splits):
        yield split, class_name, name, path.read_bytes()


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in _IMAGE_SUFFIXES


def _decode_entries(
    entries: Iterable[_Entry], size: tuple[int, int] | None, source: Path
) -> _Decoded:
    from PIL import Image

    decoded: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    for split, class_name, file_name, data in entries:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("L" if image.mode in _GREY_MODES else "RGB")
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except OSError as error:
            raise ValueError(
                f"cannot decode image {split}/{class_name}/{file_name} in {source}: {error}"
            ) from error
        decoded.setdefault(split, {})[(class_name, file_name)] = (
            array[:, :, None] if array.ndim == 2 else array
        )
    if "train" not in decoded:
        raise FileNotFoundError(f"no training images (train/<class>/<image>) found in {source}")
    classes = sorted({c for c, _ in decoded["train"]})
    index = {c: k for k, c in enumerate(classes)}
    channels = max(a.shape[2] for images in decoded.values() for a in images.values())
    expected = None
    splits: dict[str, tuple[Tensor, Tensor]] = {}
    for split in ("train", "val", "test"):
        if split not in decoded:
            continue
        keys = sorted(decoded[split], key=lambda key: (index.get(key[0], -1), key[1]))
        unknown = sorted({c for c, _ in keys if c not in index})
        if unknown:
            raise ValueError(f"{source}: {split}/ has classes {unknown} that train/ does not have")
        arrays = []
        for key in keys:
            array = decoded[split].pop(key)
            if expected is None:
                expected = array.shape[:2]
            if array.shape[:2] != expected:
                raise ValueError(
                    f"{source}: image {split}/{key[0]}/{key[1]} is {array.shape[0]}x"
                    f"{array.shape[1]} but the others are {expected[0]}x{expected[1]}; pass "
                    "`image_size` to resize every image to one size"
                )
            if array.shape[2] != channels:
                array = np.repeat(array, channels, axis=2)
            arrays.append(array)
        images = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
        labels = torch.tensor([index[c] for c, _ in keys], dtype=torch.long)
        splits[split] = (images, labels)
    return _Decoded(classes, splits)


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
) -> DataSplits:
    """Loads a data source and splits it into long-tailed train, balanced val and test.

    Specs: ``"fashion-mnist:DIR"``, ``"cifar10:DIR_OR_ARCHIVE"`` (see :func:`load_cifar10`),
    ``"imagefolder:DIR"`` (see :func:`load_image_folder`) and ``"demo"``, the packaged
    Fashion-MNIST-LT subset (see :func:`load_demo`), which is already split: there,
    ``imbalance`` (>= 100) and ``max_per_class`` (<= 1500; default 1500) subsample its
    training set and ``val_per_class`` (<= 100) its validation set. The formats of
    :mod:`selmix.data.formats` add ``"features:FILE"`` (embeddings), ``"cifar100:DIR"``,
    ``"stl10:DIR"`` and ``"imagenet-lt:DIR"``.

    The validation set takes ``val_per_class`` samples of every class from the official
    training split (default 500 for Fashion-MNIST and CIFAR-10, 10% of the smallest class
    for image folders); an image folder's own ``val/`` is used instead when it exists. The
    training set is then drawn from the rest: with ``imbalance``, class k keeps
    ``long_tail_counts(N_1, K, imbalance)[k]`` samples with ``N_1 = max_per_class`` or, by
    default, the smallest number of samples any class has left (4500 for CIFAR-10 with 500
    held out, the clean CIFAR-10-LT of MATH.md section 7); without it, every remaining
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
    if spec == "demo":
        return _subsample_demo(
            imbalance, max_per_class, val_per_class, seed, unlabelled_max_per_class
        )
    prefix, _, location = spec.partition(":")
    from selmix.data.formats import FORMATS  # features, cifar100, stl10, imagenet-lt

    if (prefix not in _SPEC_PREFIXES and prefix not in FORMATS) or not location:
        known = ", ".join(f"'{p}:PATH'" for p in (*_SPEC_PREFIXES, *FORMATS)) + ", 'demo'"
        raise ValueError(f"unknown data `spec` {spec!r}; expected one of {known}")

    official_val = None
    default_val_per_class = _DEFAULT_VAL_PER_CLASS.get(prefix)
    if prefix in FORMATS:
        source = FORMATS[prefix](location, cache_dir=cache_dir)
        full_train, test, official_val = source.train, source.test, source.val
        default_val_per_class = source.default_val_per_class
    elif prefix == "fashion-mnist":
        full_train = load_fashion_mnist(location, train=True)
        test = load_fashion_mnist(location, train=False)
    elif prefix == "cifar10":
        full_train = load_cifar10(location, train=True, cache_dir=cache_dir)
        test = load_cifar10(location, train=False, cache_dir=cache_dir)
    else:
        folder = load_image_folder(
            location, cache_dir=cache_dir, stream=stream, num_workers=num_workers
        )
        if "test" not in folder:
            raise FileNotFoundError(f"image folder {location} must contain a test/ folder")
        full_train, test, official_val = folder["train"], folder["test"], folder.get("val")

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
        val_per_class = default_val_per_class or max(1, int(sizes.min()) // 10)
    available = (sizes - val_per_class).clamp_min(0).tolist()
    if imbalance is not None and max_per_class is None and min(available) < 1:
        raise ValueError(
            f"`val_per_class` = {val_per_class} leaves no training sample of class "
            f"{available.index(min(available))}"
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
    return DataSplits(
        train=full_train.subset(train_idx),
        val=val,
        test=test,
        unlabelled=unlabelled,
        classes=list(full_train.classes),
    )


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
