"""``linear``: a linear classifier on fixed features (an embeddings file as data).

With ``--data features:FILE`` every sample already is a feature vector [d], so the model
is ``nn.Identity`` followed by ``nn.Linear(d, K)``: SelMix then mixes the stored features
directly and runs at frozen-backbone speed whatever produced them (a CLIP image encoder, a
text encoder, an audio model...).
"""

from __future__ import annotations

from torch import nn

from selmix.models.registry import register_model
from selmix.models.split import FeatureClassifier


class LinearClassifier(FeatureClassifier):
    """``head(x)`` on feature vectors: ``features`` is ``nn.Identity``.

    Args:
        num_classes: K.
        num_features: d, the length of each feature vector.
    """

    def __init__(self, num_classes: int, num_features: int) -> None:
        super().__init__(nn.Identity(), num_features=num_features, num_classes=num_classes)


@register_model
def linear(num_classes: int, in_channels: int = 3) -> LinearClassifier:
    """A linear head on d-dimensional features; ``in_channels`` is d.

    The registry passes the data's "channels" as ``in_channels``: for a features file that is
    the feature dimension (``selmix pretrain --model linear --data features:FILE`` sets it).
    """
    return LinearClassifier(num_classes, num_features=in_channels)
