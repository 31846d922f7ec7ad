"""Batched image augmentation: random crop with padding and horizontal flip.

The whole batch is augmented with one gather instead of a Python loop over images, so
augmentation costs little next to the forward pass even on CPU. Random numbers come from a
CPU ``torch.Generator`` whatever the images' device, so a seeded run draws the same crops on
CPU and GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selmix._validation import check_int


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
