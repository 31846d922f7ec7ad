"""Data sets decoded from disk batch by batch, in parallel worker processes.

SelMix decides every batch in the main process: the pairs of step t come from the policy of
step t, so the next batch cannot be known, let alone prefetched, before the current step is
done. What can run in parallel is the decoding of the current batch. :class:`WorkerPool`
keeps ``num_workers`` persistent ``torch.utils.data.DataLoader`` workers and hands each of
them a contiguous share of the requested indices; the main process stacks the shares in
order, pins the result when the batch goes to a GPU and copies it there.

Random transforms are reproducible whatever the number of workers: with ``augment`` one
batch seed is drawn from the caller's generator in the main process (so the generator state,
which checkpoints hold, determines the batch) and item ``b`` of the batch is transformed
under ``torch.manual_seed(item_seed(batch_seed, b))``, in whichever process decodes it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from selmix._validation import check_int
from selmix.data.augment import channel_stats, normalize, random_crop_flip
from selmix.data.base import BatchDataset, as_index

# (row of the reader, augment, seed or None): what a worker is asked to decode
Item = tuple[int, bool, int | None]

# Shares per worker and batch: more than one evens out slow images across workers.
_SHARES_PER_WORKER = 2
_SEED_MASK = (1 << 63) - 1


def default_num_workers() -> int:
    """``min(4, usable CPU cores - 1)``: 0 (decode in the main process) on a 1-core machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def resolve_num_workers(num_workers: int | None) -> int:
    """Checks ``num_workers`` (an int >= 0), None meaning :func:`default_num_workers`."""
    if num_workers is None:
        return default_num_workers()
    return check_int("num_workers", num_workers, minimum=0)


def item_seed(batch_seed: int, position: int) -> int:
    """The seed of item ``position`` of a batch (a fixed mix, independent of the workers)."""
    # splitmix64-style scrambling, so neighbouring positions get unrelated seeds
    value = (batch_seed + 0x9E3779B97F4A7C15 * (position + 1)) & ((1 << 64) - 1)
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (value ^ (value >> 31)) & _SEED_MASK


def draw_batch_seed(generator: torch.Generator | None) -> int:
    """One seed from ``generator`` (torch's global generator if None)."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator))


def run_seeded(seed: int | None, function: Callable[[], Any]) -> Any:
    """Calls ``function`` with torch's and Python's global generators seeded by ``seed``
    (restored afterwards, so the main process's own random state is left alone)."""
    if seed is None:
        return function()
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also queue a CUDA seeding per image
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return function()
        finally:
            random.setstate(python_state)


class _Shares(Sampler[list[Item]]):
    """The batch sampler of a :class:`WorkerPool`: yields the shares of the current request.

    It is iterated in the main process when a batch is asked for, so each request is
    decided there, just before its images are decoded.
    """

    def __init__(self) -> None:
        self.shares: list[list[Item]] = []

    def __iter__(self) -> Iterator[list[Item]]:
        return iter(self.shares)

    def __len__(self) -> int:
        return len(self.shares)


class _Failure:
    """An error raised while decoding, carried back to the main process as data: a worker
    that raised would leave the persistent DataLoader iterator unusable."""

    def __init__(self, error: Exception) -> None:
        self.error_type = type(error)
        self.message = str(error)

    def raise_error(self) -> None:
        try:
            error = self.error_type(self.message)
        except Exception:  # an exception type with another signature
            error = RuntimeError(f"{self.error_type.__name__}: {self.message}")
        raise error


class _Guarded(Dataset):
    def __init__(self, reader: Dataset) -> None:
        self.reader = reader

    def __getitem__(self, item: Item) -> Tensor | _Failure:
        try:
            return self.reader[item]
        except Exception as error:
            return _Failure(error)


def stack_images(images: Sequence[Tensor], dim_is_batch: bool = False) -> Tensor:
    """``images`` stacked (or, with ``dim_is_batch``, batches concatenated) into one tensor.

    Raises:
        ValueError: the images differ in size (a tree of mixed sizes read without
            ``image_size``), naming two of the sizes and the setting that resizes them.
    """
    shapes = sorted({tuple(image.shape[1:] if dim_is_batch else image.shape) for image in images})
    if len(shapes) > 1:
        shown = " and ".join("x".join(str(side) for side in shape) for shape in shapes[:2])
        raise ValueError(
            f"the images of one batch differ in size ({shown}, C x H x W); pass `image_size` "
            "(--image-size N) to resize every image to one size"
        )
    return torch.cat(list(images)) if dim_is_batch else torch.stack(list(images))


def _stack(items: list[Tensor | _Failure]) -> Tensor | _Failure:
    for item in items:
        if isinstance(item, _Failure):
            return item
    if not items:
        return torch.empty(0)
    try:
        return stack_images(items)  # type: ignore[arg-type]
    except ValueError as error:
        return _Failure(error)


class WorkerPool:
    """Decodes items of ``reader`` in ``num_workers`` persistent processes.

    Args:
        reader: a map-style data set whose ``reader[(row, augment, seed)]`` is one decoded
            Tensor[C, H, W]; its items in one request must share a shape.
        num_workers: worker processes; 0 decodes in the main process. Started at the first
            request, kept until :meth:`close` (or the pool is garbage-collected).
    """

    def __init__(self, reader: Dataset, num_workers: int | None = None) -> None:
        self.reader = reader
        self.num_workers = resolve_num_workers(num_workers)
        self._shares = _Shares()
        self._loader: DataLoader | None = None

    def __getstate__(self) -> dict[str, Any]:
        # workers cannot travel: a copy (another process, copy.deepcopy) starts its own
        return {**self.__dict__, "_loader": None, "_shares": _Shares()}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers (a later request starts new ones)."""
        self._loader = None  # the DataLoader's iterator shuts its workers down when freed

    def load(self, items: Sequence[Item]) -> Tensor:
        """The decoded items stacked in order: Tensor[B, C, H, W] (on CPU)."""
        items = list(items)
        if not items:
            return torch.empty(0)
        if self.num_workers == 0 or len(items) == 1:
            # decoded here, a failure raises at once: every item is a tensor
            return stack_images([self.reader[item] for item in items])
        count = min(len(items), self.num_workers * _SHARES_PER_WORKER)
        bounds = [round(len(items) * k / count) for k in range(count + 1)]
        self._shares.shares = [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        if self._loader is None:
            self._loader = DataLoader(
                _Guarded(self.reader),
                batch_sampler=self._shares,
                num_workers=self.num_workers,
                collate_fn=_stack,
                persistent_workers=True,
                prefetch_factor=_SHARES_PER_WORKER,
                # the workers' own seeds are never used (items carry theirs); a private
                # generator keeps the main process's global one untouched
                generator=torch.Generator().manual_seed(0),
            )
        try:
            parts = list(self._loader)
        except BaseException:
            self.close()  # an interrupted iterator is not reused: start afresh next time
            raise
        finally:
            self._shares.shares = []
        for part in parts:
            if isinstance(part, _Failure):
                part.raise_error()
        return stack_images(parts, dim_is_batch=True)


def to_device(images: Tensor, device: torch.device | str | None) -> Tensor:
    """``images`` on ``device``; a copy to a GPU goes through pinned memory, asynchronously."""
    if device is None:
        return images
    device = torch.device(device)
    if device.type == "cuda" and images.device.type == "cpu":
        images = images.pin_memory()
        return images.to(device, non_blocking=True)
    return images.to(device)


def seeded_items(
    rows: Sequence[int], augment: bool, random_transform: bool, generator: torch.Generator | None
) -> list[Item]:
    """The requests for ``rows``; a batch seed is drawn only when a random transform runs,
    so a run without augmentation leaves ``generator`` untouched."""
    if augment and random_transform:
        batch_seed = draw_batch_seed(generator)
        return [(row, True, item_seed(batch_seed, b)) for b, row in enumerate(rows)]
    return [(row, augment, None) for row in rows]


# --------------------------------------------------------------------------------------------
# Image files


class ImageFileReader(Dataset):
    """Decodes one image file into a Tensor[C, H, W] through a train or an eval transform.

    Args:
        paths: image files.
        mode: PIL mode every image is converted to (``"RGB"`` or ``"L"``).
        train_transform: applied to the PIL image when the item asks for augmentation.
        eval_transform: applied otherwise.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        mode: str,
        train_transform: Callable[[Any], Tensor],
        eval_transform: Callable[[Any], Tensor],
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.mode = mode
        self.train_transform = train_transform
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: Item) -> Tensor:
        row, augment, seed = item
        image = self.open(row)
        transform = self.train_transform if augment else self.eval_transform
        output = run_seeded(seed, lambda: transform(image))
        if not isinstance(output, Tensor) or output.dim() != 3:
            raise TypeError(
                f"transforms must return a Tensor[C, H, W], got "
                f"{tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}"
            )
        return output

    def open(self, row: int) -> Any:
        """The image of ``row``, decoded and converted to :attr:`mode` (a PIL image)."""
        from PIL import Image, UnidentifiedImageError

        path = self.paths[row]
        try:
            with Image.open(path) as image:
                return image.convert(self.mode)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            detail = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"image {path} cannot be decoded: {detail}") from None


class StreamingImageDataset(BatchDataset):
    """Image files decoded batch by batch in worker processes, normalised on the way out.

    It has the interface of :class:`~selmix.data.ImageTensorDataset` (``labels``,
    ``num_classes``, ``classes``, ``mean``, ``std``, ``batch``, ``subset``,
    ``class_counts``, ``image_shape``) without holding the images: each
    :meth:`batch` reads and decodes its files. Subsets share the reader and the workers.

    Transforms return uint8 (normalised here with ``mean``/``std``, like the in-memory
    path) or float tensors (returned as they are: the transform normalised them). With
    ``batch_crop`` the random crop (``padding``) and flip of the in-memory path run on the
    whole decoded batch in the main process, with the caller's generator, so a streamed
    small-image set gives the very batches an :class:`~selmix.data.ImageTensorDataset`
    of the same images gives.

    Args:
        reader: the :class:`ImageFileReader` (or any reader of ``(row, augment, seed)``).
        labels: int64 Tensor[N].
        classes: class names (length K).
        mean, std: per-channel statistics in [0, 1] units.
        image_shape: (C, H, W) of the eval transform's output.
        rows: the reader's rows of these samples (default: all of them, in order).
        num_workers: decoding processes (None: :func:`default_num_workers`; 0: none).
        random_transform: whether ``train_transform`` draws random numbers (a batch seed
            is drawn from the generator only then).
        batch_crop: use the batched crop/flip (``padding``, ``flip``) for augmentation.
        padding, flip: as in :class:`~selmix.data.ImageTensorDataset`.
        pool: a :class:`WorkerPool` to share (``subset`` passes its own).
    """

    def __init__(
        self,
        reader: Dataset,
        labels: Tensor,
        classes: Sequence[str],
        mean: Sequence[float] | Tensor,
        std: Sequence[float] | Tensor,
        image_shape: tuple[int, int, int],
        *,
        rows: Tensor | None = None,
        num_workers: int | None = None,
        random_transform: bool = True,
        batch_crop: bool = False,
        padding: int = 4,
        flip: bool = True,
        pool: WorkerPool | None = None,
    ) -> None:
        self.reader = reader
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        self.rows = torch.arange(len(self.labels)) if rows is None else torch.as_tensor(rows).long()
        if self.rows.numel() != self.labels.numel():
            raise ValueError(
                f"`rows` must have one entry per label ({self.labels.numel()}), "
                f"got {self.rows.numel()}"
            )
        self.classes = [str(c) for c in classes]
        self.num_classes = len(self.classes)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        self._image_shape = tuple(int(s) for s in image_shape)
        self.random_transform = bool(random_transform)
        self.batch_crop = bool(batch_crop)
        self.padding = check_int("padding", padding, minimum=0)
        self.flip = bool(flip)
        self.pool = pool if pool is not None else WorkerPool(reader, num_workers)

    @property
    def num_workers(self) -> int:
        """Decoding processes (0: the main process decodes)."""
        return self.pool.num_workers

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of an evaluation batch's images."""
        return self._image_shape  # type: ignore[return-value]

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (
            f"{type(self).__name__}({len(self)} images of {c}x{h}x{w}, {self.num_classes} "
            f"classes, {self.num_workers} workers)"
        )

    def _batch(
        self,
        index: Tensor,
        augment: bool,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> tuple[Tensor, Tensor]:
        """Decodes and normalises the given samples, float32 [B, C, H, W] (on CPU unless
        ``device`` says otherwise); ``augment`` applies the train transform (or the batched
        crop/flip); the same generator state gives the same batch, whatever ``num_workers``."""
        rows = self.rows[index].tolist()
        per_item_augment = augment and not self.batch_crop
        items = seeded_items(rows, per_item_augment, self.random_transform, generator)
        images = self.pool.load(items)
        if not images.numel():
            images = torch.empty(0, *self.image_shape)
        labels = self.labels[index]
        if device is not None:
            images, labels = to_device(images, device), labels.to(device)
        if images.dtype != torch.uint8:
            return images.float(), labels
        images = images.float()
        if augment and self.batch_crop:
            images = random_crop_flip(images, self.padding, self.flip, generator)
        return normalize(images, self.mean, self.std), labels

    def subset(self, indices: Any) -> StreamingImageDataset:
        """The given samples (same reader, workers, classes, statistics and transforms)."""
        index = as_index(indices, len(self))
        return StreamingImageDataset(
            self.reader, self.labels[index], self.classes, self.mean, self.std,
            self.image_shape, rows=self.rows[index], random_transform=self.random_transform,
            batch_crop=self.batch_crop, padding=self.padding, flip=self.flip, pool=self.pool,
        )  # fmt: skip

    def channel_stats(self, max_images: int = 1000, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std of up to ``max_images`` evenly spaced samples (eval
        transform, before normalisation), float32 Tensor[C] each, in [0, 1] units."""
        count = len(self)
        chosen = torch.linspace(0, count - 1, min(count, max_images)).round().long().unique()
        parts = []
        for start in range(0, chosen.numel(), batch_size):
            rows = self.rows[chosen[start : start + batch_size]].tolist()
            parts.append(self.pool.load([(row, False, None) for row in rows]))
        images = torch.cat(parts)
        if images.dtype != torch.uint8:
            raise TypeError("channel statistics need transforms that return uint8 images")
        return channel_stats(images)
