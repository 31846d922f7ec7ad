"""What JPEG quality 75 costs a long-tailed pre-training, on data that exists losslessly.

The CIFAR-10 copy this project has is JPEG at quality 75 (issue 23). Fashion-MNIST is
lossless, so the cost can be measured there: one Fashion-MNIST-LT split per seed (rho =
100, N_1 = 5000, 500 validation images per class held out), the small-CNN cross-entropy
pre-training of `benchmarks/models/fmnist_lt_small_cnn_ce_s*` (20 epochs, SGD 0.05, batch
128), for each seed three times: on the original images; on every image (train and test)
re-encoded as JPEG at quality 75 with PIL, as the CIFAR-10 copy was; and on those JPEG
images after :func:`second_jpeg_dose`, the degradation that ``pretrain_cifar_mislas.py
--jpeg-second-dose`` applies to the CIFAR-10 copy. The last pair says how a second dose's
cost compares with the first's, which is what lets the CIFAR-10 second-dose run estimate
the copy's own JPEG cost. It reports test mean recall, min recall, the
mean recall of the three rarest classes and the RMS pixel change of each dose.

    PYTHONPATH=src python benchmarks/jpeg_cost.py --seeds 0 1 2 --out docs/results/jpeg_cost.md

``--describe-copy OUT`` instead reads the CIFAR-10 copy's own JPEG headers (chroma
subsampling, quantisation tables and the quality whose standard tables they match) for every
image of the archive (or its first ``--describe-files``), and writes a short table:

    python benchmarks/jpeg_cost.py --describe-copy docs/results/cifar_jpeg_copy.md
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line  # noqa: E402
from selmix import create_model, pretrain  # noqa: E402
from selmix.data import long_tail_counts, long_tail_split  # noqa: E402
from selmix.data.sources import load_fashion_mnist  # noqa: E402
from selmix.evaluate import evaluate  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"
RUNS = Path("benchmarks/records/jpeg_cost")
CIFAR_ARCHIVE = DATA.parent / "cifar10-jpeg.tar.gz"
#: Pillow's name for each value of ``JpegImagePlugin.get_sampling``
SAMPLING = {0: "4:4:4 (none)", 1: "4:2:2", 2: "4:2:0 (chroma at half width and height)"}


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """uint8 [N, 1, H, W] -> the same images after a JPEG round trip at ``quality``."""
    out = torch.empty_like(images)
    for n, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy(), mode="L").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[n, 0] = torch.from_numpy(np.asarray(Image.open(buffer).convert("L")).copy())
    return out


#: the second dose's JPEG quality: IJG tables scale as 200 - 2 * quality, so quality 50's
#: quantisation steps are twice quality 75's
SECOND_DOSE_QUALITY = 50


def second_jpeg_dose(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W], C = 1 or 3 -> the images after a second, larger dose of the
    copy's JPEG loss.

    The CIFAR-10 copy was encoded at quality 75 with 4:2:0 chroma subsampling (colour at
    half the width and height). The second dose doubles both losses: quantisation at quality
    :data:`SECOND_DOSE_QUALITY` (twice the steps) and, for colour images, chroma at a
    quarter of the width and height (box-filtered, then bilinearly enlarged before a 4:2:0
    encoding). Grey images only get the quantisation.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.dtype != torch.uint8:
        raise ValueError(
            f"`images` must be uint8 [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}"
        )
    out = torch.empty_like(images)
    height, width = images.shape[2:]
    for n, image in enumerate(images):
        if image.shape[0] == 1:
            picture = Image.fromarray(image[0].numpy(), mode="L")
        else:
            luma, blue, red = (
                Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB").convert("YCbCr").split()
            )
            small = (max(width // 4, 1), max(height // 4, 1))
            blue, red = (
                channel.resize(small, Image.BOX).resize((width, height), Image.BILINEAR)
                for channel in (blue, red)
            )
            picture = Image.merge("YCbCr", (luma, blue, red)).convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=SECOND_DOSE_QUALITY, subsampling=2)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert(picture.mode))
        out[n] = torch.from_numpy(
            decoded[None].copy() if decoded.ndim == 2 else decoded.transpose(2, 0, 1).copy()
        )
    return out


def rms_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square pixel difference of two uint8 image tensors, in grey levels."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


#: the image variants of a seed: name -> (JPEG doses applied, what it is)
VARIANTS = {
    "original": (0, "original"),
    "jpeg75": (1, "JPEG quality 75"),
    "jpeg75_second_dose": (2, "JPEG quality 75, then the second dose (quality 50)"),
}


def degraded(images: torch.Tensor, dose: int) -> torch.Tensor:
    """``images`` after ``dose`` JPEG doses: none, quality 75, quality 75 then
    :func:`second_jpeg_dose`."""
    if dose >= 1:
        images = jpeg(images)
    if dose >= 2:
        images = second_jpeg_dose(images)
    return images


def run(seed: int, dose: int) -> dict:
    full = load_fashion_mnist(DATA, train=True)
    test = load_fashion_mnist(DATA, train=False)
    full.images, test.images = degraded(full.images, dose), degraded(test.images, dose)
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
        "jpeg": dose > 0,
        "dose": dose,
        "mean_recall": metrics["mean_recall"],
        "min_recall": metrics["min_recall"],
        "tail3_recall": statistics.fmean(recalls[k] for k in rarest),
        "per_class_recall": recalls,
        "wall_s": time.perf_counter() - started,
    }


def _table_means(image: Image.Image) -> tuple[float, float]:
    """Mean quantisation step of the luma table and of the chroma table(s)."""
    tables = image.quantization
    chroma = [statistics.fmean(tables[k]) for k in sorted(tables) if k > 0]
    return statistics.fmean(tables[0]), statistics.fmean(chroma) if chroma else float("nan")


def _standard_quality(image: Image.Image) -> int | None:
    """The quality whose standard (IJG) tables, as Pillow writes them, equal the image's."""
    for quality in range(1, 101):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="JPEG", quality=quality)
        if Image.open(buffer).quantization == image.quantization:
            return quality
    return None


def describe_copy(out: Path, limit: int | None = None) -> str:
    """A markdown table of the JPEG encoding of the CIFAR-10 copy's images (all, or the
    first ``limit`` in archive order)."""
    sampling: Counter[str] = Counter()
    tables: Counter[tuple] = Counter()
    luma, chroma, example, pixels = [], [], None, []
    with tarfile.open(CIFAR_ARCHIVE) as archive:
        for member in archive:
            if not member.name.endswith(".jpg"):
                continue
            image = Image.open(io.BytesIO(archive.extractfile(member).read()))
            sampling[SAMPLING.get(JpegImagePlugin.get_sampling(image), "other")] += 1
            tables[tuple(tuple(t) for _, t in sorted(image.quantization.items()))] += 1
            pixels.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
            step = _table_means(image)
            luma.append(step[0])
            chroma.append(step[1])
            example = example or image
            if limit is not None and sum(sampling.values()) >= limit:
                break
    files = sum(sampling.values())
    quality = _standard_quality(example) if len(tables) == 1 else None
    decoded = torch.from_numpy(np.stack(pixels))
    second_dose = rms_difference(decoded, second_jpeg_dose(decoded))
    which = f"the first {files} images, in archive order," if limit else f"all {files} images"
    option = f" --describe-files {limit}" if limit else ""
    lines = [
        f"Command: `python benchmarks/jpeg_cost.py --describe-copy {out}{option}`: {which} of "
        "`../shared/data/cifar10-jpeg.tar.gz` (train and test).",
        "",
        "| what | value |",
        "|---|---|",
        "| chroma subsampling | "
        + "; ".join(f"{name}: {count} files" for name, count in sampling.most_common())
        + " |",
        f"| distinct quantisation table sets | {len(tables)} |",
        f"| quality whose standard tables they equal | {quality or 'none (or several sets)'} |",
        f"| mean luma quantisation step | {statistics.fmean(luma):.1f} |",
        f"| mean chroma quantisation step | {statistics.fmean(chroma):.1f} |",
        "| RMS pixel change of the second dose (`second_jpeg_dose`: quality 50, chroma at a "
        f"quarter size), grey levels | {second_dose:.1f} |",
    ]
    return "\n".join(lines) + "\n"


def dose_of(record: dict) -> int:
    """A record's number of JPEG doses (records from before the second dose have only
    ``jpeg``)."""
    return int(record.get("dose", int(bool(record["jpeg"]))))


def dose_cost(records: list[dict], dose: int) -> dict[str, float] | None:
    """Mean over seeds of a record's test recall after ``dose`` JPEG doses minus that after
    ``dose - 1`` (``mean_recall``, ``min_recall``, ``tail3_recall``, and ``seeds``: how many
    seeds have both); per seed, so that the split's own spread cancels. ``None`` when no
    seed has both."""
    by_seed: dict[int, dict[int, dict]] = {}
    for record in records:
        by_seed.setdefault(record["seed"], {})[dose_of(record)] = record
    pairs = [runs for runs in by_seed.values() if dose in runs and dose - 1 in runs]
    if not pairs:
        return None
    cost: dict[str, float] = {
        key: statistics.fmean(runs[dose][key] - runs[dose - 1][key] for runs in pairs)
        for key in ("mean_recall", "min_recall", "tail3_recall")
    }
    cost["seeds"] = len(pairs)
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None)
    parser.add_argument("--describe-copy", type=Path, default=None, metavar="OUT")
    parser.add_argument("--describe-files", type=int, default=None)
    args = parser.parse_args()
    if args.describe_copy is not None:
        text = describe_copy(args.describe_copy, args.describe_files)
        print(text)
        args.describe_copy.write_text(text)
        return
    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for variant, (dose, _) in VARIANTS.items():
            path = RUNS / f"s{seed}_{variant}.json"
            if not path.exists():
                path.write_text(json.dumps(run(seed, dose), indent=1))
            rows.append(json.loads(path.read_text()))
            print(seed, variant, rows[-1]["mean_recall"], flush=True)

    def cell(dose: int, key: str) -> str:
        found = [100 * r[key] for r in rows if dose_of(r) == dose]
        spread = statistics.pstdev(found) if len(found) > 1 else 0.0
        return f"{statistics.fmean(found):.1f} ± {spread:.1f}"

    images = load_fashion_mnist(DATA, train=False).images
    steps = [degraded(images, dose) for dose in range(3)]

    lines = [
        f"Command: `python benchmarks/jpeg_cost.py --seeds {' '.join(map(str, args.seeds))}`; "
        f"machine: {machine_line(1)}. Fashion-MNIST-LT (rho 100, N_1 5000), small CNN, "
        "cross-entropy, 20 epochs; test set, %, mean ± std over seeds.",
        "",
        "| images | test mean recall | test min recall | 3 rarest classes' mean recall | "
        "RMS pixel change of this dose (test images, grey levels) |",
        "|---|---|---|---|---|",
    ]
    for dose, name in VARIANTS.values():
        change = "" if dose == 0 else f"{rms_difference(steps[dose - 1], steps[dose]):.1f}"
        lines.append(
            f"| {name} | {cell(dose, 'mean_recall')} | {cell(dose, 'min_recall')} | "
            f"{cell(dose, 'tail3_recall')} | {change} |"
        )
    lines += [
        "",
        "| dose (change per seed, mean over seeds, points) | test mean recall | "
        "test min recall | 3 rarest classes' mean recall |",
        "|---|---|---|---|",
    ]
    for dose, name in ((1, "first: original -> JPEG 75"), (2, "second: JPEG 75 -> second dose")):
        cost = dose_cost(rows, dose)
        assert cost is not None  # every seed ran every dose above
        lines.append(
            f"| {name} | {100 * cost['mean_recall']:+.1f} | {100 * cost['min_recall']:+.1f} | "
            f"{100 * cost['tail3_recall']:+.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
