"""Paper Table 3 on the MiSLAS CIFAR-10-LT start: SelMix and the baselines, side by side.

The start is ``benchmarks/models/cifar10_lt_resnet32_mislas_s0`` (ResNet-32, MiSLAS
stage-1 recipe, 200 epochs; ``benchmarks/pretrain_cifar_mislas.py``). Every row is run for
each objective (min recall, mean recall, H-mean, G-mean, mean recall s.t. min coverage) and
fine-tuning seed, and evaluated on the official test set:

frozen backbone (features computed once per process, shared by these rows)
  * ``start``: the starting model as it is;
  * ``post-hoc LA``: logit adjustment, tau tuned on validation for the objective;
  * ``cRT``: the head re-trained with class-balanced batches (10 epochs);
  * ``MiSLAS stage-2-like``: the stage-1 head re-trained with class-balanced batches and
    label-aware smoothing (0.3 head .. 0.0 tail), without MiSLAS's batch-norm shift;
  * ``LA fine-tuning``: the logit-adjusted loss, library defaults (4000 steps);
  * ``uniform policy`` / ``greedy policy`` / ``SelMix``: the library's defaults
    (``selmix.finetune`` with only ``policy`` set); ``SelMix, s = 10``: the defaults with a
    sharper policy (``gain_scale=10``);

backbone fine-tuned (``--full-precision``, default bf16: 2.2x faster on this CPU)
  * ``SelMix (defaults)``: ``frozen_backbone=False`` and the defaults: the head-first
    phase (2000 steps on cached features), then ``--full-steps`` whole-model steps;
  * ``SelMix (paper preset)``: ``preset="paper"`` (the paper's supervised recipe, the last
    step returned) with ``--full-steps`` steps;
  * ``LA fine-tuning``: the logit-adjusted loss on the whole model, ``--full-steps`` steps.

Objective-independent rows (start, cRT, MiSLAS stage-2-like, LA fine-tuning) run once per
seed and appear in every objective's table.

Each run writes ``<records>/<row>__<objective>__s<seed>.json`` (test and validation metrics,
selected step, wall time, config) and, for the runs with feedback, the validation trajectory
``....jsonl`` (one line per feedback step). A run whose record exists is skipped, so the
script resumes after a stop, and several processes can share one plan (each claims a run
with an exclusive ``.claim`` file before running it):

    OMP_NUM_THREADS=1 python benchmarks/cifar_table3.py --seeds 0 1 2 &
    OMP_NUM_THREADS=1 python benchmarks/cifar_table3.py --seeds 0 1 2 &
    python benchmarks/cifar_table3.py --render docs/results/table3_cifar.md

``--render`` reads every record and writes the tables (the paper's rows from docs/maths.md
section 8 beside ours).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    METRIC_COLUMNS,
    feature_space,
    load_start,
    machine_line,
    percent_cell,
)
from _paper import PAPER_TABLE3  # noqa: E402
from selmix import finetune  # noqa: E402
from selmix._io import atomic_write_text, process_is_alive  # noqa: E402
from selmix.baselines import run_baseline  # noqa: E402
from selmix.engine.evaluate import evaluate  # noqa: E402
from selmix.finetune import HEAD_FIRST_STEPS  # noqa: E402

START = "benchmarks/models/cifar10_lt_resnet32_mislas_s0"
RECORDS = "benchmarks/records/table3"
SUMMARY_MARK = "<!-- summary -->"
OBJECTIVES = {
    "min_recall": "min recall",
    "mean_recall": "mean recall",
    "h_mean": "H-mean",
    "g_mean": "G-mean",
    "mean_recall_min_coverage": "mean recall s.t. min coverage",
}
# The metric a table cell shows for each objective (coverage: mean recall / min coverage).
OBJECTIVE_METRIC = {
    "min_recall": "min_recall",
    "mean_recall": "mean_recall",
    "h_mean": "h_mean",
    "g_mean": "g_mean",
    "mean_recall_min_coverage": "mean_recall",
}
# (row, backbone): whether the result depends on the objective.
ROWS: dict[tuple[str, str], bool] = {
    ("start", "frozen"): False,
    ("post-hoc LA", "frozen"): True,
    ("cRT", "frozen"): False,
    ("MiSLAS stage-2-like", "frozen"): False,
    ("LA fine-tuning", "frozen"): False,
    ("uniform policy", "frozen"): True,
    ("greedy policy", "frozen"): True,
    ("SelMix", "frozen"): True,
    ("SelMix, s = 10", "frozen"): True,
    ("LA fine-tuning", "fine-tuned"): False,
    ("SelMix (defaults)", "fine-tuned"): True,
    ("SelMix (paper preset)", "fine-tuned"): True,
    ("SelMix (defaults, backbone lr 3e-4)", "fine-tuned"): True,
}
# Rows run for the first objective only unless --rows names them.
FIRST_OBJECTIVE_ONLY = ("SelMix (defaults, backbone lr 3e-4)",)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", default=START)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES),
                        choices=list(OBJECTIVES))  # fmt: skip
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="row names to run (default: all), e.g. 'SelMix (defaults)'",
    )
    parser.add_argument("--backbones", nargs="+", default=["frozen", "fine-tuned"])
    parser.add_argument(
        "--full-steps",
        type=int,
        default=500,
        help="whole-model steps of the fine-tuned-backbone rows",
    )
    parser.add_argument("--full-precision", default="bf16")
    parser.add_argument("--crt-epochs", type=int, default=10)
    parser.add_argument("--records", default=RECORDS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--render", default=None, help="write the tables here and stop")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="fine-tuning settings for the SelMix rows, over the defaults (values read as "
        "YAML), e.g. --set uniform_mix=0; use a separate --records folder",
    )
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="frozen rows: keep the first N validation images of each class (of the start's "
        "500), to see a setting at a smaller validation set; use a separate --records folder",
    )
    parser.add_argument(
        "--describe-start",
        default=None,
        help="write the start's per-class recall on train / val / test here",
    )
    return parser.parse_args()


def slug(row: str, backbone: str, objective: str, seed: int) -> str:
    name = "".join(c if c.isalnum() else "_" for c in f"{row}-{backbone}".lower())
    name = "_".join(part for part in name.split("_") if part)
    return f"{name}__{objective}__s{seed}"


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """(row, backbone, objective, seed) of every run, cheap frozen rows first; an
    objective-independent row runs under the first objective only."""
    runs = []
    for backbone in ("frozen", "fine-tuned"):
        if backbone not in args.backbones:
            continue
        for seed in args.seeds:
            for objective in args.objectives:
                for (row, row_backbone), per_objective in ROWS.items():
                    if row_backbone != backbone or (args.rows and row not in args.rows):
                        continue
                    if row in FIRST_OBJECTIVE_ONLY and not args.rows:
                        per_objective = False
                    if per_objective or objective == args.objectives[0]:
                        runs.append((row, backbone, objective, seed))
    # frozen rows first (seconds each); then the first objective's fine-tuned runs for
    # every seed; then SelMix (defaults) on the other objectives, seed by seed; then the
    # paper preset on them: a stopped plan leaves whole seeds of the rows that matter most
    first = args.objectives[0]

    def priority(run: tuple[str, str, str, int]) -> tuple[int, ...]:
        row, backbone, objective, seed = run
        if backbone == "frozen":
            return (0, 0)
        if objective == first:
            return (1, row in FIRST_OBJECTIVE_ONLY)
        return (2 if row == "SelMix (defaults)" else 3, seed)

    return sorted(runs, key=priority)


def claim(path: Path) -> bool:
    """An exclusive claim on a run, so that parallel processes never run it twice; a claim
    whose process is gone is taken over."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            # 0 (a claim whose writer has not written its pid yet) counts as alive
            holder = int(path.read_text() or 0)
        except ValueError:
            holder = None
        if holder is not None and process_is_alive(holder):
            return False
        path.unlink(missing_ok=True)
        return claim(path)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def first_per_class(dataset: Any, per_class: int) -> Any:
    """The first ``per_class`` samples of each class of ``dataset`` (in its order)."""
    labels = torch.as_tensor(dataset.labels)
    keep = [i for k in range(int(labels.max()) + 1)
            for i in torch.nonzero(labels == k).flatten()[:per_class].tolist()]  # fmt: skip
    return dataset.subset(sorted(keep))


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``["uniform_mix=0", ...]`` as settings (each value read as YAML)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        settings[key] = yaml.safe_load(value)
    return settings


def run_one(args, start, space, row, backbone, objective, seed, log_path) -> dict[str, Any]:
    """Runs one row; returns the model and what to record besides the test metrics."""
    full = backbone == "fine-tuned"
    if full:
        model, train, val = copy.deepcopy(start.model), start.data.train, start.data.val
    else:
        model, train, val = space.fresh_model(), space.train, space.val
    common = {"seed": seed, "device": args.device, "progress": False}
    if row.startswith("SelMix") or row in ("uniform policy", "greedy policy"):
        options: dict[str, Any] = {"log_path": str(log_path) if full else None}
        if row == "SelMix, s = 10":
            # a sharper policy than the defaults' s = 3 (closer to greedy)
            options["gain_scale"] = 10.0
        if row == "uniform policy":
            options["policy"] = "uniform"
        elif row == "greedy policy":
            options["policy"] = "greedy"
        if row == "SelMix (defaults, backbone lr 3e-4)":
            # the paper's backbone rate (lr_W / 10) after the head-first phase, instead of
            # the defaults' lr_head / 100
            options["lr_backbone"] = 3e-4
        if row.startswith("SelMix (defaults"):
            options.update(frozen_backbone=False, steps=HEAD_FIRST_STEPS + args.full_steps,
                           precision=args.full_precision)  # fmt: skip
        if row == "SelMix (paper preset)":
            options.update(preset="paper", steps=args.full_steps, precision=args.full_precision)
        options.update(_overrides(args.overrides))
        result = finetune(model, train, val, objective, **options, **common)
        return {
            "model": result.model,
            "config": result.config.to_dict(),
            "selected_step": result.selected_step,
            "best_step": result.best_step,
            "last_step": result.last_step,
            "val": result.history[[r["step"] for r in result.history].index(
                result.selected_step)]["metrics"] if result.history else None,
        }  # fmt: skip
    del common["progress"]
    if row == "LA fine-tuning":
        options = {"frozen_backbone": not full, "seed": seed}
        if full:
            options.update(steps=args.full_steps, precision=args.full_precision)
        result = run_baseline("la_finetune", model, train, val, objective,
                              device=args.device, **options)  # fmt: skip
        return {"model": result.model, "config": options}
    if row == "cRT":
        options = {"epochs": args.crt_epochs, "seed": seed}
        result = run_baseline("crt", model, train, val, objective, device=args.device, **options)
        return {"model": result.model, "config": options}
    if row == "MiSLAS stage-2-like":
        # MiSLAS's CIFAR-10 stage 2: smoothing 0.3 (head) .. 0.0 (tail), weight decay 2e-4
        options = {"epochs": args.crt_epochs, "seed": seed, "weight_decay": 2e-4}
        result = run_baseline("mislas_stage2", model, train, val, objective,
                              device=args.device, **options)  # fmt: skip
        return {"model": result.model, "config": options}
    if row == "post-hoc LA":
        result = run_baseline("posthoc_la", model, train, val, objective, device=args.device)
        return {"model": result.model, "config": {"tau": result.details["tau"]}}
    if row == "start":
        return {"model": run_baseline("start", model, train, val, objective).model, "config": {}}
    raise ValueError(f"unknown row {row!r}")


def compact_trajectory(path: Path) -> str:
    """Rewrites a run's log to one short line per feedback step (step, validation
    metrics and per-class recall, 4 digits), small enough to commit; returns the path."""
    lines = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "metrics" not in entry:
            continue
        metrics = entry["metrics"]
        short = {k: round(metrics[k], 4) for k in METRIC_COLUMNS if k in metrics}
        short["per_class_recall"] = [round(v, 4) for v in metrics.get("per_class_recall", [])]
        lines.append(json.dumps({"step": entry["step"], **short}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_plan(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    records = Path(args.records)
    records.mkdir(parents=True, exist_ok=True)
    start = space = None
    for row, backbone, objective, seed in plan(args):
        name = slug(row, backbone, objective, seed)
        if (records / f"{name}.json").exists():
            continue
        claim_path = records / f"{name}.claim"
        if not claim(claim_path):
            continue
        try:
            if start is None:
                start = load_start(args.start)
            if backbone == "frozen" and space is None:
                began = time.perf_counter()
                space = feature_space(start.model, start.data, args.device)
                if args.val_per_class is not None:
                    space.val = first_per_class(space.val, args.val_per_class)
                print(f"features in {time.perf_counter() - began:.0f} s", flush=True)
            log_path = records / f"{name}.jsonl"
            log_path.unlink(missing_ok=True)
            began, cpu_began = time.perf_counter(), time.process_time()
            outcome = run_one(args, start, space, row, backbone, objective, seed, log_path)
            seconds = time.perf_counter() - began
            cpu_seconds = time.process_time() - cpu_began
            test_set = start.data.test if backbone == "fine-tuned" else space.test
            test = evaluate(outcome.pop("model"), test_set, device=args.device).metrics()
            record = {
                "row": row, "backbone": backbone, "objective": objective, "seed": seed,
                "test": {column: test[column] for column in METRIC_COLUMNS},
                "seconds": seconds, "cpu_seconds": cpu_seconds,
                "machine": machine_line(torch.get_num_threads()),
                "full_steps": args.full_steps if backbone == "fine-tuned" else None,
                "val_per_class": args.val_per_class if backbone == "frozen" else None,
                "command": "python benchmarks/cifar_table3.py " + " ".join(sys.argv[1:]),
                **outcome,
            }  # fmt: skip
            record["trajectory"] = compact_trajectory(log_path) if log_path.exists() else None
            atomic_write_text(records / f"{name}.json", json.dumps(record, indent=1, default=str))
            print(
                f"{row} ({backbone}) {objective} s{seed}: test min {100 * test['min_recall']:.1f}"
                f" mean {100 * test['mean_recall']:.1f} cov {test['min_coverage']:.4f}"
                f", {seconds:.0f} s",
                flush=True,
            )
        finally:
            claim_path.unlink(missing_ok=True)


# -- rendering --------------------------------------------------------------------------------


def load_records(directory: str) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(Path(directory).glob("*.json"))]


def group(records, row, backbone, objective) -> list[dict[str, Any]]:
    """The runs of a row for an objective (an objective-independent row's runs serve all)."""
    per_objective = ROWS[(row, backbone)]
    return [
        r for r in records
        if r["row"] == row and r["backbone"] == backbone
        and (r["objective"] == objective or not per_objective)
    ]  # fmt: skip


def cell(runs: list[dict[str, Any]], objective: str) -> str:
    metric = OBJECTIVE_METRIC[objective]
    text = percent_cell([r["test"][metric] for r in runs])
    if objective == "mean_recall_min_coverage":
        coverage = statistics.fmean(r["test"]["min_coverage"] for r in runs)
        text += f" / {coverage:.3f}"
    return text


def describe_split(start: str) -> str:
    """The start's data split and schedule in words, from its ``config.yaml``."""
    config = yaml.safe_load((Path(start) / "config.yaml").read_text())
    val = config.get("val_per_class")
    head_val = config.get("head_val_per_class")
    val_text = f"{val} validation images per class"
    if head_val is not None and head_val != val:
        val_text = f"{head_val} validation images of class 0 and {val} of each other class"
    counts = config.get("train_counts")
    counts_text = f" (training {counts[0]} ... {counts[-1]} images per class)" if counts else ""
    return (
        f"rho = {config.get('imbalance'):g}, N_1 = {config.get('max_per_class')} before "
        f"{val_text}{counts_text}, pre-trained {config.get('epochs')} epochs with the "
        f"{config.get('lr_schedule', 'cosine')} schedule in {config.get('precision', 'fp32')}"
    )


def render(args: argparse.Namespace) -> None:
    records = load_records(args.records)
    objectives = [o for o in OBJECTIVES if any(r["objective"] == o for r in records)]
    options = "".join(
        f" --{name} {value}"
        for name, value, default in (
            ("start", args.start, START),
            ("records", args.records, RECORDS),
        )
        if value != default
    )
    lines = [
        "# Paper Table 3 on the MiSLAS CIFAR-10-LT start",
        "",
        f"Generated by `python benchmarks/cifar_table3.py{options} --render "
        f"{args.render}` from the run records in `{args.records}/` (one JSON per run, with "
        "its command, config, seed, test and validation metrics, wall time; the "
        "fine-tuned-backbone runs' validation trajectories are the `.jsonl` files beside "
        "them).",
        "",
    ]
    full = [r for r in records if r["backbone"] == "fine-tuned"]
    machines = sorted({r["machine"] for r in records})
    full_steps = sorted({r["full_steps"] for r in full})
    precisions = sorted({r["config"].get("precision", "bf16") for r in full})
    lines += [
        f"Machine: {'; '.join(machines)}. Fine-tuned-backbone rows: "
        f"{sorted({r['full_steps'] for r in full})} whole-model steps, precision "
        f"{sorted({r['config'].get('precision', 'bf16') for r in full})}.",
        "",
        "### Summary: each objective's own metric (test %, mean ± std over seeds)",
        "",
        SUMMARY_MARK,
        "Mean recall s.t. coverage shows mean recall / min coverage (target 0.95 / K = 0.095). "
        "s/run: mean wall seconds of one run (objective-independent rows: once for all "
        "objectives).",
        "",
    ]
    header = "| method | backbone | seeds | " + " | ".join(OBJECTIVES[o] for o in objectives)
    lines += [header + " | s/run |", "|---|---|---|" + "---|" * (len(objectives) + 1)]
    for name, values in PAPER_TABLE3.items():
        cells = []
        for objective in objectives:
            if objective == "mean_recall_min_coverage":
                mean, coverage = values["coverage"]
                cells.append(f"{mean:.1f} / {coverage:.3f}")
            else:
                cells.append(f"{values[objective]:.1f}")
        backbone = "fine-tuned" if "SelMix" in name else "–"
        lines.append(f"| paper: {name} | {backbone} | 3 | " + " | ".join(cells) + " | – |")
    for row, backbone in ROWS:
        present = [r for r in records if r["row"] == row and r["backbone"] == backbone]
        if not present:
            continue
        cells, seeds = [], set()
        for objective in objectives:
            runs = group(records, row, backbone, objective)
            seeds |= {len(runs)} if runs else set()
            cells.append(cell(runs, objective) if runs else "")
        seconds = statistics.fmean(r["seconds"] for r in present)
        seed_text = "/".join(str(s) for s in sorted(seeds))
        lines.append(
            f"| {row} | {backbone} | {seed_text} | " + " | ".join(cells) + f" | {seconds:.0f} |"
        )
    steps_text = ", ".join(map(str, full_steps))
    fine_tuned_text = (
        f"fine-tuned SelMix (defaults) rows run 2000 head-first steps then {steps_text} "
        f"whole-model steps, the paper preset and LA fine-tuning {steps_text} steps, in "
        f"{', '.join(precisions)}"
        if full
        else "no fine-tuned-backbone row has run yet"
    )
    smaller = sorted({r["val_per_class"] for r in records if r.get("val_per_class")})
    smaller_text = (
        f" Frozen rows validated on the first {', '.join(map(str, smaller))} validation "
        "images of each class only (`--val-per-class`)."
        if smaller
        else ""
    )
    lines += [
        "",
        f"CIFAR-10 (JPEG copy), {describe_split(args.start)}; "
        f"start `{Path(args.start).name}`; test set. Rows are the library's defaults unless "
        f"named otherwise; frozen rows run on features computed once; {fine_tuned_text}. "
        'seeds "1/3": 1 seed on some objectives, 3 on the others. The paper\'s rows are '
        "docs/maths.md section 8 (mean of 3 seeds, their start)." + smaller_text,
        "",
        SUMMARY_MARK,
        "",
    ]
    for objective in objectives:
        lines += [
            f"### Objective: {OBJECTIVES[objective]}",
            "",
            "| method | backbone | seeds | mean rec | min rec | H-mean | G-mean | min cov "
            "| selected step | s/run |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row, backbone in ROWS:
            runs = group(records, row, backbone, objective)
            if not runs:
                continue
            metrics = [
                percent_cell([r["test"][m] for r in runs])
                for m in ("mean_recall", "min_recall", "h_mean", "g_mean")
            ]
            coverage = statistics.fmean(r["test"]["min_coverage"] for r in runs)
            steps = [r.get("selected_step") for r in runs]
            step_text = ", ".join(str(s) for s in steps) if steps[0] is not None else "–"
            seconds = statistics.fmean(r["seconds"] for r in runs)
            lines.append(
                f"| {row} | {backbone} | {len(runs)} | " + " | ".join(metrics)
                + f" | {coverage:.4f} | {step_text} | {seconds:.0f} |"
            )  # fmt: skip
        lines.append("")
    text = "\n".join(lines)
    # the summary alone, for the README (benchmarks/write_results.py includes it)
    summary = text.split(SUMMARY_MARK)[1].strip("\n")
    Path(args.render).write_text(text.replace(SUMMARY_MARK + "\n", ""))
    Path(args.render).with_name(Path(args.render).stem + "_summary.md").write_text(summary + "\n")
    print(text)


def describe_start(args: argparse.Namespace) -> None:
    """Per-class recall of the start on its training, validation and test sets: whether a
    gap to the paper's start is under-fitting (low training recall) or generalisation."""
    torch.set_num_threads(args.threads)
    start = load_start(args.start)
    lines = [
        f"Command: `python benchmarks/cifar_table3.py --describe-start {args.describe_start}` "
        f"(start `{args.start}`, evaluated in float32, no augmentation)",
        "",
        "| split | images per class | per-class recall, % (class 0 ... 9) | mean recall | "
        "min recall |",
        "|---|---|---|---|---|",
    ]
    for name in ("train", "val", "test"):
        dataset = getattr(start.data, name)
        metrics = evaluate(start.model, dataset, device=args.device).metrics()
        counts = dataset.class_counts().tolist()
        recall = " ".join(f"{100 * v:.1f}" for v in metrics["per_class_recall"])
        lines.append(
            f"| {name} | {counts[0]} ... {counts[-1]} | {recall} | "
            f"{100 * metrics['mean_recall']:.1f} | {100 * metrics['min_recall']:.1f} |"
        )
    Path(args.describe_start).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    if args.describe_start:
        describe_start(args)
    elif args.render:
        render(args)
    else:
        run_plan(args)


if __name__ == "__main__":
    main()
