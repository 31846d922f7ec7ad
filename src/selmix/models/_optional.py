"""Models from optional packages (timm, Hugging Face) and other libraries (torchvision):
importing them on demand with an error that names the extra to install, and building
timm and torchvision architectures.

The lowest layer of :mod:`selmix.models`: :mod:`selmix.models.registry` builds ``timm:``
and ``torchvision:`` names with :func:`create_timm_model` and
:func:`create_torchvision_model`, and :mod:`selmix.models.external` registers the Hugging
Face architectures; neither is imported here.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

TIMM_PREFIX = "timm:"


def _require(package: str, extra: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(
            f"this model needs the optional package {package!r}: pip install 'selmix[{extra}]' "
            f"(or pip install {package})"
        ) from None


def create_timm_model(
    name: str, num_classes: int, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, num_classes=K, in_chans=C, pretrained=False, **kwargs)``.

    Raises:
        ImportError: if timm is not installed (naming the extra to install).
        ValueError: if timm has no such architecture.
    """
    timm = _require("timm", "timm")
    if "pretrained" in kwargs:
        raise ValueError(
            "`pretrained` must not be passed: the registry builds random weights (load "
            "pre-trained weights in your own code and pass the model to selmix.finetune)"
        )
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"unknown timm model {name!r}: {error}") from None
        raise


def create_torchvision_model(
    name: str, num_classes: int, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=K, **kwargs)``.

    Raises:
        ValueError: if torchvision has no such classifier, or ``in_channels`` is not 3
            (torchvision's classifiers take RGB images).
    """
    import torchvision

    if in_channels != 3:
        raise ValueError(
            f"torchvision model {name!r} takes 3-channel images, got `in_channels` {in_channels}"
        )
    if "weights" in kwargs:
        raise ValueError(
            "`weights` must not be passed: the registry builds random weights (load your "
            "weights with --checkpoint, or in your own code)"
        )
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(
            f"unknown torchvision model {name!r}; expected a torchvision.models classifier "
            "such as 'resnet18', 'mobilenet_v3_small' or 'vit_b_16'"
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
