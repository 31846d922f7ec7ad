"""Build a features file (embeddings as data) from a model you have, for ``--data features:``.

SelMix only needs feature vectors and a linear head. If your backbone stays frozen, compute
its features once, save them with this script's :func:`save_features_file`, and fine-tune
the head with ``selmix finetune --data features:FILE`` at frozen-backbone speed, whatever
the modality (CLIP image embeddings, a text encoder, an audio model...).

The file format (``.npz``; a ``.pt`` dict with the same keys works too):

    train_features  float32 [N_train, d]     train_labels  int64 [N_train]
    val_features    float32 [N_val, d]       val_labels    int64 [N_val]     (optional)
    test_features   float32 [N_test, d]      test_labels   int64 [N_test]
    classes         str [K]                                                  (optional)

With your own encoder, in Python::

    from make_features_file import save_features_file

    def encode(batch):                      # your model, frozen: inputs -> [B, d]
        return clip_model.encode_image(batch)

    save_features_file("clip.npz", encode, {"train": train_set, "val": val_set,
                                            "test": test_set}, classes=names)

Here ``train_set`` etc. are selmix data sets or any map-style ``(x, y)`` data sets whose
``x`` are tensors. Then::

    python -m selmix pretrain --data features:clip.npz --model linear --out head/ --epochs 10
    python -m selmix finetune --data features:clip.npz --checkpoint head/model.pt --out run/

As a script, it takes a selmix model file (``selmix pretrain`` output, or any model that
:func:`selmix.load_model` rebuilds, such as ``timm:NAME`` or ``hf_vit``) and a data spec,
and also writes the model's own head as a ``linear`` model file (``--head-out``), so that
fine-tuning starts exactly where the model is::

    python examples/make_features_file.py \\
        --checkpoint benchmarks/models/fmnist_lt_small_cnn_ce_s0/model.pt \\
        --data fashion-mnist:../shared/data/fashion-mnist --imbalance 100 --max-per-class 5000 \\
        --val-per-class 500 --seed 0 --out fmnist_s0.npz --head-out fmnist_s0_head.pt
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import selmix
from selmix.data import as_tensor_dataset, load_data


@torch.no_grad()
def save_features_file(
    path: str | Path,
    encode: Callable[[torch.Tensor], torch.Tensor],
    datasets: Mapping[str, Any],
    classes: Sequence[str] | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> Path:
    """Encodes each data set once and writes the features file.

    Args:
        path: the ``.npz`` file to write.
        encode: maps a batch of inputs [B, ...] (on ``device``) to features [B, d]; run in
            no-grad mode, so put your model in ``eval()`` first.
        datasets: ``{"train": ..., "test": ...}`` and optionally ``"val"``.
        classes: the K class names, stored as ``classes``.
        batch_size: inputs per ``encode`` call.
        device: where the batches go.

    Returns:
        The path written.
    """
    unknown = set(datasets) - {"train", "val", "test"}
    if unknown or not {"train", "test"} <= set(datasets):
        raise ValueError(
            f"`datasets` must have train, test and optionally val, got {sorted(datasets)}"
        )
    arrays: dict[str, np.ndarray] = {}
    for split, dataset in datasets.items():
        dataset = dataset if hasattr(dataset, "batch") else as_tensor_dataset(dataset)
        labels = torch.as_tensor(dataset.labels).long()
        chunks = []
        for start in range(0, labels.numel(), batch_size):
            index = torch.arange(start, min(start + batch_size, labels.numel()))
            inputs, _ = dataset.batch(index, device=device)
            chunks.append(selmix.models.output_tensor(encode(inputs)).float().cpu())
        arrays[f"{split}_features"] = torch.cat(chunks).numpy()
        arrays[f"{split}_labels"] = labels.numpy()
    if classes is not None:
        arrays["classes"] = np.asarray([str(c) for c in classes])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:  # a file object: numpy would otherwise append .npz
        np.savez(file, **arrays)
    return path


def save_head_as_linear_model(
    path: str | Path, head: torch.nn.Linear, meta: dict[str, Any]
) -> Path:
    """Writes ``head`` as a ``linear`` registry model, loadable by ``selmix finetune``."""
    model = selmix.create_model("linear", head.out_features, in_channels=head.in_features)
    model.head.load_state_dict(head.state_dict())
    return selmix.save_model(path, model, meta)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="selmix model file")
    parser.add_argument("--data", required=True, help="data spec, e.g. fashion-mnist:DIR")
    parser.add_argument("--imbalance", type=float, default=None)
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--val-per-class", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split")
    parser.add_argument("--out", required=True, help="the features file (.npz)")
    parser.add_argument("--head-out", default=None, help="also write the head as a linear model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    model, meta = selmix.load_model(args.checkpoint, args.device)
    model.eval()
    splits = load_data(
        args.data, imbalance=args.imbalance, max_per_class=args.max_per_class,
        val_per_class=args.val_per_class, seed=args.seed,
    )  # fmt: skip
    features, head = selmix.split_model(model)
    datasets = {"train": splits.train, "val": splits.val, "test": splits.test}
    path = save_features_file(args.out, features, datasets, splits.classes, device=args.device)
    print(f"wrote {path} ({', '.join(f'{k}: {len(v)}' for k, v in datasets.items())})")
    if args.head_out:
        head_meta = {"classes": list(splits.classes), "source_checkpoint": str(args.checkpoint)}
        print(f"wrote {save_head_as_linear_model(args.head_out, head, head_meta)}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
