"""Prints the table of the benchmarks' starting models (benchmarks/models/README.md).

For every ``selmix pretrain`` folder under ``benchmarks/models``: the data split from its
``config.yaml``, the test metrics from its ``metrics.json`` and the ``/usr/bin/time`` line
saved beside it in ``time.txt``.

    python benchmarks/describe_models.py
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from selmix.data import long_tail_counts

MODELS = Path(__file__).resolve().parent / "models"


def main() -> None:
    print("| folder | model | loss / mixup | epochs | seed | training images | "
          "test mean recall | test min recall | test min coverage | wall / CPU time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for folder in sorted(p for p in MODELS.iterdir() if (p / "config.yaml").exists()):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        test = json.loads((folder / "metrics.json").read_text())["test"]
        counts = config.get("train_counts") or long_tail_counts(
            config["max_per_class"], 10, config["imbalance"]
        )
        time_file = folder / "time.txt"
        timing = time_file.read_text().strip() if time_file.exists() else "-"
        print(
            f"| {folder.name} | {config['model']} | {config['loss']} / {config['mixup']} | "
            f"{config['epochs']} | {config['seed']} | {sum(counts)} ({counts[0]} ... "
            f"{counts[-1]}) | {100 * test['mean_recall']:.1f} | {100 * test['min_recall']:.1f} | "
            f"{test['min_coverage']:.4f} | {timing} |"
        )


if __name__ == "__main__":
    main()
