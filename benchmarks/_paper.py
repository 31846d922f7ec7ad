"""The paper's supervised CIFAR-10-LT rows (Table 3; docs/maths.md), test %, mean of 3
seeds: one copy for every benchmark that prints them beside ours. No torch import, so a
light script can read them."""

from __future__ import annotations

PAPER_TABLE3: dict[str, dict[str, float | tuple[float, float]]] = {
    "MiSLAS stage 1 (start)": {"mean_recall": 72.7, "min_recall": 45.6, "h_mean": 70.3,
                               "g_mean": 72.5, "coverage": (72.7, 0.045)},
    "MiSLAS stage 2": {"mean_recall": 81.9, "min_recall": 72.5, "h_mean": 81.3,
                       "g_mean": 81.6, "coverage": (81.9, 0.077)},
    "SelMix (backbone fine-tuned)": {"mean_recall": 83.3, "min_recall": 79.2, "h_mean": 82.6,
                                     "g_mean": 82.8, "coverage": (82.8, 0.095)},
}  # fmt: skip
