"""The preprocessing a starting model carries: its input size and normalisation.

A pretrained model was trained on inputs of one size, normalised with one mean and std;
fine-tuning it on inputs normalised otherwise starts it off-distribution. This module reads
what a model's files record about it, without building the model:

* timm: the ``pretrained_cfg`` of the ``config.json`` that timm writes beside the weights
  (``timm.models.save_for_hf``, the Hugging Face Hub layout);
* Hugging Face: the image processor saved beside the weights (``preprocessor_config.json``);
* torchvision: the transforms of the weights enum member whose download file the
  checkpoint is (``resnet18-f37072fd.pth`` is ``ResNet18_Weights.IMAGENET1K_V1``);
* selmix: what ``selmix finetune`` recorded in ``model.pt`` when it used a model's own.

:func:`resolve_preprocessing` chooses between the model's and the data's own statistics.
Images are resized whole to the model's input size with the model's own interpolation
(bicubic for most timm models; bilinear when it records none, or one PIL does not have);
its evaluation crop fraction is recorded but not applied (every split is decoded once, so
a centre crop would also cut the training images; the console line says so).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selmix._validation import height_width
from selmix.data.augment import RESIZE_METHODS
from selmix.models.checkpoint import load_checkpoint

__all__ = [
    "PREPROCESSING_CHOICES",
    "Preprocessing",
    "hf_preprocessing",
    "model_preprocessing",
    "resolve_preprocessing",
    "timm_preprocessing",
    "torchvision_preprocessing",
]

#: ``auto``: the model's when its files record it, else the data's; ``model``: the model's
#: (also timm's and torchvision's defaults for a bare ``timm:NAME``/``torchvision:NAME``
#: state dict), refused when there is none; ``data``: the data's statistics.
PREPROCESSING_CHOICES = ("auto", "model", "data")

_HF_PREFIX = "hf:"

# PIL's resampling codes, as Hugging Face image processors record them
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Preprocessing:
    """How a model's inputs are prepared.

    Attributes:
        source: where it comes from, e.g. ``"timm pretrained_cfg (DIR/config.json)"`` or
            ``"data statistics"``.
        mean, std: per-channel normalisation in [0, 1] units; None: the data's statistics.
        image_size: ``(H, W)`` every image is resized to; None: the images' own size.
        interpolation: the model's resize interpolation (applied when it is one of
            :data:`selmix.data.augment.RESIZE_METHODS`: :attr:`resize`).
        crop_pct: the model's evaluation crop fraction (recorded, not applied).
        model_image_size: the model's own input size, when ``image_size`` differs from it
            (``--image-size``, or data that cannot be resized).
    """

    source: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    image_size: tuple[int, int] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    model_image_size: tuple[int, int] | None = None

    @property
    def from_model(self) -> bool:
        """Whether the normalisation is the model's (not the data's statistics)."""
        return self.mean is not None

    @property
    def resize(self) -> str:
        """How the images are resized: ``"none"`` without :attr:`image_size`, else the
        model's interpolation when the run uses the model's preprocessing and PIL has that
        method, else ``"bilinear"``."""
        if self.image_size is None:
            return "none"
        if self.from_model and self.interpolation in RESIZE_METHODS:
            return str(self.interpolation)
        return "bilinear"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``config.yaml`` and ``model.pt``'s meta."""
        return {
            "source": self.source,
            "mean": list(self.mean) if self.mean is not None else "data statistics",
            "std": list(self.std) if self.std is not None else "data statistics",
            "image_size": list(self.image_size) if self.image_size is not None else "native",
            "resize": self.resize,
            "model_interpolation": self.interpolation,
            "model_crop_pct": self.crop_pct,
            "model_image_size": (
                list(self.model_image_size) if self.model_image_size is not None else None
            ),
        }

    def describe(self) -> str:
        """One console line saying which preprocessing a run uses."""

        def numbers(values: tuple[float, ...]) -> str:
            return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

        size = (
            f"images resized to {self.image_size[0]}x{self.image_size[1]} ({self.resize})"
            if self.image_size is not None
            else "images at their own size"
        )
        if self.model_image_size is not None and self.model_image_size != self.image_size:
            height, width = self.model_image_size
            size += f" (the model's input size is {height}x{width})"
        if self.mean is None or self.std is None:
            return f"preprocessing: {self.source}: the data's mean and std, {size}"
        return (
            f"preprocessing: {self.source}: mean {numbers(self.mean)}, std "
            f"{numbers(self.std)}, {size}{self._not_applied()}"
        )

    def _not_applied(self) -> str:
        """What the model records that the run does not apply, for :meth:`describe`."""
        parts = []
        if self.interpolation is not None and self.interpolation != self.resize:
            parts.append(f"its {self.interpolation} resize")
        if self.crop_pct is not None and self.crop_pct != 1.0:
            parts.append(f"its centre crop {self.crop_pct:.4g}")
        return f"; not applied: {' and '.join(parts)} (recorded)" if parts else ""


def _floats(name: str, values: Any, where: str) -> tuple[float, ...]:
    """A per-channel list of finite numbers read from a model's file."""

    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or not values
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        or not all(math.isfinite(v) for v in values)
    ):
        raise ValueError(f"{where}: `{name}` must be a list of finite numbers, got {values!r}")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"{where}: `std` must be > 0 in every channel, got {list(values)!r}")
    return tuple(float(v) for v in values)


def _size(value: Any, where: str) -> tuple[int, int]:
    """``(H, W)`` from an int side or an ``(H, W)`` pair read from a model's file."""
    size = height_width(value)
    if size is not None:
        return size
    raise ValueError(f"{where}: the input size must be an int or (H, W), got {value!r}")


def timm_preprocessing(cfg: dict[str, Any], where: str) -> Preprocessing:
    """The preprocessing of a timm ``pretrained_cfg`` (``mean``, ``std``, ``input_size``
    ``(C, H, W)``, ``interpolation``, ``crop_pct``).

    Args:
        cfg: the pretrained config (``model.pretrained_cfg`` or ``config.json``'s).
        where: where it was read, for ``source`` and messages.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: `pretrained_cfg` must be a mapping, got {type(cfg).__name__}")
    for key in ("mean", "std"):
        if key not in cfg:
            raise ValueError(f"{where}: `pretrained_cfg` has no {key!r}")
    size = None
    if cfg.get("input_size") is not None:
        input_size = cfg["input_size"]
        if not isinstance(input_size, Sequence) or len(input_size) != 3:
            raise ValueError(f"{where}: `input_size` must be (C, H, W), got {input_size!r}")
        size = _size(list(input_size[1:]), where)
    crop = cfg.get("crop_pct")
    return Preprocessing(
        source=f"timm pretrained_cfg ({where})",
        mean=_floats("mean", cfg["mean"], where),
        std=_floats("std", cfg["std"], where),
        image_size=size,
        interpolation=str(cfg["interpolation"]) if cfg.get("interpolation") else None,
        crop_pct=float(crop) if isinstance(crop, (int, float)) else None,
    )


def hf_preprocessing(directory: str | os.PathLike) -> Preprocessing | None:
    """The preprocessing of the Hugging Face image processor saved in ``directory``
    (``preprocessor_config.json``: ``image_mean``, ``image_std``, ``size``, ``resample``,
    ``crop_size``), or None when the folder has none. Read as JSON: no transformers needed.
    """
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return None
    where = str(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{where} is not readable JSON: {error}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(saved).__name__}")
    if saved.get("do_normalize", True) is False:
        mean: tuple[float, ...] = (0.0,)
        std: tuple[float, ...] = (1.0,)
    else:
        if "image_mean" not in saved or "image_std" not in saved:
            return None
        mean = _floats("image_mean", saved["image_mean"], where)
        std = _floats("std", saved["image_std"], where)
    size = None
    # the crop, when there is one, is what the model sees
    shape = saved.get("crop_size") if saved.get("do_center_crop") else None
    shape = shape if shape is not None else saved.get("size")
    if saved.get("do_resize", True) is not False and shape is not None:
        if isinstance(shape, dict) and "height" in shape and "width" in shape:
            size = _size([shape["height"], shape["width"]], where)
        elif isinstance(shape, dict) and "shortest_edge" in shape:
            size = _size(shape["shortest_edge"], where)
        elif not isinstance(shape, dict):
            size = _size(shape, where)
    resample = saved.get("resample")
    crop = saved.get("crop_pct")
    return Preprocessing(
        source=f"Hugging Face image processor ({where})",
        mean=mean, std=std, image_size=size,
        interpolation=_PIL_RESAMPLE.get(resample) if isinstance(resample, int) else None,
        crop_pct=_hf_crop(saved, crop),
    )  # fmt: skip


def _hf_crop(saved: dict[str, Any], crop_pct: Any) -> float | None:
    """The crop fraction of a Hugging Face processor: its ``crop_pct`` (ConvNeXt), or
    ``crop_size / size`` of a resize-then-centre-crop processor (CLIP), or None."""
    if isinstance(crop_pct, (int, float)) and not isinstance(crop_pct, bool):
        return float(crop_pct)
    size, crop = saved.get("size"), saved.get("crop_size")
    if not saved.get("do_center_crop") or not isinstance(size, dict) or not isinstance(crop, dict):
        return None
    side = size.get("shortest_edge", size.get("height"))
    if isinstance(side, int) and isinstance(crop.get("height"), int) and side > 0:
        return crop["height"] / side
    return None


def torchvision_preprocessing(
    name: str, path: str | os.PathLike | None = None
) -> Preprocessing | None:
    """The transforms of torchvision's weights for the architecture ``name``.

    With ``path``, the weights enum member whose download file has ``path``'s name (torch
    hub keeps a download under that name), or None when none has; without it, the
    architecture's ``DEFAULT`` weights, or None when it has none.
    """
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)
    except ValueError:
        return None
    if path is None:
        member = weights.DEFAULT
    else:
        found = [w for w in weights if Path(w.url).name == Path(path).name]
        if not found:
            return None
        member = found[0]
    transforms = member.transforms()
    crop = [int(v) for v in transforms.crop_size]
    resize = [int(v) for v in transforms.resize_size]
    return Preprocessing(
        source=f"torchvision {type(member).__name__}.{member.name}",
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        image_size=_size(crop[0] if len(crop) == 1 else crop, name),
        interpolation=str(transforms.interpolation.value),
        crop_pct=crop[0] / resize[0] if len(crop) == 1 and len(resize) == 1 else None,
    )


def _timm_config_beside(path: Path) -> Preprocessing | None:
    """The ``pretrained_cfg`` of a timm ``config.json`` beside the weights file, or None."""
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{config} is not readable JSON: {error}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("pretrained_cfg"), dict):
        return None
    return timm_preprocessing(saved["pretrained_cfg"], str(config))


def _selmix_meta(path: Path) -> Preprocessing | None:
    """The model's preprocessing a selmix model file recorded (``selmix finetune`` writes
    it into ``model.pt``'s meta), or None: files without it were normalised with the data's
    statistics."""

    if not path.is_file() or path.suffix in (".safetensors",):
        return None
    state = load_checkpoint(path)
    meta = state.get("meta") if isinstance(state, dict) else None
    saved = meta.get("preprocessing") if isinstance(meta, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("mean"), list):
        return None
    where = str(path)
    size = saved.get("image_size")
    return Preprocessing(
        source=f"selmix model file ({where}), first from {saved.get('source')}",
        mean=_floats("mean", saved["mean"], where),
        std=_floats("std", saved["std"], where),
        image_size=_size(size, where) if isinstance(size, list) else None,
        interpolation=saved.get("model_interpolation"),
        crop_pct=saved.get("model_crop_pct"),
    )


def _timm_default(name: str) -> Preprocessing | None:
    """timm's default pretrained config for the architecture ``name``, or None."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return None
    if cfg is None:
        return None
    return timm_preprocessing(cfg.to_dict(), f"timm default for {name!r}")


def model_preprocessing(
    checkpoint: str | os.PathLike, model: str | None = None, *, defaults: bool = False
) -> Preprocessing | None:
    """The preprocessing a starting model's files record (module docstring), or None.

    Args:
        checkpoint: the weights file, or ``hf:DIR``.
        model: the architecture of a state dict (``timm:NAME``, ``torchvision:NAME``...).
        defaults: for a ``timm:NAME`` or ``torchvision:NAME`` file that records nothing,
            the library's default preprocessing for that architecture.
    """
    text = str(checkpoint)
    if text.startswith(_HF_PREFIX):
        return hf_preprocessing(text[len(_HF_PREFIX) :])
    if model is None:
        return _selmix_meta(Path(text))
    path = Path(text)
    if model.startswith("timm:"):
        found = _timm_config_beside(path)
        if found is None and defaults:
            found = _timm_default(model[len("timm:") :])
        return found
    if model.startswith("torchvision:"):
        name = model[len("torchvision:") :]
        found = torchvision_preprocessing(name, path)
        if found is None and defaults:
            found = torchvision_preprocessing(name)
        return found
    return None


def resolve_preprocessing(
    choice: str,
    checkpoint: str | os.PathLike,
    model: str | None = None,
    image_size: int | Sequence[int] | None = None,
    *,
    resizable: bool = True,
) -> Preprocessing:
    """The preprocessing of a fine-tuning run.

    Args:
        choice: one of :data:`PREPROCESSING_CHOICES`.
        checkpoint: the starting model's file, or ``hf:DIR``.
        model: its architecture name, for a state dict.
        image_size: a size that replaces the model's input size (an int side or
            ``(H, W)``); None: the model's, or the images' own.
        resizable: whether the data source can resize its images (image folders can);
            when not, the model's input size is recorded but the images keep their own.

    Raises:
        ValueError: an unknown ``choice``; ``model`` when the model records none.
    """
    if choice not in PREPROCESSING_CHOICES:
        raise ValueError(
            f"`preprocessing` must be one of {', '.join(PREPROCESSING_CHOICES)}, got {choice!r}"
        )
    size = None
    if image_size is not None:
        try:
            size = _size(list(image_size) if isinstance(image_size, tuple) else image_size, "")
        except ValueError:
            raise ValueError(
                f"`image_size` must be an int >= 1 or [H, W], got {image_size!r}"
            ) from None
    own = None
    if choice != "data":
        own = model_preprocessing(checkpoint, model, defaults=choice == "model")
    if own is None:
        if choice == "model":
            raise ValueError(
                f"`preprocessing` is 'model' but `checkpoint` {str(checkpoint)!r} records no "
                "preprocessing (a timm config.json with pretrained_cfg, a Hugging Face "
                "preprocessor_config.json, or torchvision weights); use 'auto' or 'data'"
            )
        return Preprocessing("data statistics", image_size=size)
    if size is not None:
        return dataclasses.replace(own, image_size=size, model_image_size=own.image_size)
    if not resizable and own.image_size is not None:
        return dataclasses.replace(own, image_size=None, model_image_size=own.image_size)
    return dataclasses.replace(own, model_image_size=own.image_size)
