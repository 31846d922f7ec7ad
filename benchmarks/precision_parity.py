"""SelMix fine-tuning accuracy and CPU time in float32 and bf16, side by side (Fashion-MNIST-LT).

For each committed starting model ``benchmarks/models/fmnist_lt_small_cnn_ce_s{0,1,2}``
(small CNN, rho = 100; its ``config.yaml`` fixes the data split) the seed-s model is
fine-tuned with SelMix for min recall (``rate`` 50, confusion smoothing 1, as in
``benchmarks/compare_methods.py``) once per precision and backbone mode, alternating the
precisions:

* ``frozen``: the head on cached features (bf16 changes the one-off feature extraction);
* ``full``: the backbone fine-tuned with the library defaults (the first half of the steps
  a head-first phase on cached features, then the whole model, whose feedback interval is
  ``backbone_feedback_every``'s default unless ``--full-feedback-every`` is given; bf16
  autocast in every training and validation forward pass).

Each run is evaluated on the test set in float32. Prints and writes a markdown table of
test min / mean recall per precision (mean and min-max over the seeds) and the process CPU
time of each run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/precision_parity.py \\
        [--data fashion-mnist:DIR] [--seeds 0 1 2] [--modes frozen full] [--precisions fp32 bf16] \\
        [--frozen-steps 1000] [--full-steps 1000] [--out docs/results/precision_parity.md]
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

MODELS = Path(__file__).resolve().parent / "models"


def spread(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["frozen", "full"],
                        choices=["frozen", "full"])  # fmt: skip
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--frozen-steps", type=int, default=1000)
    parser.add_argument("--full-steps", type=int, default=1000)
    parser.add_argument("--frozen-feedback-every", type=int, default=10)
    parser.add_argument("--full-feedback-every", type=int, default=None,
                        help="the whole-model phase's feedback interval (default: the "
                        "library's)")  # fmt: skip
    parser.add_argument("--data", default=None,
                        help="data source overriding the models' config.yaml (e.g. "
                        "fashion-mnist:/work/shared/data/fashion-mnist)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write every run here")
    parser.add_argument(
        "--reuse", default=None, metavar="RUNS.json",
        help="the --json of benchmarks/feedback_share.py: its 'backbone, default' runs are "
        "this script's full-backbone fp32 runs (the same settings), taken instead of rerun",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started_all = time.time()
    runs = []
    reused = {}
    if args.reuse:
        for run in json.loads(Path(args.reuse).read_text()):
            if run["variant"] == "backbone, default":
                reused[run["seed"]] = run
    for seed in args.seeds:
        start = load_start(MODELS / f"fmnist_lt_small_cnn_ce_s{seed}", data=args.data)
        data = start.data
        for mode in args.modes:
            for precision in args.precisions:
                full = mode == "full"
                if full and precision == "fp32" and seed in reused and args.full_steps == 1000:
                    old = reused[seed]
                    runs.append({"seed": seed, "mode": mode, "precision": precision,
                                 "cpu_seconds": None, "min_recall": old["min_recall"],
                                 "mean_recall": old["mean_recall"], "reused": True})  # fmt: skip
                    continue
                model = copy.deepcopy(start.model)
                interval = {"feedback_every": args.frozen_feedback_every}
                if full and args.full_feedback_every is not None:
                    interval = {"backbone_feedback_every": args.full_feedback_every}
                started = time.process_time()
                finetune(
                    model, data.train, data.val, "min_recall", objective_params={"rate": 50.0},
                    confusion_smoothing=1.0, frozen_backbone=not full,
                    steps=args.full_steps if full else args.frozen_steps,
                    precision=precision, channels_last=False, threads=1, seed=seed,
                    device="cpu", progress=False, **interval,
                )  # fmt: skip
                cpu = time.process_time() - started
                metrics = evaluate(model, data.test, "cpu").metrics()  # float32 evaluation
                run = {"seed": seed, "mode": mode, "precision": precision, "cpu_seconds": cpu,
                       "min_recall": metrics["min_recall"],
                       "mean_recall": metrics["mean_recall"]}  # fmt: skip
                runs.append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    lines = [
        "# SelMix fine-tuning in float32 and bf16 (Fashion-MNIST-LT)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python {shlex.join(sys.argv)}`",
        "",
        f"Machine: {machine_description()}, 1 thread, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f", {time.time() - started_all:.0f} s in all. Starting models "
        "`benchmarks/models/fmnist_lt_small_cnn_ce_s{seed}` (seed s fine-tunes model s); "
        "SelMix for min recall (rate 50, confusion smoothing 1, lr_head 3e-3, B = 128), "
        f"frozen: {args.frozen_steps} steps, feedback every {args.frozen_feedback_every}; "
        f"full backbone: {args.full_steps} steps (the first {args.full_steps // 2} head-first), "
        "whole-model feedback every "
        + (
            f"{args.full_feedback_every} steps"
            if args.full_feedback_every
            else "`backbone_feedback_every` steps (unset: the library's default)"
        )
        + ". Test metrics in float32; mean (min-max) over seeds "
        f"{args.seeds}, in %. CPU: this process's CPU time per run (the machine is shared)"
        + (
            f"; full-backbone fp32 runs taken from `{args.reuse}` (benchmarks/feedback_share.py, "
            "the same settings)."
            if reused
            else "."
        ),
        "",
        "| backbone | precision | test min recall | test mean recall | CPU s per run |",
        "|---|---|---:|---:|---:|",
    ]
    for mode in args.modes:
        for precision in args.precisions:
            group = [r for r in runs if r["mode"] == mode and r["precision"] == precision]
            seconds = [r["cpu_seconds"] for r in group if r["cpu_seconds"] is not None]
            cpu = f"{statistics.mean(seconds):.1f}" if seconds else "- (reused)"
            lines.append(
                f"| {mode} | {precision} | {spread([r['min_recall'] for r in group])} | "
                f"{spread([r['mean_recall'] for r in group])} | {cpu} |"
            )
    lines += ["", "Per seed:", "", "| seed | backbone | precision | min recall | mean recall |"
              " CPU s |", "|---|---|---|---:|---:|---:|"]  # fmt: skip
    for r in runs:
        cpu = "reused" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.1f}"
        lines.append(
            f"| {r['seed']} | {r['mode']} | {r['precision']} | {100 * r['min_recall']:.1f} | "
            f"{100 * r['mean_recall']:.1f} | {cpu} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
