"""SelMix with other mixups (paper App. K.3, Table K.5): feature, input and CutMix (issue 25).

For each committed Fashion-MNIST-LT start (``benchmarks/models/fmnist_lt_small_cnn_ce_s*``)
fine-tune copies of the model for min recall with the whole model trained from the first
step (``head_first_steps = 0``, the paper's schedule), once per ``mixup`` setting under the
SelMix policy and under the uniform policy, and, for the input-space mixes under SelMix,
once more with the labels weighted by the share of x1 (``labels="mixed"``) instead of
SelMix's label i. Prints a markdown table of the test mean and min recall (mean ± std over
the seeds) and the wall and CPU time per run; ``--out`` also writes it.

Every run is appended to ``--json`` as it finishes, and a rerun skips the runs already
there, so a killed benchmark continues where it stopped.

Why no head-first phase by default: with the library's default schedule (a phase on
cached features, which mixes features whatever ``mixup`` says, then the whole model) the
best validation step of a short run fell in the head phase for every input-space mix with
label i (a pilot on seed 0, ``--steps 400 --head-first-steps 200``, kept in
``benchmarks/records/mixup_variants_pilot_head_first.json``), so the returned models did
not depend on the mix at all.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/mixup_variants.py \\
        --json benchmarks/records/mixup_variants.json --out docs/results/mixup_variants.md
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from _common import load_start, machine_line, percent_cell
from selmix.core.mixing import CutMix, InputMixup, list_mixups, register_mixup
from selmix.engine.evaluate import evaluate
from selmix.finetune import finetune

STARTS = "benchmarks/models/fmnist_lt_small_cnn_ce_s{seed}"
#: (row name, mixup setting, policy); the *_mixed_labels mixes are registered below
VARIANTS = [
    ("feature (the paper)", "feature", "selmix"),
    ("input, label i", "input", "selmix"),
    ("input, labels by lam", "input_mixed_labels", "selmix"),
    ("cutmix, label i", "cutmix", "selmix"),
    ("cutmix, labels by area", "cutmix_mixed_labels", "selmix"),
    ("feature (the paper)", "feature", "uniform"),
    ("input, label i", "input", "uniform"),
    ("cutmix, label i", "cutmix", "uniform"),
]


def register_variants() -> None:
    """The label-rule variants, as a user registers an operation of their own."""
    if "input_mixed_labels" not in list_mixups():
        register_mixup("input_mixed_labels", InputMixup(labels="mixed"))
        register_mixup("cutmix_mixed_labels", CutMix(labels="mixed"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--head-first-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--feedback-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/records/mixup_variants.json")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--table-only", action="store_true", help="only print the table")
    return parser.parse_args()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def settings(args: argparse.Namespace, mixup: str, policy: str, seed: int) -> dict[str, Any]:
    return {
        "objective": "min_recall", "policy": policy, "mixup": mixup, "frozen_backbone": False,
        "steps": args.steps, "head_first_steps": args.head_first_steps,
        "batch_size": args.batch_size, "feedback_every": args.feedback_every, "seed": seed,
        "progress": False, "threads": args.threads,
    }  # fmt: skip


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_all(args: argparse.Namespace) -> None:
    path = Path(args.json)
    done = {(r["seed"], r["mixup"], r["policy"]) for r in load_runs(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        start = load_start(STARTS.format(seed=seed))
        if (seed, "start", "-") not in done:
            record = {"seed": seed, "mixup": "start", "policy": "-"}
            record.update(metrics(evaluate(start.model, start.data.test).metrics()))
            append(path, record)
        for _, mixup, policy in VARIANTS:
            if (seed, mixup, policy) in done:
                continue
            model = copy.deepcopy(start.model)
            wall, cpu = time.perf_counter(), cpu_seconds()
            result = finetune(
                model, start.data.train, start.data.val, **settings(args, mixup, policy, seed)
            )
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            record = {"seed": seed, "mixup": mixup, "policy": policy}
            record.update(metrics(result.metrics(start.data.test)))
            record.update(
                wall_seconds=wall, cpu_seconds=cpu, best_step=result.best_step,
                config=result.config.to_dict(), machine=machine_line(torch.get_num_threads()),
            )  # fmt: skip
            append(path, record)
            print(
                f"seed {seed} {mixup} / {policy}: {wall:.0f} s wall, {cpu:.0f} s CPU, "
                f"test min recall {record['min_recall']:.3f}, mean {record['mean_recall']:.3f}",
                flush=True,
            )


def metrics(values: dict[str, Any]) -> dict[str, float]:
    return {key: float(values[key]) for key in ("mean_recall", "min_recall")}


def append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")


def table(args: argparse.Namespace) -> str:
    runs = load_runs(Path(args.json))
    seeds = sorted({r["seed"] for r in runs})
    config = next((r["config"] for r in runs if "config" in r), {})
    machine = next((r["machine"] for r in runs if "machine" in r), "")
    head_first = config.get("head_first_steps") or 0
    phase = (
        f"the first {head_first} on cached features (feature mixup), the rest the whole "
        "model with the row's mix "
        if head_first
        else "the whole model with the row's mix from the first step "
    )
    lines = [
        "# SelMix with other mixups on Fashion-MNIST-LT",
        "",
        f"Fashion-MNIST-LT (rho = 100), small_cnn, the committed cross-entropy starts "
        f"`{STARTS.format(seed='{' + ','.join(map(str, seeds)) + '}')}`, test set (10,000 "
        f"images); min-recall fine-tuning with the backbone fine-tuned: "
        f"{config.get('steps')} steps of {config.get('batch_size')} pairs, {phase}"
        f"(lr {config.get('lr_head')} for the head, a tenth for the backbone); feedback "
        f"every {config.get('feedback_every')} "
        "steps, the other settings the defaults (s = 3 on the normalised gain, confusion "
        "smoothing 1, lam ~ U[0.6, 1], the best validation step returned). Seeds "
        f"{seeds}, mean ± std over seeds, %; *best steps*: the validation-best step each "
        "seed returned. Time per run on AMD EPYC (Zen 4, family 25 model 17), 2 cores, "
        f"AVX-512-bf16, no AMX, shared with other jobs and noisy ({machine}); one run at a "
        "time.",
        "",
        "Command: `OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/mixup_variants.py "
        "--out docs/results/mixup_variants.md` (runs in "
        "`benchmarks/records/mixup_variants.json`).",
        "",
        "| policy | mixup | loss | seeds | test mean recall | test min recall | best steps | "
        "wall s / run | CPU s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    start = [r for r in runs if r["mixup"] == "start"]
    if start:
        mean = percent_cell([r["mean_recall"] for r in start])
        low = percent_cell([r["min_recall"] for r in start])
        lines.append(f"| – (the CE start) | – | – | {len(start)} | {mean} | {low} | – | – | – |")
    for name, mixup, policy in VARIANTS:
        chosen = [r for r in runs if r["mixup"] == mixup and r["policy"] == policy]
        if not chosen:
            continue
        kind, _, loss = name.partition(", ")
        loss = loss or "label i"
        mean = percent_cell([r["mean_recall"] for r in chosen])
        low = percent_cell([r["min_recall"] for r in chosen])
        wall = sum(r["wall_seconds"] for r in chosen) / len(chosen)
        cpu = sum(r["cpu_seconds"] for r in chosen) / len(chosen)
        lines.append(
            f"| {policy} | {kind.replace(' (the paper)', '')} | {loss} | {len(chosen)} | "
            f"{mean} | {low} | {', '.join(str(r['best_step']) for r in chosen)} | "
            f"{wall:.0f} | {cpu:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    register_variants()
    if not args.table_only:
        run_all(args)
    text = table(args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
