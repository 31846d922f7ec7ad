"""Your own mixing operation under the SelMix policy: a saliency-guided CutMix.

SelMix decides *which classes* are mixed (the pairs (i, j) come from the gain matrix); how
two samples are mixed is a :class:`selmix.core.mixing.MixupOperation`, a callable
``(first, second, lam, generator) -> MixedBatch``. This example writes one in the spirit
of SaliencyMix (Uddin et al., 2020): the box cut from x2 is centred on x2's most salient
pixel instead of a random one, so the pasted patch holds the object of class j rather
than background. Saliency here is the simplest kind, the local contrast of the image
(how far each pixel is from the image's mean, smoothed); a model's gradients or a
spectral-residual map would slot in the same way.

Register it under a name and select it with ``mixup=NAME`` (or ``--set mixup=NAME`` from
the CLI, after importing the module that registers it)::

    python examples/saliency_mix.py          # about a minute on a laptop CPU
    python examples/saliency_mix.py --fast   # a few seconds

It trains a small CNN on the packaged long-tailed Fashion-MNIST subset with plain
cross-entropy, fine-tunes the whole model for min recall with the saliency mix, and prints
the validation metrics before and after.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import selmix
from selmix.core.mixing import MixedBatch, box_mask, register_mixup
from selmix.data import load_data


class SaliencyCutMix:
    """A box of x2 around its most salient pixel, pasted at the same place into x1.

    Args:
        labels: ``"first"``: label i only (SelMix's loss); ``"mixed"``: labels weighted by
            area (label j gets the box's share of the image).
    """

    def __init__(self, labels: str = "first") -> None:
        if labels not in ("first", "mixed"):
            raise ValueError(f"`labels` must be 'first' or 'mixed', got {labels!r}")
        self.labels = labels

    @staticmethod
    def saliency(images: torch.Tensor) -> torch.Tensor:
        """Tensor[B, H, W]: the distance of each pixel from its image's mean, smoothed by
        two 3 x 3 means (a tent filter: an isolated bright pixel stays the peak, also at
        the border, where the means count only the pixels inside)."""
        contrast = (images - images.mean(dim=(2, 3), keepdim=True)).abs().sum(1, keepdim=True)
        for _ in range(2):
            contrast = F.avg_pool2d(contrast, 3, stride=1, padding=1, count_include_pad=False)
        return contrast[:, 0]

    def __call__(
        self, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor, generator
    ) -> MixedBatch:
        batch, _, height, width = first.shape
        peak = self.saliency(second).flatten(1).argmax(1).cpu()
        centre = torch.stack([peak // width, peak % width], 1)
        # the box sides as in CutMix: sqrt(1 - lam) of the image's, clipped at the border
        cut = torch.sqrt((1 - lam.detach().float().cpu()).clamp(min=0))
        sides = torch.stack([(height * cut).floor(), (width * cut).floor()], 1).long()
        size = torch.tensor([height, width])
        start = (centre - sides // 2).clamp(min=0)
        end = (centre - sides // 2 + sides).clamp(max=size)
        boxes = torch.stack([start[:, 0], end[:, 0], start[:, 1], end[:, 1]], 1)
        mask = box_mask(boxes, height, width, first.device)
        mixed = torch.where(mask, second, first)
        if self.labels == "first":
            return MixedBatch(mixed)
        share = 1 - mask.flatten(1).float().mean(1)
        return MixedBatch(mixed, share)

    def __repr__(self) -> str:
        return f"SaliencyCutMix(labels={self.labels!r})"


def main(argv: Sequence[str] | None = None) -> selmix.FinetuneResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few seconds: smaller everything")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    register_mixup("saliency_cutmix", SaliencyCutMix(), replace=True)
    data = load_data("demo", max_per_class=300 if args.fast else None, imbalance=100.0)
    torch.manual_seed(args.seed)
    model = selmix.create_model("small_cnn", data.train.num_classes, in_channels=1)
    selmix.pretrain(model, data.train, epochs=2 if args.fast else 6, lr=0.05, seed=args.seed,
                    progress=False)  # fmt: skip
    before = selmix.evaluate(model, data.val).metrics()
    result = selmix.finetune(
        model, data.train, data.val, "min_recall", mixup="saliency_cutmix",
        frozen_backbone=False, head_first_steps=0, steps=20 if args.fast else 300,
        feedback_every=10 if args.fast else 25, batch_size=32 if args.fast else 128,
        seed=args.seed, progress=False,
    )  # fmt: skip
    after = result.metrics(data.val)
    print(f"mixup: {result.config.mixup} ({SaliencyCutMix()!r})")
    for name in ("mean_recall", "min_recall"):
        print(f"validation {name}: {before[name]:.3f} -> {after[name]:.3f}")
    return result


if __name__ == "__main__":
    main()
