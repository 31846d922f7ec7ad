"""A small, fast CNN for 28x28 grey and 32x32 colour images (demos, tests, CPU runs).

Three conv3x3-BN-ReLU blocks with 32, 64 and 128 channels; the first is followed by 2x2
max pooling and the other two use stride 2, then global average pooling gives a 128-d
feature. Downsampling early keeps the cost near 2.5 M multiply-adds per 28x28 image, so it
trains on Fashion-MNIST at a few thousand images per second on two CPU cores.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from selmix._validation import check_int
from selmix.models.registry import register_model
from selmix.models.split import FeatureClassifier


def _block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(FeatureClassifier):
    """Three-block CNN with a ``width``-scaled 32/64/128-channel layout.

    Args:
        num_classes: K.
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR).
        width: channel multiplier; features have ``128 * width`` dimensions.

    Shapes:
        input [N, in_channels, H, W] (H, W >= 8) -> features [N, 128 * width]
        -> logits [N, K].
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 1) -> None:
        check_int("in_channels", in_channels, minimum=1)
        check_int("width", width, minimum=1)
        c1, c2, c3 = 32 * width, 64 * width, 128 * width
        features = nn.Sequential(
            OrderedDict(
                block1=_block(in_channels, c1, stride=1),
                pool1=nn.MaxPool2d(2),
                block2=_block(c1, c2, stride=2),
                block3=_block(c2, c3, stride=2),
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(1),
            )
        )
        super().__init__(features, num_features=c3, num_classes=num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


@register_model
def small_cnn(num_classes: int, in_channels: int = 3, width: int = 1) -> SmallCNN:
    """A 3-block CNN (32/64/128 channels, 128-d features) that is fast on CPU."""
    return SmallCNN(num_classes, in_channels=in_channels, width=width)
