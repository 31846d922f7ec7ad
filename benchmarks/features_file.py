"""Embeddings as data: SelMix through ``--data features:FILE`` against the frozen backbone.

For each seed, the committed small CNN of that seed (``fmnist_lt_small_cnn_ce_s<seed>``)
encodes its own Fashion-MNIST-LT split (train / val / test, from its ``config.yaml``) into a
features file with ``examples/make_features_file.py``, which also writes the CNN's head as a
``linear`` model. ``python -m selmix finetune --data features:FILE`` then fine-tunes that
head with SelMix (min recall), with the settings of the frozen-backbone runs in
docs/RESULTS.md (``benchmarks/compare_methods.py``: 4000 steps of batch 128, lr_head 0.003,
feedback every 10, s = 10, w = 50, confusion smoothing 1, seed = the model's seed). The same
run made directly on the images with the backbone frozen (as compare_methods.py does it) is
the reference.

    python benchmarks/features_file.py --seeds 0 1 2 --out docs/results/features_file.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Start, feature_space, machine_line, mean_spread  # noqa: E402
from selmix import evaluate, finetune, load_model  # noqa: E402
from selmix.data import load_data  # noqa: E402

SETTINGS = {
    "objective": "min_recall", "steps": 4000, "batch_size": 128, "lr_head": 0.003,
    "feedback_every": 10, "gain_scale": 10.0, "rate": 50.0, "confusion_smoothing": 1.0,
}  # fmt: skip
COLUMNS = ("mean_recall", "min_recall", "g_mean", "h_mean")


def run_cli(arguments: list[str]) -> None:
    command = [sys.executable, *arguments]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr}")


def split_of(start_dir: Path, data: str | None) -> dict:
    """The data split of a start (its config.yaml), with the data location overridden."""
    split = yaml.safe_load((start_dir / "config.yaml").read_text())
    if data is not None:
        split["data"] = data
    return split


def via_features_file(start_dir: Path, split: dict, seed: int, work: Path) -> tuple[dict, float]:
    features, head = work / f"s{seed}.npz", work / f"s{seed}_head.pt"
    run_cli([
        "examples/make_features_file.py", "--checkpoint", str(start_dir / "model.pt"),
        "--data", split["data"], "--imbalance", str(split["imbalance"]),
        "--max-per-class", str(split["max_per_class"]),
        "--val-per-class", str(split["val_per_class"]), "--seed", str(split["seed"]),
        "--out", str(features), "--head-out", str(head),
    ])  # fmt: skip
    started = time.perf_counter()
    out = work / f"run_s{seed}"
    run_cli([
        "-m", "selmix", "finetune", "--data", f"features:{features}", "--checkpoint", str(head),
        "--out", str(out), "--objective", SETTINGS["objective"],
        "--steps", str(SETTINGS["steps"]), "--batch-size", str(SETTINGS["batch_size"]),
        "--lr-head", str(SETTINGS["lr_head"]), "--feedback-every", str(SETTINGS["feedback_every"]),
        "--gain-scale", str(SETTINGS["gain_scale"]), "--frozen-backbone",
        "--set", f"objective_params={{rate: {SETTINGS['rate']}}}",
        "--set", f"confusion_smoothing={SETTINGS['confusion_smoothing']}",
        "--set", "progress=false", "--seed", str(seed), "--device", "cpu",
    ])  # fmt: skip
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["after"], seconds


def directly(start_dir: Path, split: dict, seed: int) -> tuple[dict, float]:
    model, _ = load_model(start_dir / "model.pt")
    data = load_data(
        split["data"], imbalance=split["imbalance"], max_per_class=split["max_per_class"],
        val_per_class=split["val_per_class"], seed=split["seed"],
    )  # fmt: skip
    start = Start(start_dir, model.eval(), data, split)
    space = feature_space(start.model, start.data)
    started = time.perf_counter()
    result = finetune(
        space.fresh_model(), space.train, space.val, SETTINGS["objective"],
        objective_params={"rate": SETTINGS["rate"]}, steps=SETTINGS["steps"],
        batch_size=SETTINGS["batch_size"], lr_head=SETTINGS["lr_head"],
        gain_scale=SETTINGS["gain_scale"], feedback_every=SETTINGS["feedback_every"],
        confusion_smoothing=SETTINGS["confusion_smoothing"], frozen_backbone=True, seed=seed,
        device="cpu", progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return evaluate(result.model, space.test).metrics(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", default="benchmarks/models/fmnist_lt_small_cnn_ce_s{seed}")
    parser.add_argument(
        "--data", default=None, help="data spec replacing the starts' own (e.g. another folder)"
    )
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[dict]] = {"frozen backbone (images)": [], "--data features:FILE": []}
    times: dict[str, list[float]] = {name: [] for name in rows}
    per_seed = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            start_dir = ROOT / args.models.format(seed=seed)
            split = split_of(start_dir, args.data)
            reference, reference_s = directly(start_dir, split, seed)
            via_file, file_s = via_features_file(start_dir, split, seed, Path(work))
            for name, metrics, seconds in (
                ("frozen backbone (images)", reference, reference_s),
                ("--data features:FILE", via_file, file_s),
            ):
                rows[name].append(metrics)
                times[name].append(seconds)
            per_seed.append((seed, reference["min_recall"], via_file["min_recall"]))
            print(f"seed {seed}: min recall {100 * reference['min_recall']:.1f} (images) / "
                  f"{100 * via_file['min_recall']:.1f} (features file)", flush=True)  # fmt: skip
    lines = [
        "Fashion-MNIST-LT (rho = 100, N_1 = 5000, 500 validation images per class), small CNN "
        f"starts fmnist_lt_small_cnn_ce_s{{{','.join(map(str, args.seeds))}}}, SelMix for min "
        f"recall, {SETTINGS['steps']} steps of batch {SETTINGS['batch_size']}, lr_head "
        f"{SETTINGS['lr_head']}, feedback every {SETTINGS['feedback_every']}, s = "
        f"{SETTINGS['gain_scale']}, w = {SETTINGS['rate']}, confusion smoothing "
        f"{SETTINGS['confusion_smoothing']}; test set, mean ± population std over seeds "
        f"{args.seeds}, %. "
        f"{machine_line(1)}.",
        "",
        "Command: `python " + " ".join(sys.argv) + "`",
        "",
        "s/run: the fine-tuning alone for the images route; the whole `python -m selmix "
        "finetune` process (start-up, reading the file, test evaluation) for the file route.",
        "",
        "| route | seeds | mean rec | min rec | G-mean | H-mean | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, metrics in rows.items():
        cells = " | ".join(mean_spread([m[c] for m in metrics]) for c in COLUMNS)
        seconds = statistics.mean(times[name])
        lines.append(f"| {name} | {len(metrics)} | {cells} | {seconds:.1f} |")
    lines.append("")
    lines.append("Per seed, min recall (images / features file): " + "; ".join(
        f"s{seed} {100 * a:.1f} / {100 * b:.1f}" for seed, a, b in per_seed))  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
