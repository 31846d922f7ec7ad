"""Batched image augmentation (random crop with padding and horizontal flip) and
normalisation (per-channel statistics, :func:`channel_stats`, and :func:`normalize`).

The whole batch is augmented with one gather instead of a Python loop over images, so
augmentation costs little next to the forward pass even on CPU. Random numbers come from a
CPU ``torch.Generator`` whatever the images' device, so a seeded run draws the same crops on
CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selmix._validation import check_choice, check_int

# Largest float64 temporary of channel_stats, in bytes.
_STATS_CHUNK_BYTES = 64 << 20


def random_crop_flip(
    images: Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    pad_mode: str = "reflect",
) -> Tensor:
    """Randomly crops each image from its padded version and flips half of them.

    Each image is padded by ``padding`` pixels on every side and an H x W window at a
    uniformly random offset in ``[0, 2 * padding]^2`` is cut out (torchvision's
    ``RandomCrop(size, padding)``); with ``flip`` the window is mirrored left-right with
    probability 1/2 (``RandomHorizontalFlip``).

    Args:
        images: Tensor[B, C, H, W] of any dtype (selmix passes float32 in [0, 255]).
        padding: pixels of padding on each side (0 disables cropping).
        flip: whether to flip horizontally with probability 1/2.
        generator: CPU random generator; None uses torch's global one.
        pad_mode: ``"reflect"``, ``"replicate"`` or ``"constant"`` (zeros). ``"reflect"``
            falls back to ``"replicate"`` when the image is not larger than ``padding``.

    Returns:
        Tensor[B, C, H, W] of the same dtype and device.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a Tensor[B, C, H, W], got {shape}")
    check_int("padding", padding, minimum=0)
    if pad_mode not in ("reflect", "replicate", "constant"):
        raise ValueError(
            f"`pad_mode` must be 'reflect', 'replicate' or 'constant', got {pad_mode!r}"
        )
    batch, _, height, width = images.shape
    if batch == 0 or (padding == 0 and not flip):
        return images
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    mirrored = torch.rand(batch, generator=generator) < 0.5 if flip else None
    if padding:
        if pad_mode == "reflect" and padding >= min(height, width):
            pad_mode = "replicate"
        padded = torch.nn.functional.pad(images, (padding,) * 4, mode=pad_mode)
    else:
        padded = images
    rows = offsets[0, :, None] + torch.arange(height)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(width)  # [B, W]
    if mirrored is not None:
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    rows, cols = rows.to(device), cols.to(device)
    # Gather the windows in two steps (rows, then columns) so no [B, C, H, W] index is built.
    out = torch.gather(
        padded, 2, rows[:, None, :, None].expand(-1, padded.shape[1], -1, padded.shape[3])
    )
    return torch.gather(out, 3, cols[:, None, None, :].expand(-1, out.shape[1], height, -1))


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

    Args:
        images: uint8 Tensor[N, C, H, W].
        chunk: images per step at most, bounding the float64 temporary memory (which is
            also kept under 64 MB per step whatever the image size).

    Returns:
        ``(mean, std)``, each float32 Tensor[C].
    """
    channels = images.shape[1]
    # Bound the float64 temporaries by bytes too: 4096 images of 256 x 256 x 3 would take
    # 6.4 GB each, several times the uint8 images themselves.
    per_image = max(images[0].numel() * 8, 1) if images.shape[0] else 1
    chunk = max(1, min(chunk, _STATS_CHUNK_BYTES // per_image))
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to("cpu", torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        squares += (part * part).sum(dim=(0, 2, 3))
    count = max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    # A constant channel would give std 0 and infinite normalised values.
    return mean.float(), std.clamp_min(1e-3).float()


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Maps uint8 images (or floats in [0, 255]) to ``(x / 255 - mean) / std``.

    Args:
        images: Tensor[B, C, H, W].
        mean: Tensor[C] in [0, 1] units.
        std: Tensor[C] in [0, 1] units.

    Returns:
        float32 Tensor[B, C, H, W].
    """
    scale = (1.0 / (255.0 * std)).to(images.device, torch.float32)
    shift = (mean / std).to(images.device, torch.float32)
    return images.float() * scale[:, None, None] - shift[:, None, None]


# --------------------------------------------------------------------------------------------
# Per-image transforms of decoded files (the streaming path, selmix.data.streaming)

#: Images whose shorter side is larger than this get the ImageNet transforms by default.
LARGE_IMAGE_SIDE = 64


#: The resize methods images can be decoded with (PIL's resampling filters); a pretrained
#: model's own (timm's ``interpolation``, a Hugging Face processor's ``resample``) is one of
#: them, most often ``bicubic``.
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def check_resize_method(interpolation: str) -> str:
    """``interpolation`` if it is one of :data:`RESIZE_METHODS`, else a ValueError naming it."""
    return check_choice("interpolation", interpolation, RESIZE_METHODS)


def resize_image(image: Any, size: tuple[int, int], interpolation: str = "bilinear") -> Any:
    """A PIL image resized to ``size`` = (H, W) with PIL's ``interpolation`` filter (PIL
    antialiases when it shrinks); returned as it is when it already has that size."""
    from PIL import Image

    if image.size == (size[1], size[0]):
        return image
    method = Image.Resampling[check_resize_method(interpolation).upper()]
    return image.resize((size[1], size[0]), method)


class PILToUint8:
    """PIL image -> uint8 Tensor[C, H, W], resized to ``size`` = (H, W) if given, with
    ``interpolation`` (one of :data:`RESIZE_METHODS`).

    The same decoding as the in-memory image-folder path, so both give the same pixels.
    """

    def __init__(
        self, size: tuple[int, int] | None = None, interpolation: str = "bilinear"
    ) -> None:
        self.size = size
        self.interpolation = check_resize_method(interpolation)

    def __call__(self, image: object) -> Tensor:
        if self.size is not None:
            image = resize_image(image, self.size, self.interpolation)
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"PILToUint8(size={self.size}, interpolation={self.interpolation!r})"


def imagenet_train_transform(
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> Callable[[object], Tensor]:
    """The standard ImageNet training transform: random-resized crop, horizontal flip.

    PIL image -> uint8 Tensor[C, size, size]. Its randomness comes from torch's global
    generator, which the streaming path seeds per image (see
    :func:`selmix.data.streaming.item_seed`).

    Args:
        size: side of the output.
        scale: range of the crop's area as a fraction of the image's.
        flip: mirror half of the images left-right.
    """
    from torchvision.transforms import v2

    check_int("size", size, minimum=1)
    steps: list[Callable] = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.PILToTensor())
    return v2.Compose(steps)


def imagenet_eval_transform(
    size: int = 224, resize: int | None = None
) -> Callable[[object], Tensor]:
    """The standard ImageNet evaluation transform: resize the shorter side, centre crop.

    PIL image -> uint8 Tensor[C, size, size].

    Args:
        size: side of the centre crop.
        resize: shorter side after resizing; default ``round(size / 0.875)`` (256 for 224).
    """
    from torchvision.transforms import v2

    check_int("size", size, minimum=1)
    resize = round(size / 0.875) if resize is None else check_int("resize", resize, minimum=1)
    if resize < size:
        raise ValueError(f"`resize` must be >= `size` ({size}), got {resize}")
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])
