"""The share of wall time SelMix fine-tuning spends in feedback, per phase (Fashion-MNIST-LT).

For each committed starting model ``benchmarks/models/fmnist_lt_small_cnn_ce_s{seed}`` the
seed-s model is fine-tuned for min recall (``rate`` 50, as in
``benchmarks/precision_parity.py``) with the library defaults, in float32, one thread:

* ``frozen``: a frozen-backbone run (4000 steps, feedback every 10);
* ``backbone, every 10``: the backbone fine-tuned (``--steps`` steps, the first half the
  head-first phase), the whole-model phase feeding back every 10 steps like the head
  phase (``backbone_feedback_every=10``: the behaviour before the setting existed);
* ``backbone, default``: the same with ``backbone_feedback_every`` unset (chosen from the
  validation size and the batch, :func:`selmix.timing.backbone_feedback_every`).

Each run's :attr:`selmix.finetune.FinetuneResult.timings` give the wall seconds of training
and feedback per phase; the test set is evaluated in float32. Prints and writes a markdown
table: the feedback share per phase and the test min / mean recall.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/feedback_share.py \\
        [--data fashion-mnist:DIR] [--seeds 0 1 2] [--steps 1000] [--out FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_start  # noqa: E402
from selmix.evaluate import evaluate  # noqa: E402
from selmix.finetune import finetune  # noqa: E402
from selmix.hardware import machine_description  # noqa: E402
from selmix.timing import backbone_feedback_every  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"
VARIANTS = {
    "frozen": {"frozen_backbone": True},
    "backbone, every 10": {"frozen_backbone": False, "backbone_feedback_every": 10},
    "backbone, default": {"frozen_backbone": False},
}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps",
        type=int,
        default=1000,
        help="steps of the fine-tuned-backbone runs (half of them head-first)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data", default=None,
                        help="data source overriding the models' config.yaml")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write every run here")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started_all = time.time()
    runs = []
    for seed in args.seeds:
        start = load_start(MODELS / f"fmnist_lt_small_cnn_ce_s{seed}", data=args.data)
        data = start.data
        for name in args.variants:
            settings = dict(VARIANTS[name])
            if not settings["frozen_backbone"]:
                settings["steps"] = args.steps
            model = copy.deepcopy(start.model)
            started = time.perf_counter()
            result = finetune(
                model, data.train, data.val, "min_recall", objective_params={"rate": 50.0},
                precision="fp32", channels_last=False, threads=1, seed=seed, device="cpu",
                progress=False, **settings,
            )  # fmt: skip
            wall = time.perf_counter() - started
            metrics = evaluate(model, data.test, "cpu").metrics()
            run = {"seed": seed, "variant": name, "wall_seconds": wall,
                   "timings": result.timings, "min_recall": metrics["min_recall"],
                   "mean_recall": metrics["mean_recall"],
                   "feedbacks": len(result.history)}  # fmt: skip
            runs.append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    val_size = len(load_start(MODELS / "fmnist_lt_small_cnn_ce_s0", data=args.data).data.val)
    lines = [
        "# Wall time spent in feedback, per phase (Fashion-MNIST-LT)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python {shlex.join(sys.argv)}`",
        "",
        f"Machine: {machine_description()}; 1 thread, shared (other jobs ran beside it). "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{time.time() - started_all:.0f} s in all. Starting models "
        "`benchmarks/models/fmnist_lt_small_cnn_ce_s{seed}` (seed s fine-tunes model s), "
        f"{val_size} validation images; SelMix for min recall (rate 50) with the library "
        "defaults in float32 (B = 128, feedback every 10 on cached features). Frozen: 4000 "
        f"steps. Backbone fine-tuned: {args.steps} steps, the first {args.steps // 2} on "
        "cached features (head phase), the rest the whole model; `backbone_feedback_every` "
        f"10 or unset (= {backbone_feedback_every(10, val_size, 128)} here). Feedback share: "
        "feedback seconds / (training + feedback seconds) of the phase, mean (min-max) over "
        f"seeds {args.seeds}; test recalls in %.",
        "",
        "| run | phase | feedback steps | feedback share | s per run | test min recall | "
        "test mean recall |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in args.variants:
        group = [r for r in runs if r["variant"] == name]
        phases = [p for p in group[0]["timings"] if p != "total"]
        for phase in phases:
            shares = [r["timings"][phase]["feedback_share"] for r in group]
            feedbacks = statistics.mean(r["timings"][phase]["feedbacks"] for r in group)
            first = phase == phases[0]
            wall = f"{statistics.mean(r['wall_seconds'] for r in group):.0f}" if first else ""
            recalls = (
                f"{spread([r['min_recall'] for r in group])} | "
                f"{spread([r['mean_recall'] for r in group])}"
                if first else " | "
            )  # fmt: skip
            lines.append(
                f"| {name if first else ''} | {phase} | {feedbacks:.0f} | {spread(shares)} | "
                f"{wall} | {recalls} |"
            )
    lines += ["", "Per seed:", "", "| seed | run | min recall | mean recall | s |",
              "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in runs:
        lines.append(
            f"| {r['seed']} | {r['variant']} | {100 * r['min_recall']:.1f} | "
            f"{100 * r['mean_recall']:.1f} | {r['wall_seconds']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
