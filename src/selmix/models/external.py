"""Registry entries for timm and Hugging Face models (optional dependencies).

``create_model("timm:resnet18", num_classes=K)`` builds any timm architecture with random
weights; ``create_model("hf_vit", num_classes=K, hidden_size=..., ...)`` and
``create_model("hf_convnext", ...)`` build Hugging Face ``ViTForImageClassification`` and
``ConvNextForImageClassification`` from a config whose fields are the keyword arguments;
``create_model("hf_auto", num_classes=K, config=config.to_dict())`` builds any Hugging Face
image classifier from its configuration (what a model read from ``hf:DIR`` records).
Built through the registry, such models carry their name and arguments, so
:func:`selmix.save_model` / :func:`selmix.load_model` round-trip them.

Nothing is downloaded: pre-trained weights belong in the user's own code (load them, then
use the model directly with :func:`selmix.finetune`, which splits it with
:func:`selmix.split_model`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from selmix.models._optional import (
    TIMM_PREFIX,
    _require,
    create_timm_model,
    create_torchvision_model,
)
from selmix.models.registry import register_model

# TIMM_PREFIX, create_timm_model and create_torchvision_model live in
# selmix.models._optional (below the registry, which builds timm: and torchvision: names
# with them); they stay importable from here
__all__ = [
    "TIMM_PREFIX", "create_timm_model", "create_torchvision_model", "hf_auto", "hf_convnext",
    "hf_vit",
]  # fmt: skip


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


@register_model
def hf_auto(
    num_classes: int, in_channels: int = 3, config: dict[str, Any] | None = None
) -> nn.Module:
    """A Hugging Face image classifier of any architecture from its configuration as a dict
    (``PretrainedConfig.to_dict()``, which names the ``model_type``), random weights.

    This is what selmix records for a model read from ``--checkpoint hf:DIR``, so that the
    ``model.pt`` of such a run rebuilds with :func:`selmix.load_model`.
    """
    transformers = _require("transformers", "transformers")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(
            "`config` must be a Hugging Face configuration dict with a 'model_type', got "
            f"{type(config).__name__}"
        )
    fields = dict(config)
    model_type = fields.pop("model_type")
    fields["num_labels"] = num_classes
    if "num_channels" in fields:
        fields["num_channels"] = in_channels
    settings = transformers.AutoConfig.for_model(model_type, **fields)
    return transformers.AutoModelForImageClassification.from_config(settings)
