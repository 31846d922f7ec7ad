"""WideResNet-28-2 as used by FixMatch, the backbone of SelMix's semi-supervised results.

Pre-activation wide residual network (Zagoruyko & Komodakis, 2016) with FixMatch's choices:
leaky ReLU (slope 0.1), batch norm with momentum 0.001 (TensorFlow decay 0.999), the first
group activating before its shortcut, a final BN + leaky ReLU, global average pooling and a
64 * width feature (128-d for WRN-28-2).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from selmix._validation import check_in_range, check_int
from selmix.models.registry import register_model
from selmix.models.split import FeatureClassifier

_BN_MOMENTUM = 0.001
_LEAKY_SLOPE = 0.1


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=_BN_MOMENTUM)


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-act-conv3x3-BN-act-(dropout)-conv3x3 plus shortcut.

    The residual branch always sees the activated input. The shortcut sees the activated
    input only with ``activate_before_residual`` (FixMatch's first group) and the raw input
    otherwise; a 1x1 convolution adapts it where the shape changes.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        drop_rate: float = 0.0,
        activate_before_residual: bool = False,
    ) -> None:
        super().__init__()
        self.bn1 = _bn(in_planes)
        self.act1 = nn.LeakyReLU(_LEAKY_SLOPE, inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.act2 = nn.LeakyReLU(_LEAKY_SLOPE, inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.activate_before_residual = activate_before_residual
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and in_planes == planes
            else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.act1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + self.shortcut(activated if self.activate_before_residual else x)


class WideResNet(FeatureClassifier):
    """WideResNet-depth-width with FixMatch's details.

    Args:
        num_classes: K.
        depth: 6n + 4; 28 for WRN-28-2.
        width: widening factor k; channels per group are 16k, 32k, 64k.
        in_channels: image channels.
        drop_rate: dropout inside the blocks (0 in FixMatch).

    Shapes:
        input [N, in_channels, H, W] (32x32 for CIFAR) -> features [N, 64 * width]
        -> logits [N, K].
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        width: int = 2,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        check_int("depth", depth, minimum=10)
        if (depth - 4) % 6:
            raise ValueError(f"`depth` must be 6n + 4 (16, 22, 28, 40, ...), got {depth}")
        check_int("width", width, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        check_in_range("drop_rate", drop_rate, 0.0, 1.0)
        blocks = (depth - 4) // 6
        channels = (16, 16 * width, 32 * width, 64 * width)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        )
        for group, stride in enumerate((1, 2, 2), start=1):
            group_blocks = [
                WideBasicBlock(
                    channels[group - 1] if b == 0 else channels[group],
                    channels[group],
                    stride if b == 0 else 1,
                    drop_rate,
                    activate_before_residual=group == 1 and b == 0,
                )
                for b in range(blocks)
            ]
            layers[f"block{group}"] = nn.Sequential(*group_blocks)
        layers["bn"] = _bn(channels[3])
        layers["act"] = nn.LeakyReLU(_LEAKY_SLOPE, inplace=True)
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        super().__init__(nn.Sequential(layers), num_features=channels[3], num_classes=num_classes)
        self.depth = depth
        self.width = width
        self._init_conv_and_norm("leaky_relu")
        nn.init.xavier_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)


@register_model
def wrn28_2(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WideResNet-28-2 (FixMatch's CIFAR-10 backbone): 1.5M parameters, 128-d features."""
    return WideResNet(num_classes, depth=28, width=2, in_channels=in_channels, drop_rate=drop_rate)
