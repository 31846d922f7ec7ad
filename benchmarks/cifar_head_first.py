"""CIFAR-10-LT, ResNet-32: SelMix with the backbone fine-tuned under the defaults (head first).

The library's defaults with ``frozen_backbone=False``: 2000 head-first steps on cached
features, then the whole model (head at lr_head / 10, backbone at lr_head / 100) for
``--backbone-steps`` steps, feedback every 10 steps, the best validation step returned.
Compared in docs/RESULTS.md with the frozen backbone's test min recall (64.6, 3 seeds,
``benchmarks/compare_methods.py``).

    PYTHONPATH=src python benchmarks/cifar_head_first.py --seeds 0 --backbone-steps 300

(from a folder where the start's data path, ``../shared/data`` in its config.yaml, resolves,
e.g. the main checkout, with absolute ``--start`` and ``--out``).

Writes ``benchmarks/records/cifar_head_first_s<seed>.json`` (test metrics of the selected
and last models, the selected step) and ``..._s<seed>.jsonl`` (the validation trajectory:
one record per feedback step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selmix  # noqa: E402
from _common import load_start  # noqa: E402
from selmix.evaluate import evaluate  # noqa: E402

START = "benchmarks/models/cifar10_lt_resnet32_mixup_s0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", default=START)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/records")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = load_start(args.start)
    head_first = selmix.FinetuneConfig(frozen_backbone=False).head_first
    for seed in args.seeds:
        model = load_start(args.start).model
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        log = out / f"cifar_head_first_s{seed}.jsonl"
        started = time.perf_counter()
        result = selmix.finetune(
            model, start.data.train, start.data.val, "min_recall", frozen_backbone=False,
            steps=head_first + args.backbone_steps, batch_size=args.batch_size, seed=seed,
            progress=False, log_path=str(log),
        )  # fmt: skip
        seconds = time.perf_counter() - started
        selected = evaluate(result.model, start.data.test).metrics()
        last = evaluate(result.model_at("last"), start.data.test).metrics()
        record = {
            "command": "python benchmarks/cifar_head_first.py " + " ".join(sys.argv[1:]),
            "start": args.start,
            "seed": seed,
            "config": result.config.to_dict(),
            "selected_step": result.selected_step,
            "test_selected": selected,
            "test_last": last,
            "val_min_recall": [(r["step"], r["metrics"]["min_recall"]) for r in result.history],
            "seconds": seconds,
        }
        (out / f"cifar_head_first_s{seed}.json").write_text(json.dumps(record, indent=1))
        print(
            f"seed {seed}: test min recall selected {100 * selected['min_recall']:.1f} "
            f"(step {result.selected_step}), last {100 * last['min_recall']:.1f}, mean recall "
            f"{100 * selected['mean_recall']:.1f}, {seconds:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
