"""SelMix inside a plain PyTorch training loop that you own.

Everything here is ordinary PyTorch: your model, your optimiser, your loop. SelMix adds two
calls (:class:`selmix.engine.feedback.SelMixFeedback`):

* ``feedback.update(model, val)`` every ``feedback_every`` steps: evaluates the validation
  set, updates the objective's multipliers, the gain matrix and the mixup policy P;
* ``feedback.sample_pairs(B)`` every step: which training samples to mix (x1 of class i,
  x2 of class j, (i, j) ~ P), their label i and the mixing weights lam.

The loss mixes *features*, not images: ``CE(head(lam g(x1) + (1 - lam) g(x2)), i)``, with
``features, head = selmix.split_model(model)``. Batch norm stays in eval mode (running
statistics), as in :func:`selmix.finetune`.

Run it (about a minute on a laptop CPU; ``--fast`` for a few seconds)::

    python examples/own_loop.py
    python examples/own_loop.py --fast

It first trains a small CNN on the packaged long-tailed Fashion-MNIST subset with plain
cross-entropy (your existing model), then fine-tunes it for mean recall with SelMix pairs
and prints the validation objective and metrics before and after. ``--objective
min_recall`` works too, but from a start where some class has 0% validation recall it moves
slowly: that class's gain is 0 (see docs/guide/known_limits.md); the loop already adds a
pseudo-count of 1 to the confusion counts, which lets the gain see it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

import selmix
from selmix.data import load_data
from selmix.engine.feedback import SelMixFeedback


def train_plain(model: torch.nn.Module, train: Any, epochs: int, seed: int) -> None:
    """Your existing training: plain cross-entropy, so the tail classes end up weak."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train.labels), generator=generator)
        for start in range(0, order.numel(), 128):
            images, labels = train.batch(order[start : start + 128], augment=False)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def selmix_loop(
    model: torch.nn.Module,
    train: Any,
    val: Any,
    steps: int,
    objective: str = "mean_recall",
    batch_size: int = 64,
    lr: float = 1e-3,
    feedback_every: int = 10,
    train_backbone: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Fine-tunes ``model`` with SelMix pairs in a plain loop; returns the feedback records."""
    features, head = selmix.split_model(model)
    params = {"rate": 50.0} if objective == "min_recall" else None
    feedback = SelMixFeedback(
        objective, train.labels, objective_params=params, confusion_smoothing=1.0, seed=seed
    )
    # your optimiser: the head alone (frozen backbone) or everything at a lower rate
    groups = [{"params": head.parameters(), "lr": lr}]
    if train_backbone:
        head_ids = {id(p) for p in head.parameters()}
        body = [p for p in features.parameters() if id(p) not in head_ids]
        groups.append({"params": body, "lr": lr / 10})
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)  # your augmentation's randomness
    for step in range(steps):
        if step % feedback_every == 0:
            feedback.update(model, val, step=step)
        pairs = feedback.sample_pairs(batch_size)
        model.eval()  # batch norm frozen; dropout off
        first, _ = train.batch(pairs.first, augment=True, generator=generator)
        second, _ = train.batch(pairs.second, augment=True, generator=generator)
        lam = pairs.lam[:, None]
        with torch.set_grad_enabled(train_backbone):
            first_features, second_features = features(first), features(second)
        logits = head(lam * first_features + (1 - lam) * second_features)
        loss = F.cross_entropy(logits, pairs.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    feedback.update(model, val, step=steps)
    return feedback.history


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few seconds: smaller everything")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--objective", default="mean_recall", help="see selmix.list_objectives()")
    parser.add_argument("--train-backbone", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    data = load_data("demo", **({"max_per_class": 300, "imbalance": 100.0} if args.fast else {}))
    model = selmix.create_model("small_cnn", data.num_classes, in_channels=1)
    train_plain(model, data.train, epochs=3 if args.fast else 5, seed=args.seed)
    steps = args.steps if args.steps is not None else (40 if args.fast else 300)
    history = selmix_loop(
        model, data.train, data.val, steps, objective=args.objective,
        train_backbone=args.train_backbone, seed=args.seed,
    )  # fmt: skip
    first, last = history[0], history[-1]
    print(f"validation objective ({args.objective}): {first['objective']:.4f} -> "
          f"{last['objective']:.4f} after {steps} steps")  # fmt: skip
    for metric in ("mean_recall", "min_recall", "h_mean"):
        print(f"  {metric:12s} {100 * first['metrics'][metric]:5.1f} -> "
              f"{100 * last['metrics'][metric]:5.1f}")  # fmt: skip
    return history


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
