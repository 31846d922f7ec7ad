"""Registry entries for timm and Hugging Face models (optional dependencies).

``create_model("timm:resnet18", num_classes=K)`` builds any timm architecture with random
weights; ``create_model("hf_vit", num_classes=K, hidden_size=..., ...)`` and
``create_model("hf_convnext", ...)`` build Hugging Face ``ViTForImageClassification`` and
``ConvNextForImageClassification`` from a config whose fields are the keyword arguments.
Built through the registry, such models carry their name and arguments, so
:func:`selmix.save_model` / :func:`selmix.load_model` round-trip them.

Nothing is downloaded: pre-trained weights belong in the user's own code (load them, then
use the model directly with :func:`selmix.finetune`, which splits it with
:func:`selmix.split_model`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from selmix.models._optional import TIMM_PREFIX, _require, create_timm_model
from selmix.models.registry import register_model

# TIMM_PREFIX and create_timm_model live in selmix.models._optional (below the registry,
# which builds timm names with it); they stay importable from here
__all__ = ["TIMM_PREFIX", "create_timm_model", "hf_convnext", "hf_vit"]


@register_model
def hf_vit(num_classes: int, in_channels: int = 3, **config: Any) -> nn.Module:
    """Hugging Face ``ViTForImageClassification(ViTConfig(**config))``, random weights.

    ``config`` holds ViTConfig fields, e.g. ``image_size=32, patch_size=4, hidden_size=64,
    num_hidden_layers=2, num_attention_heads=2, intermediate_size=128``.
    """
    transformers = _require("transformers", "transformers")
    settings = transformers.ViTConfig(num_labels=num_classes, num_channels=in_channels, **config)
    return transformers.ViTForImageClassification(settings)


@register_model
def hf_convnext(num_classes: int, in_channels: int = 3, **config: Any) -> nn.Module:
    """Hugging Face ``ConvNextForImageClassification(ConvNextConfig(**config))``, random weights.

    ``config`` holds ConvNextConfig fields, e.g. ``hidden_sizes=[16, 32], depths=[1, 1],
    num_stages=2``.
    """
    transformers = _require("transformers", "transformers")
    settings = transformers.ConvNextConfig(
        num_labels=num_classes, num_channels=in_channels, **config
    )
    return transformers.ConvNextForImageClassification(settings)
