"""Semi-supervised SelMix on long-tailed Fashion-MNIST with the small CNN (issue 4).

For each unlabelled distribution and seed (labelled N_1 = 1500, rho_l = 100; unlabelled
M_1 = 3000 with rho_u = 100 "matched" or rho_u = 1 "uniform", M_1 = 30 with rho_u = 1/100
"inverted", or every remaining image "unknown"; a balanced validation set; the official
test set):

1. pre-train ``small_cnn`` with FixMatch(LA) and with FixMatch (cached under ``--cache``);
2. fine-tune copies of the FixMatch(LA) model with SelMix for min recall and for mean recall
   s.t. min coverage, once with unlabelled x2 (pseudo-labelled, refreshed at every
   feedback step) and once with labelled pairs only; and the FixMatch model with SelMix
   (unlabelled x2) for both objectives;
3. print a markdown table of test mean / min recall and min coverage, before and after,
   with the validation trajectory of the min recall (stability) and the pseudo-label
   accuracy, and check the issue's targets.

SelMix settings. The default trains the head only, on features computed once
(``--backbone frozen``), at the paper's semi-supervised lr_W = 3e-4 with a feedback step
every 10 steps: about 10 s of CPU per run, and a stable validation trajectory. With the
backbone fine-tuned (``--backbone finetune``, lr_g = lr_W / 10) every feedback step
re-extracts the validation set and the unlabelled pool, which costs about 100 s of CPU per
run at ``--steps 500 --feedback-every 25 --lr-head 1e-4``; with lr_W = 3e-4, or with a
feedback step only every 50 steps, the min-recall policy piles all pairs onto the current
worst class and the validation min recall swings between 0 and 0.4 from one feedback step
to the next (MATH.md section 5). On the matched setting both reach the same test min
recall (about 56%).

    python benchmarks/semisup_fmnist.py --distributions matched uniform inverted \\
        --seeds 0 --threads 2 --out semisup_fmnist.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from selmix.data import (
    UNLABELLED_DISTRIBUTIONS,
    load_fashion_mnist,
    semi_supervised_data,
    semi_supervised_split,
    unlabelled_distribution,
)
from selmix.evaluate import evaluate
from selmix.finetune import finetune
from selmix.models import create_model
from selmix.semisup import (
    FixMatchConfig,
    fixmatch_pretrain,
    pseudo_label_report,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
OBJECTIVES = {"min recall": "min_recall", "mean recall s.t. coverage": "mean_recall_min_coverage"}
STARTS = {"FixMatch(LA)": "logit_adjusted", "FixMatch": "ce"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="Fashion-MNIST IDX folder")
    parser.add_argument(
        "--distributions", nargs="+", default=["matched", "uniform", "inverted"],
        choices=list(UNLABELLED_DISTRIBUTIONS),
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--labelled-max", type=int, default=1500)
    parser.add_argument("--imbalance", type=float, default=100.0, help="rho_l")
    parser.add_argument("--val-per-class", type=int, default=500)
    # FixMatch pre-training
    parser.add_argument(
        "--epochs", type=float, default=6.5,
        help="FixMatch length in passes over the labelled set (steps = epochs * N / B)",
    )  # fmt: skip
    parser.add_argument("--fixmatch-batch", type=int, default=16, help="labelled B")
    parser.add_argument("--mu", type=int, default=7, help="unlabelled-to-labelled ratio")
    parser.add_argument("--fixmatch-lr", type=float, default=0.03)
    # SelMix fine-tuning
    parser.add_argument(
        "--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES),
        help="SelMix objectives to run",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=1000, help="SelMix steps")
    parser.add_argument("--batch-size", type=int, default=64, help="SelMix pairs per step")
    parser.add_argument("--lr-head", type=float, default=3e-4)
    parser.add_argument("--rate", type=float, default=50.0, help="min-recall multiplier w")
    parser.add_argument(
        "--coverage-alpha", type=float, default=0.95,
        help="coverage target alpha / K of the constrained objective (MATH.md: 0.95)",
    )  # fmt: skip
    parser.add_argument("--gain-scale", type=float, default=10.0)
    parser.add_argument(
        "--confusion-smoothing", type=float, default=0.0,
        help="pseudo-count added to the validation confusion counts (0: the paper); a "
        "class with zero validation recall has zero gain without it",
    )  # fmt: skip
    parser.add_argument("--feedback-every", type=int, default=10)
    parser.add_argument(
        "--backbone", choices=["frozen", "finetune"], default="frozen",
        help="SelMix trains the head only on cached features (default), or also the "
        "backbone at lr_head / 10 (slower; see the module docstring for settings)",
    )  # fmt: skip
    parser.add_argument(
        "--selmix-pool", type=int, default=4000,
        help="SelMix draws x2 from a seeded random subset of at most this many unlabelled "
        "images (pseudo-labelling the whole pool at every feedback step dominates the cost)",
    )  # fmt: skip
    parser.add_argument(
        "--no-fixmatch-selmix", action="store_true",
        help="skip SelMix from the FixMatch (no LA) start",
    )  # fmt: skip
    parser.add_argument(
        "--no-fixmatch-start", action="store_true",
        help="do not pre-train the FixMatch (no LA) start at all (implies --no-fixmatch-selmix)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--cache", default=".cache/benchmarks")
    parser.add_argument("--log-dir", default=None, help="per-run JSON-lines feedback logs")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--json", default=None, help="write every run's results here")
    parser.add_argument(
        "--merge", nargs="+", default=None,
        help="only print the across-seed summary of earlier --json files",
    )  # fmt: skip
    return parser.parse_args()


def pretrained(
    args: argparse.Namespace, data: Any, distribution: str, seed: int, loss: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """FixMatch / FixMatch(LA) model of one setting, trained once and cached."""
    steps = max(1, math.ceil(args.epochs * len(data.labelled) / args.fixmatch_batch))
    config = FixMatchConfig(
        steps=steps, batch_size=args.fixmatch_batch, mu=args.mu, loss=loss,
        lr=args.fixmatch_lr, eval_every=max(1, steps // 4), seed=seed, progress=False,
    )  # fmt: skip
    name = (
        f"fmnist_semisup_{distribution}_n{args.labelled_max}_r{args.imbalance:g}"
        f"_v{args.val_per_class}_{loss}_s{steps}_b{args.fixmatch_batch}_mu{args.mu}"
        f"_lr{args.fixmatch_lr:g}_seed{seed}.pt"
    )
    path = Path(args.cache) / name
    torch.manual_seed(seed)
    model = create_model("small_cnn", 10, in_channels=1)
    info: dict[str, Any] = {"steps": steps, "cached": path.exists()}
    if path.exists():
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["state_dict"])
        info.update(state["info"])
        return model.eval(), info
    started, cpu = time.perf_counter(), time.process_time()

    def report(record: dict[str, Any]) -> None:
        val = record["val"]
        print(
            f"  {loss} step {record['step']}/{steps}: loss {record['loss']:.3f}, mask "
            f"{record['mask_rate']:.2f}, val mean {val['mean_recall']:.3f} min "
            f"{val['min_recall']:.3f}, {record['seconds']:.0f} s",
            flush=True,
        )

    fixmatch_pretrain(model, data.labelled, data.unlabelled, data.val, config, callback=report)
    info["seconds"] = time.perf_counter() - started
    info["cpu_seconds"] = time.process_time() - cpu
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    return model.eval(), info


def test_metrics(model: torch.nn.Module, test: Any) -> dict[str, Any]:
    return evaluate(model, test).metrics()


def main() -> None:
    args = parse_args()
    if args.merge:
        runs = [run for path in args.merge for run in json.loads(Path(path).read_text())]
        table = summarize(runs)
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cpu_started = time.process_time()
    full = load_fashion_mnist(args.data, train=True)
    test = load_fashion_mnist(args.data, train=False)
    runs: list[dict[str, Any]] = []
    for distribution in args.distributions:
        for seed in args.seeds:
            setting_started = time.perf_counter()
            split = semi_supervised_split(
                full.labels, args.labelled_max, args.imbalance,
                **unlabelled_distribution(distribution, args.imbalance),
                val_per_class=args.val_per_class, seed=seed,
            )  # fmt: skip
            data = semi_supervised_data(full, split)
            print(f"== {distribution}, seed {seed}\n{split.describe()}", flush=True)
            pool = data.unlabelled
            if len(pool) > args.selmix_pool:
                generator = torch.Generator().manual_seed(seed)
                keep = torch.randperm(len(pool), generator=generator)[: args.selmix_pool]
                pool = pool.subset(keep.sort().values)
            starts = {}
            for start_name, loss in STARTS.items():
                if args.no_fixmatch_start and start_name == "FixMatch":
                    continue
                model, info = pretrained(args, data, distribution, seed, loss)
                starts[start_name] = model
                metrics = test_metrics(model, test)
                pseudo = pseudo_label_report(model, data.unlabelled)
                runs.append(
                    {
                        "distribution": distribution, "seed": seed, "start": start_name,
                        "method": "start", "pairs": "-", "objective": "-",
                        "test": metrics, "pseudo_label_accuracy": pseudo.get("accuracy"),
                        "seconds": info.get("seconds"), "cpu_seconds": info.get("cpu_seconds"),
                        "pretrain_steps": info["steps"], "cached": info["cached"],
                    }
                )  # fmt: skip
                print(
                    f"{start_name}: test mean {metrics['mean_recall']:.3f} min "
                    f"{metrics['min_recall']:.3f} cov {metrics['min_coverage']:.4f}, pseudo-"
                    f"label accuracy {pseudo.get('accuracy', float('nan')):.3f}"
                    + (" (cached)" if info["cached"] else f", {info['seconds']:.0f} s"),
                    flush=True,
                )
            plan = [("FixMatch(LA)", "unlabelled"), ("FixMatch(LA)", "labelled")]
            if not (args.no_fixmatch_selmix or args.no_fixmatch_start):
                plan.append(("FixMatch", "unlabelled"))
            for start_name, pairs in plan:
                for objective_name in args.objectives:
                    objective = OBJECTIVES[objective_name]
                    model = copy.deepcopy(starts[start_name])
                    if objective == "min_recall":
                        params = {"rate": args.rate}
                    else:
                        params = {"alpha": args.coverage_alpha}
                    log_path = None
                    if args.log_dir:
                        log_path = str(
                            Path(args.log_dir) / f"{distribution}_s{seed}_{STARTS[start_name]}_"
                            f"{objective}_{pairs}.jsonl"
                        )
                        Path(log_path).unlink(missing_ok=True)
                    run_started, run_cpu = time.perf_counter(), time.process_time()
                    result = finetune(
                        model, data.labelled, data.val, objective,
                        unlabelled=pool if pairs == "unlabelled" else None,
                        objective_params=params, steps=args.steps, batch_size=args.batch_size,
                        lr_head=args.lr_head, gain_scale=args.gain_scale,
                        confusion_smoothing=args.confusion_smoothing,
                        feedback_every=args.feedback_every,
                        frozen_backbone=args.backbone == "frozen", seed=seed, progress=False,
                        log_path=log_path,
                    )  # fmt: skip
                    metrics = result.metrics(test)
                    trajectory = [r["metrics"]["min_recall"] for r in result.history]
                    coverage = [r["metrics"]["min_coverage"] for r in result.history]
                    accuracy = [r.get("pseudo_label_accuracy") for r in result.history]
                    run = {
                        "distribution": distribution, "seed": seed, "start": start_name,
                        "method": "SelMix", "pairs": pairs, "objective": objective_name,
                        "test": metrics, "val_min_recall": trajectory,
                        "val_min_coverage": coverage, "pseudo_label_accuracy_trajectory": accuracy,
                        "pseudo_label_accuracy": accuracy[-1],
                        "seconds": time.perf_counter() - run_started,
                        "cpu_seconds": time.process_time() - run_cpu,
                    }  # fmt: skip
                    runs.append(run)
                    print(
                        f"{start_name} + SelMix {objective_name} ({pairs} x2): test mean "
                        f"{metrics['mean_recall']:.3f} min {metrics['min_recall']:.3f} cov "
                        f"{metrics['min_coverage']:.4f}; val min recall "
                        + " ".join(f"{v:.2f}" for v in trajectory)
                        + f"; val min coverage at the end {coverage[-1]:.4f}"
                        + f"; {run['seconds']:.0f} s",
                        flush=True,
                    )
            print(
                f"== {distribution}, seed {seed}: {time.perf_counter() - setting_started:.0f} s",
                flush=True,
            )
    table = render(args, runs, time.perf_counter() - started, time.process_time() - cpu_started)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


def _spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.pstdev(values):.{digits}f}"


def summarize(runs: list[dict[str, Any]]) -> str:
    """Mean ± std over seeds of each (distribution, start, fine-tuning, objective) row."""
    starts = {(r["distribution"], r["seed"], r["start"]): r for r in runs if r["method"] == "start"}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        tuning = "none (start)" if run["method"] == "start" else f"SelMix, {run['pairs']} x2"
        key = (run["distribution"], run["start"], tuning, run["objective"])
        groups.setdefault(key, []).append(run)
    lines = [
        "| distribution | start | fine-tuning | objective | seeds | mean rec | min rec | "
        "min cov | Δ min rec | lowest seed's min cov |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (distribution, start, tuning, objective), group in groups.items():
        seeds = sorted(r["seed"] for r in group)
        deltas = [
            r["test"]["min_recall"] - starts[(distribution, r["seed"], start)]["test"]["min_recall"]
            for r in group
        ]
        coverage = [r["test"]["min_coverage"] for r in group]
        lines.append(
            f"| {distribution} | {start} | {tuning} | {objective} | "
            f"{', '.join(map(str, seeds))} | {_spread([r['test']['mean_recall'] for r in group])} "
            f"| {_spread([r['test']['min_recall'] for r in group])} | "
            f"{_spread(coverage, 1.0, 4)} | "
            + ("" if tuning == "none (start)" else f"{_spread(deltas)}")
            + f" | {min(coverage):.4f} |"
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def render(args: argparse.Namespace, runs: list[dict[str, Any]], wall: float, cpu: float) -> str:
    """The markdown table, the per-setting target checks and the settings used."""
    lines = [
        "Semi-supervised Fashion-MNIST-LT (labelled N_1 = "
        f"{args.labelled_max}, rho_l = {args.imbalance:g}; {args.val_per_class} validation "
        f"images per class), small_cnn, test set (10,000 images), %. SelMix: {args.steps} "
        f"steps of {args.batch_size} pairs, lr_head {args.lr_head:g}, min-recall w = "
        f"{args.rate:g}, coverage alpha = {args.coverage_alpha:g}, s = {args.gain_scale:g}, "
        f"feedback every {args.feedback_every} steps, confusion smoothing "
        f"{args.confusion_smoothing:g}"
        + (", frozen backbone" if args.backbone == "frozen" else ", backbone at lr_head / 10")
        + f". FixMatch: {args.epochs:g} labelled epochs, B = {args.fixmatch_batch}, "
        f"mu = {args.mu}, lr {args.fixmatch_lr:g}.",
        "",
        "| distribution | seed | start | fine-tuning | objective | mean rec | min rec "
        "| min cov | Δ min rec | val min rec (first / worst / last) | pseudo-label acc | time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    starts = {(r["distribution"], r["seed"], r["start"]): r for r in runs if r["method"] == "start"}
    for run in runs:
        test = run["test"]
        start = starts[(run["distribution"], run["seed"], run["start"])]
        if run["method"] == "start":
            tuning, delta, trajectory = "none (start)", "", ""
        else:
            tuning = f"SelMix, {run['pairs']} x2"
            delta = f"{100 * (test['min_recall'] - start['test']['min_recall']):+.1f}"
            values = run["val_min_recall"]
            trajectory = f"{_pct(values[0])} / {_pct(min(values))} / {_pct(values[-1])}"
        seconds = run.get("seconds")
        lines.append(
            f"| {run['distribution']} | {run['seed']} | {run['start']} | {tuning} | "
            f"{run['objective']} | {_pct(test['mean_recall'])} | {_pct(test['min_recall'])} | "
            f"{test['min_coverage']:.3f} | {delta} | {trajectory} | "
            f"{_pct(run['pseudo_label_accuracy'])} | "
            f"{'cached' if run.get('cached') else ('-' if seconds is None else f'{seconds:.0f}')}"
            " |"
        )
    lines += ["", "Targets (SelMix from FixMatch(LA), unlabelled x2):", ""]
    for (distribution, seed, start_name), start in starts.items():
        if start_name != "FixMatch(LA)":
            continue
        for run in runs:
            same = (run["distribution"], run["seed"], run["start"]) == (
                distribution, seed, start_name,
            )  # fmt: skip
            if not same or run["method"] != "SelMix" or run["pairs"] != "unlabelled":
                continue
            if run["objective"] == "min recall":
                gain = 100 * (run["test"]["min_recall"] - start["test"]["min_recall"])
                verdict = "met" if gain >= 10 else "NOT met"
                lines.append(
                    f"- {distribution}, seed {seed}: min recall +{gain:.1f} points "
                    f"(target >= +10): {verdict}"
                    if gain >= 0
                    else f"- {distribution}, seed {seed}: min recall {gain:.1f} points "
                    f"(target >= +10): {verdict}"
                )
            else:
                coverage = run["test"]["min_coverage"]
                verdict = "met" if coverage >= 0.095 else "NOT met"
                lines.append(
                    f"- {distribution}, seed {seed}: test min coverage {coverage:.4f} "
                    f"(target >= 0.095): {verdict}; validation min coverage at the end "
                    f"{run['val_min_coverage'][-1]:.4f}"
                )
    lines += ["", f"Wall time {wall:.0f} s, process CPU time {cpu:.0f} s, "
              f"torch threads {torch.get_num_threads()}."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
