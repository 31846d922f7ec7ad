"""Models: a registry of built-in backbones and the features/head split SelMix needs.

Built-in models (``list_models()``): ``resnet32`` (CIFAR ResNet-32, 64-d features),
``wrn28_2`` (FixMatch's WideResNet-28-2, 128-d) and ``small_cnn`` (a fast 3-block CNN,
128-d). Each has ``.features`` (images -> [N, d]), ``.head`` (``nn.Linear(d, K)``) and
``.num_features``; :func:`split_model` also splits torchvision, timm-style and
``nn.Sequential`` classifiers, and Hugging Face image classifiers. ``linear`` is a linear
head on fixed features (for ``--data features:FILE``); ``timm:<name>``,
``torchvision:<name>``, ``hf_vit``, ``hf_convnext`` and ``hf_auto`` (any Hugging Face
classifier from its configuration dict) build timm, torchvision and Hugging Face models.
:mod:`selmix.models.loading` reads starting models from other libraries' files.
"""

from selmix.models import external as _external  # noqa: F401 - registers hf_vit, hf_convnext, hf_auto
from selmix.models.linear import LinearClassifier, linear
from selmix.models.registry import create_model, list_models, register_model
from selmix.models.resnet_cifar import ResNetCifar, resnet32
from selmix.models.small_cnn import SmallCNN, small_cnn
from selmix.models.split import (
    FeatureClassifier,
    ModelSplit,
    headless_view,
    output_tensor,
    split_model,
)
from selmix.models.wide_resnet import WideResNet, wrn28_2

__all__ = [
    "FeatureClassifier",
    "LinearClassifier",
    "ModelSplit",
    "ResNetCifar",
    "SmallCNN",
    "WideResNet",
    "create_model",
    "headless_view",
    "output_tensor",
    "linear",
    "list_models",
    "register_model",
    "resnet32",
    "small_cnn",
    "split_model",
    "wrn28_2",
]
