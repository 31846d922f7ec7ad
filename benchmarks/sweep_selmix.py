"""Hyper-parameter guidance: SelMix's gain scale s and multiplier rate w (issue 6, item 5).

For one objective (default min recall) and a starting model (a ``selmix pretrain --out``
folder), runs SelMix over a grid of the gain scale s (the paper's ``P ∝ exp(s G)`` and the
scale-free ``P ∝ exp(s G / max|G|)``) and of the multiplier rate w, with a frozen backbone
for every seed and, for ``--full-grid`` points, with the backbone fine-tuned for the first
seed. Reports the final test metric, the final validation metric and the worst validation
value after the first feedback step (a run that passes through 0 has collapsed a class on
the way, even if it recovers).

    python benchmarks/sweep_selmix.py --start benchmarks/models/cifar10_lt_resnet32_mixup_s0 \\
        --seeds 0 1 2 --out sweep.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    feature_space,
    load_start,
    percent_cell,
    run_record,
    write_payload,
)
from selmix.finetune import finetune  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", required=False, help="selmix pretrain folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scales", type=float, nargs="*", default=[1, 3, 10, 30])
    parser.add_argument("--rates", type=float, nargs="*", default=[10, 50])
    parser.add_argument("--forms", nargs="+", default=["paper", "scale-free"],
                        choices=["paper", "scale-free"])  # fmt: skip
    parser.add_argument("--steps", type=int, default=4000, help="frozen-backbone steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr-head", type=float, default=3e-3)
    parser.add_argument("--feedback-every", type=int, default=10)
    parser.add_argument("--confusion-smoothing", type=float, default=1.0)
    parser.add_argument(
        "--full-grid", nargs="*", default=[],
        help="grid points also run with the backbone fine-tuned, as FORM:S:W "
        "(e.g. paper:10:50 scale-free:3:50)",
    )  # fmt: skip
    parser.add_argument("--full-steps", type=int, default=500)
    parser.add_argument("--full-feedback-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only render the table of earlier --json files")  # fmt: skip
    return parser.parse_args()


def one_run(args, model, train, val, test, form, scale, rate, seed, full) -> dict[str, Any]:
    started = time.perf_counter()
    result = finetune(
        model, train, val, "min_recall", objective_params={"rate": rate},
        gain_scale=scale, normalize_gain=form == "scale-free",
        steps=args.full_steps if full else args.steps, batch_size=args.batch_size,
        lr_head=args.lr_head,
        feedback_every=args.full_feedback_every if full else args.feedback_every,
        confusion_smoothing=args.confusion_smoothing, frozen_backbone=not full, seed=seed,
        device=args.device, progress=False, head_first_steps=0,  # as measured (pre-issue 13)
    )  # fmt: skip
    trajectory = [record["metrics"]["min_recall"] for record in result.history]
    test_metrics = result.metrics(test)
    return {
        "form": form, "scale": scale, "rate": rate, "seed": seed,
        "backbone": "fine-tuned" if full else "frozen",
        "test_min_recall": test_metrics["min_recall"],
        "test_mean_recall": test_metrics["mean_recall"],
        "val_final": trajectory[-1], "val_worst": min(trajectory[1:] or trajectory),
        "val_first": trajectory[0], "seconds": time.perf_counter() - started,
    }  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.merge:
        payloads = [json.loads(Path(path).read_text()) for path in args.merge]
        meta = payloads[0]["meta"]
        meta["seconds"] = sum(p["meta"]["seconds"] for p in payloads)
        meta["commands"] = [c for p in payloads for c in p["meta"]["commands"]]
        render([r for p in payloads for r in p["runs"]], meta, args.out)
        return
    if not args.start:
        raise SystemExit("--start is required (unless --merge)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    start = load_start(args.start)
    space = feature_space(start.model, start.data, args.device)
    runs = []
    for seed in args.seeds:
        for form in args.forms:
            for scale in args.scales:
                for rate in args.rates:
                    run = one_run(args, space.fresh_model(), space.train, space.val, space.test,
                                  form, scale, rate, seed, full=False)  # fmt: skip
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    for point in args.full_grid:
        form, scale, rate = point.split(":")
        run = one_run(args, copy.deepcopy(start.model), start.data.train, start.data.val,
                      start.data.test, form, float(scale), float(rate), args.seeds[0],
                      full=True)  # fmt: skip
        runs.append(run)
        print(json.dumps(run), flush=True)
    meta = {
        "start": start.name,
        "data": start.config["data"],
        "settings": {
            k: getattr(args, k)
            for k in (
                "steps",
                "batch_size",
                "lr_head",
                "feedback_every",
                "confusion_smoothing",
                "full_steps",
                "full_feedback_every",
            )
        },  # fmt: skip
        **run_record(started),
    }
    if args.json:
        write_payload(args.json, meta, runs)
    render(runs, meta, args.out)


def render(runs: list[dict[str, Any]], meta: dict[str, Any], out: str | None) -> None:
    settings = meta["settings"]
    lines = [
        f"SelMix for min recall from {meta['start']} ({meta['data']}): gain scale s (paper "
        "form exp(s G), scale-free form exp(s G / max|G|)) and multiplier rate w. Frozen "
        f"backbone: {settings['steps']} steps, feedback every {settings['feedback_every']}; "
        f"fine-tuned backbone: {settings['full_steps']} steps, feedback every "
        f"{settings['full_feedback_every']}, lr_backbone = lr_head / 10. Batch "
        f"{settings['batch_size']}, lr_head {settings['lr_head']}, confusion smoothing "
        f"{settings['confusion_smoothing']}. Min recall, %, mean ± std over seeds. "
        f"Machine: {meta['machine']}; wall time {meta['seconds']:.0f} s.",
        "",
        "Command(s):",
        "",
        *[f"    {command}" for command in meta["commands"]],
        "",
        "| backbone | form | s | w | seeds | test min rec | test mean rec | val min rec, "
        "first / worst / final | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["backbone"], run["form"], run["scale"], run["rate"]), []).append(run)
    for (backbone, form, scale, rate), group in groups.items():
        trajectory = " / ".join(
            percent_cell([r[key] for r in group]) for key in ("val_first", "val_worst", "val_final")
        )
        seconds = statistics.fmean(r["seconds"] for r in group)
        lines.append(
            f"| {backbone} | {form} | {scale:g} | {rate:g} | {len(group)} | "
            f"{percent_cell([r['test_min_recall'] for r in group])} | "
            f"{percent_cell([r['test_mean_recall'] for r in group])} | {trajectory} | "
            f"{seconds:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")


if __name__ == "__main__":
    main()
