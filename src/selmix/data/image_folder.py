"""Image folders (``root/{train,val,test}/<class>/*``): decoded once into uint8 tensors
(with an ``.npz`` cache) or, too large for memory, streamed from disk; and the decoding of
image trees and archives that the CIFAR-10 JPEG source shares.

Below :mod:`selmix.data.sources` (which loads ``imagefolder:DIR`` and the CIFAR-10 tree
through this module) and above the readers and datasets it builds.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selmix._validation import check_int, height_width
from selmix.data.augment import (
    LARGE_IMAGE_SIDE,
    PILToUint8,
    check_resize_method,
    imagenet_eval_transform,
    imagenet_train_transform,
    resize_image,
)
from selmix.data.streaming import (
    ImageFileReader,
    StreamingImageDataset,
    WorkerPool,
    resolve_num_workers,
)
from selmix.data.tensor_dataset import ImageTensorDataset, channel_stats

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


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
    interpolation: str = "bilinear",
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
        interpolation: the resize method with ``image_size``, one of
            :data:`~selmix.data.augment.RESIZE_METHODS` (a pretrained model's own, e.g.
            ``"bicubic"``); part of the cache key.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` for the splits present, with the same
        classes; streamed splits share one reader and one pool of workers.
    """
    root = Path(root)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"image folder {root} must contain a train/ folder")
    size = _check_image_size(image_size)
    check_resize_method(interpolation)
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
            root, size, num_workers, train_transform, eval_transform, crop_size, interpolation
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    decoded = _cached_decode(
        "imagefolder", root, ("train", "val", "test"), size, cache, interpolation
    )
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
                if path.is_file() and _is_visible_image(path, class_dir):
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
    interpolation: str = "bilinear",
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
        train_transform = eval_transform = PILToUint8(size, interpolation)
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
    size = height_width(image_size)
    if size is not None:
        return size
    raise ValueError(f"`image_size` must be None, an int >= 1 or (H, W), got {image_size!r}")


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


def _cache_key(
    source: Path, size: tuple[int, int] | None, interpolation: str = "bilinear"
) -> str:
    source = source.resolve()
    parts = [str(source), repr(size)]
    if size is not None and interpolation != "bilinear":
        parts.append(interpolation)  # bilinear keeps the keys of caches written before
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
    interpolation: str = "bilinear",
) -> _Decoded:
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_dir / f"{name}-{_cache_key(source, size, interpolation)}.npz"
        if cache_file.is_file():
            try:
                return _read_cache(cache_file)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                pass  # a damaged or foreign file: decode again and overwrite it
    entries = (
        _archive_entries(source, splits) if source.is_file() else _tree_entries(source, splits)
    )
    decoded = _decode_entries(entries, size, source, interpolation)
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
                if parts[-2].startswith("."):  # a hidden folder's copies are no class
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
        if not any(p.is_file() and _is_visible_image(p, class_dir) for p in class_dir.rglob("*")):
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


def _is_visible_image(path: Path, class_dir: Path) -> bool:
    """An image file none of whose folders below ``class_dir`` is hidden: a
    ``.ipynb_checkpoints/`` copy of another class's images is not this class's data."""
    inside = path.relative_to(class_dir).parts
    return _is_image_name(path.name) and not any(part.startswith(".") for part in inside)


def _decode_entries(
    entries: Iterable[_Entry],
    size: tuple[int, int] | None,
    source: Path,
    interpolation: str = "bilinear",
) -> _Decoded:
    from PIL import Image

    decoded: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    for split, class_name, file_name, data in entries:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("L" if image.mode in _GREY_MODES else "RGB")
                if size is not None:
                    image = resize_image(image, size, interpolation)
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
