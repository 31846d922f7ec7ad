"""What JPEG quality 75 costs a long-tailed pre-training, on data that exists losslessly.

The CIFAR-10 copy this project has is JPEG at quality 75 (issue 23). Fashion-MNIST is
lossless, so the cost can be measured there: one Fashion-MNIST-LT split per seed (rho =
100, N_1 = 5000, 500 validation images per class held out), the small-CNN cross-entropy
pre-training of `benchmarks/models/fmnist_lt_small_cnn_ce_s*` (20 epochs, SGD 0.05, batch
128), once on the original images and once on
every image (train and test) re-encoded as JPEG at quality 75 with PIL, for each seed.
It reports test mean recall, min recall and the mean recall of the three rarest classes.

    PYTHONPATH=src python benchmarks/jpeg_cost.py --seeds 0 1 2 --out docs/results/jpeg_cost.md
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line  # noqa: E402
from selmix import create_model, pretrain  # noqa: E402
from selmix.data import long_tail_counts, long_tail_split  # noqa: E402
from selmix.data.sources import load_fashion_mnist  # noqa: E402
from selmix.evaluate import evaluate  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"
RUNS = Path("docs/results/runs/jpeg_cost")


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """uint8 [N, 1, H, W] -> the same images after a JPEG round trip at ``quality``."""
    out = torch.empty_like(images)
    for n, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy(), mode="L").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[n, 0] = torch.from_numpy(np.asarray(Image.open(buffer).convert("L")).copy())
    return out


def run(seed: int, encoded: bool) -> dict:
    full = load_fashion_mnist(DATA, train=True)
    test = load_fashion_mnist(DATA, train=False)
    if encoded:
        full.images, test.images = jpeg(full.images), jpeg(test.images)
    counts = long_tail_counts(5000, 10, 100.0)
    train_idx, _ = long_tail_split(full.labels, counts, 500, seed)
    train = full.subset(train_idx)
    torch.manual_seed(seed)
    model = create_model("small_cnn", 10, in_channels=1)
    started = time.perf_counter()
    pretrain(model, train, None, epochs=20, lr=0.05, batch_size=128, seed=seed,
             progress=False, loss="ce", warmup_epochs=0)  # fmt: skip
    metrics = evaluate(model, test).metrics()
    recalls = metrics["per_class_recall"]
    rarest = sorted(range(10), key=lambda k: counts[k])[:3]
    return {
        "seed": seed,
        "jpeg": encoded,
        "mean_recall": metrics["mean_recall"],
        "min_recall": metrics["min_recall"],
        "tail3_recall": statistics.fmean(recalls[k] for k in rarest),
        "per_class_recall": recalls,
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for encoded in (False, True):
            path = RUNS / f"s{seed}_{'jpeg75' if encoded else 'original'}.json"
            if not path.exists():
                path.write_text(json.dumps(run(seed, encoded), indent=1))
            rows.append(json.loads(path.read_text()))
            print(rows[-1]["seed"], rows[-1]["jpeg"], rows[-1]["mean_recall"], flush=True)

    def cell(encoded: bool, key: str) -> str:
        values = [100 * r[key] for r in rows if r["jpeg"] == encoded]
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.1f} ± {spread:.1f}"

    lines = [
        f"Command: `python benchmarks/jpeg_cost.py --seeds {' '.join(map(str, args.seeds))}`; "
        f"machine: {machine_line(1)}. Fashion-MNIST-LT (rho 100, N_1 5000), small CNN, "
        "cross-entropy, 20 epochs; test set, %, mean ± std over seeds.",
        "",
        "| images | test mean recall | test min recall | 3 rarest classes' mean recall |",
        "|---|---|---|---|",
    ]
    for encoded, name in ((False, "original"), (True, "JPEG quality 75")):
        lines.append(
            f"| {name} | {cell(encoded, 'mean_recall')} | {cell(encoded, 'min_recall')} | "
            f"{cell(encoded, 'tail3_recall')} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
