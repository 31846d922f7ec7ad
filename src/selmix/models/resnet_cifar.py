"""The CIFAR ResNets of He et al. (2016, section 4.2): ResNet-32 and its siblings.

Three stages of n basic blocks with 16, 32 and 64 channels on 32x32 inputs (depth 6n + 2;
n = 5 gives ResNet-32), global average pooling and a 64-d feature. This is the backbone of
the supervised CIFAR-LT experiments in SelMix (and in LDAM, MiSLAS, ...).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from selmix._validation import check_choice, check_int
from selmix.models.registry import register_model
from selmix.models.split import FeatureClassifier


class _ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        front = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra - front))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity, zero-pad (A) or 1x1-conv (B) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(FeatureClassifier):
    """CIFAR ResNet of depth 6n + 2 (ResNet-20, -32, -44, -56, -110).

    Args:
        num_classes: K.
        depth: 6n + 2; 32 for ResNet-32.
        in_channels: image channels.
        shortcut: ``"A"`` (parameter-free zero padding, as in the paper's CIFAR models) or
            ``"B"`` (1x1 convolution + BN) where the shape changes.

    Shapes:
        input [N, in_channels, H, W] (32x32 for CIFAR) -> features [N, 64] -> logits [N, K].
    """

    def __init__(
        self, num_classes: int, depth: int = 32, in_channels: int = 3, shortcut: str = "A"
    ) -> None:
        check_int("depth", depth, minimum=8)
        if (depth - 2) % 6:
            raise ValueError(f"`depth` must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        check_int("in_channels", in_channels, minimum=1)
        check_choice("shortcut", shortcut, ("A", "B"))
        blocks = (depth - 2) // 6
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(16),
            relu=nn.ReLU(inplace=True),
        )
        in_planes = 16
        for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            stage_blocks = []
            for b in range(blocks):
                stage_blocks.append(
                    BasicBlock(in_planes, planes, stride if b == 0 else 1, shortcut)
                )
                in_planes = planes
            layers[f"layer{stage}"] = nn.Sequential(*stage_blocks)
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        super().__init__(nn.Sequential(layers), num_features=64, num_classes=num_classes)
        self.depth = depth
        self._init_conv_and_norm("relu")


@register_model
def resnet32(num_classes: int, in_channels: int = 3, shortcut: str = "A") -> ResNetCifar:
    """ResNet-32 for 32x32 images: 3 stages of 5 basic blocks, 64-d features."""
    return ResNetCifar(num_classes, depth=32, in_channels=in_channels, shortcut=shortcut)
