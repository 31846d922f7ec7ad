"""SelMix against honest baselines, one table per objective (issue 6).

For each starting model (a ``selmix pretrain --out DIR`` folder; its ``config.yaml`` fixes
the data split) and seed, every method is run for each objective and evaluated on the
test set. Methods:

* ``start``: the starting model as it is;
* ``post-hoc LA``: logit adjustment with tau tuned on the validation set for the objective;
* ``cRT``: the head re-trained from scratch with class-balanced sampling;
* ``LA fine-tuning``: fine-tuning with the logit-adjusted loss;
* ``uniform mixup`` / ``greedy mixup``: feature mixup with the uniform / greedy policy;
* ``SelMix``: the SelMix policy.

All of them run on a frozen backbone (features computed once per starting model and
shared by every run). With ``--full-objectives``, SelMix and the ``--full-methods`` also
run with the backbone fine-tuned (``lr_head / 10``), for the seeds in ``--full-seeds``:
these runs cost minutes each on a CPU, the frozen ones seconds.

    python benchmarks/compare_methods.py --starts benchmarks/models/fmnist_lt_small_cnn_ce_s0 \\
        benchmarks/models/fmnist_lt_small_cnn_ce_s1 benchmarks/models/fmnist_lt_small_cnn_ce_s2 \\
        --seeds 0 1 2 --json runs.json --out table.md
    python benchmarks/compare_methods.py --merge a.json b.json --out table.md

With one starting model every seed fine-tunes it; with several, they pair up with the
seeds in order.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    COVERAGE_TARGET,
    METRIC_COLUMNS,
    METRIC_NAMES,
    coverage_floor,
    feature_space,
    format_metric,
    load_start,
    mean_spread,
    percent_cell,
    run_record,
    write_payload,
)
from selmix.baselines import run_baseline  # noqa: E402
from selmix.engine.evaluate import evaluate  # noqa: E402
from selmix.finetune import finetune  # noqa: E402

OBJECTIVES = {
    "min_recall": "min recall",
    "mean_recall": "mean recall",
    "g_mean": "G-mean",
    "h_mean": "H-mean",
    "mean_recall_min_coverage": "mean recall s.t. min coverage",
    "h_mean_min_coverage": "H-mean s.t. min coverage",
}
# The validation metric whose trajectory shows a run's stability, by objective.
TRACKED = {
    "min_recall": "min_recall",
    "mean_recall": "mean_recall",
    "g_mean": "g_mean",
    "h_mean": "h_mean",
    "mean_recall_min_coverage": "min_coverage",
    "h_mean_min_coverage": "min_coverage",
}
# Methods whose result does not depend on the objective: run once per seed, shown in
# every table.
SHARED = ("start", "cRT", "LA fine-tuning", "uniform mixup")
FROZEN_METHODS = ("start", "post-hoc LA", "cRT", "LA fine-tuning", "uniform mixup",
                  "greedy mixup", "SelMix", "cRT + SelMix")  # fmt: skip
FULL_METHODS = ("SelMix", "LA fine-tuning", "uniform mixup", "greedy mixup")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", nargs="+", default=None, help="selmix pretrain folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES),
                        choices=list(OBJECTIVES))  # fmt: skip
    parser.add_argument("--methods", nargs="*", default=list(FROZEN_METHODS),
                        choices=list(FROZEN_METHODS), help="frozen-backbone methods")  # fmt: skip
    parser.add_argument("--steps", type=int, default=4000, help="frozen-backbone steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr-head", type=float, default=3e-3)
    parser.add_argument("--feedback-every", type=int, default=10)
    parser.add_argument("--gain-scale", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=50.0, help="min-recall multiplier w")
    parser.add_argument("--coverage-alpha", type=float, default=0.95,
                        help="coverage target alpha / K used on validation")  # fmt: skip
    parser.add_argument("--confusion-smoothing", type=float, default=1.0)
    parser.add_argument("--crt-epochs", type=int, default=10)
    parser.add_argument("--la-tau", type=float, default=1.0)
    parser.add_argument("--full-objectives", nargs="*", default=[], choices=list(OBJECTIVES))
    parser.add_argument("--full-methods", nargs="+", default=["SelMix"], choices=FULL_METHODS)
    parser.add_argument("--full-seeds", type=int, nargs="+", default=None,
                        help="seeds of the full-backbone runs (default: the first)")  # fmt: skip
    parser.add_argument("--full-steps", type=int, default=500)
    parser.add_argument("--full-feedback-every", type=int, default=10)
    parser.add_argument(
        "--label", default="",
        help="appended to every method's name in the tables (e.g. ', alpha 1.0' for a "
        "variant run merged with the main one)",
    )  # fmt: skip
    parser.add_argument("--title", default=None, help="the data set's name in the heading")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write every run here")
    parser.add_argument("--out", default=None, help="also write the markdown tables here")
    parser.add_argument(
        "--summary-out", default=None,
        help="also write a one-table summary (the objective's own metric, per method)",
    )  # fmt: skip
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only render the tables of earlier --json files")  # fmt: skip
    return parser.parse_args()


def objective_params(args: argparse.Namespace, objective: str) -> dict[str, Any]:
    if objective == "min_recall":
        return {"rate": args.rate}
    if "coverage" in objective:
        return {"alpha": args.coverage_alpha}
    return {}


def run_mixup(args, model, train, val, objective, policy, seed, full: bool) -> dict[str, Any]:
    result = finetune(
        model, train, val, objective, objective_params=objective_params(args, objective),
        policy=policy, steps=args.full_steps if full else args.steps,
        batch_size=args.batch_size, lr_head=args.lr_head, gain_scale=args.gain_scale,
        feedback_every=args.full_feedback_every if full else args.feedback_every,
        confusion_smoothing=args.confusion_smoothing, frozen_backbone=not full,
        seed=seed, device=args.device, progress=False,
        # the settings these results were measured with, before the defaults of issue 13
        normalize_gain=False, head_first_steps=0,
    )  # fmt: skip
    tracked = TRACKED[objective]
    trajectory = [record["metrics"][tracked] for record in result.history]
    return {"model": result.model, "trajectory": trajectory, "tracked": tracked}


def run_method(args, method, space_or_start, objective, seed, full: bool) -> dict[str, Any]:
    """One method on the feature space (frozen) or on the images (full backbone)."""
    if full:
        data = space_or_start.data
        model, train, val = copy.deepcopy(space_or_start.model), data.train, data.val
    else:
        model, train, val = space_or_start.fresh_model(), space_or_start.train, space_or_start.val
    if method == "cRT + SelMix":
        # SelMix is a fine-tuning method: start it from the cRT head instead of the CE head
        crt = run_baseline(
            "crt", model, train, val, objective, device=args.device,
            epochs=args.crt_epochs, batch_size=args.batch_size, seed=seed,
        )  # fmt: skip
        return run_mixup(args, crt.model, train, val, objective, "selmix", seed, full)
    if method in ("SelMix", "uniform mixup", "greedy mixup"):
        policy = {"SelMix": "selmix", "uniform mixup": "uniform", "greedy mixup": "greedy"}
        return run_mixup(args, model, train, val, objective, policy[method], seed, full)
    name, options = {
        "start": ("start", {}),
        "post-hoc LA": ("posthoc_la", {}),
        "cRT": ("crt", {"epochs": args.crt_epochs, "batch_size": args.batch_size,
                        "seed": seed}),
        "LA fine-tuning": ("la_finetune", {
            "steps": args.full_steps if full else args.steps, "batch_size": args.batch_size,
            "lr_head": args.lr_head, "tau": args.la_tau, "frozen_backbone": not full,
            "seed": seed,
        }),
    }[method]  # fmt: skip
    result = run_baseline(name, model, train, val, objective, device=args.device, **options)
    run = {"model": result.model, "trajectory": None}
    if name == "posthoc_la":
        run["tau"] = result.details["tau"]
    return run


def main() -> None:
    args = parse_args()
    if args.merge:
        payloads = [json.loads(Path(path).read_text()) for path in args.merge]
        runs = [run for payload in payloads for run in payload["runs"]]
        meta = payloads[0]["meta"]
        meta["seconds"] = sum(payload["meta"]["seconds"] for payload in payloads)
        meta["commands"] = [c for payload in payloads for c in payload["meta"]["commands"]]
        meta["starts"] = sorted({name for p in payloads for name in p["meta"]["starts"]})
        # the fine-tuned-backbone settings of the header come from a file that has such runs
        for payload in payloads:
            if any(run["backbone"] == "fine-tuned" for run in payload["runs"]):
                meta["full_settings"] = payload["meta"]["settings"]
                break
        render(runs, meta, args.out)
        if args.summary_out:
            write_summary(runs, meta, args.summary_out)
        return
    if not args.starts:
        raise SystemExit("--starts is required (unless --merge)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.starts) not in (1, len(args.seeds)):
        raise SystemExit(
            f"--starts must be one folder or one per seed ({len(args.seeds)}), "
            f"got {len(args.starts)}"
        )
    starts = args.starts * len(args.seeds) if len(args.starts) == 1 else args.starts
    full_seeds = args.full_seeds if args.full_seeds is not None else args.seeds[:1]
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {}
    for directory, seed in zip(starts, args.seeds, strict=True):
        if directory not in loaded:
            start = load_start(directory)
            extract_started = time.perf_counter()
            loaded[directory] = (start, feature_space(start.model, start.data, args.device))
            print(f"{start.name}: features in {time.perf_counter() - extract_started:.1f} s",
                  flush=True)  # fmt: skip
        start, space = loaded[directory]
        plan = [(objective, method, False) for objective in args.objectives
                for method in args.methods]  # fmt: skip
        if seed in full_seeds:
            plan += [(objective, method, True) for objective in args.full_objectives
                     for method in args.full_methods]  # fmt: skip
        done_shared: dict[tuple[str, bool], dict[str, Any]] = {}
        for objective, method, full in plan:
            key = (method, full)
            run_started = time.perf_counter()
            if method in SHARED and key in done_shared:
                run = dict(done_shared[key])
            else:
                outcome = run_method(args, method, start if full else space, objective, seed,
                                     full)  # fmt: skip
                test_set = start.data.test if full else space.test
                metrics = evaluate(outcome.pop("model"), test_set, device=args.device).metrics()
                run = {
                    "start": start.name, "seed": seed, "method": method + args.label,
                    "backbone": "fine-tuned" if full else "frozen",
                    "test": {column: metrics[column] for column in METRIC_COLUMNS},
                    "seconds": time.perf_counter() - run_started, **outcome,
                }  # fmt: skip
                if method in SHARED:
                    done_shared[key] = run
            run["objective"] = objective
            runs.append(run)
            test = run["test"]
            print(
                f"seed {seed} {OBJECTIVES[objective]} | {method} ({run['backbone']}): "
                f"mean {test['mean_recall']:.3f} min {test['min_recall']:.3f} "
                f"cov {test['min_coverage']:.4f}, {run['seconds']:.1f} s",
                flush=True,
            )
    first = next(iter(loaded.values()))[0]
    meta = {
        "title": args.title or first.config["data"],
        "starts": sorted({Path(d).name for d in starts}),
        "start_config": {
            k: first.config.get(k)
            for k in (
                "model",
                "imbalance",
                "max_per_class",
                "val_per_class",
                "epochs",
                "loss",
                "mixup",
            )
        },  # fmt: skip
        "settings": {
            k: getattr(args, k)
            for k in (
                "steps",
                "batch_size",
                "lr_head",
                "feedback_every",
                "gain_scale",
                "rate",
                "coverage_alpha",
                "confusion_smoothing",
                "crt_epochs",
                "la_tau",
                "full_steps",
                "full_feedback_every",
            )
        },  # fmt: skip
        "test_size": len(first.data.test),
        "num_classes": int(first.data.test.num_classes),
        **run_record(started),
    }
    if args.json:
        write_payload(args.json, meta, runs)
    render(runs, meta, args.out)


def write_summary(runs: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    """One row per method, one column per objective: the objective's own test metric."""
    methods: list[tuple[str, str]] = []
    for run in runs:
        key = (run["method"], run["backbone"])
        if key not in methods:
            methods.append(key)
    objectives = [o for o in OBJECTIVES if any(r["objective"] == o for r in runs)]
    names = []
    for objective in objectives:
        column = METRIC_NAMES[_objective_column(objective)]
        names.append(f"{column} / min cov (s.t. coverage)" if "coverage" in objective else column)
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(objectives)]
    for method, backbone in methods:
        cells = []
        for objective in objectives:
            column = _objective_column(objective)
            group = [
                r for r in runs
                if r["objective"] == objective and r["method"] == method
                and r["backbone"] == backbone
            ]  # fmt: skip
            if not group:
                cells.append("")
                continue
            text = percent_cell([r["test"][column] for r in group])
            if "coverage" in objective:
                coverage = _mean(group, "min_coverage")
                text += f" / {coverage:.4f}"
            cells.append(text)
        label = method if backbone == "frozen" else f"{method}, {backbone} backbone"
        seeds = {
            len({r["seed"] for r in runs if (r["method"], r["backbone"]) == (method, backbone)})
        }
        if seeds == {1}:
            label += " (1 seed)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in runs})
    lines += [
        "",
        f"{meta['title']}: test set, %, mean ± std over seeds {seeds} (min coverage: seed "
        "mean). Backbone frozen unless the row says otherwise. Full tables, commands and "
        "settings: docs/RESULTS.md.",
    ]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")


def _objective_column(objective: str) -> str:
    return (
        "mean_recall"
        if objective == "mean_recall_min_coverage"
        else ("h_mean" if objective == "h_mean_min_coverage" else objective)
    )


def render(runs: list[dict[str, Any]], meta: dict[str, Any], out: str | None) -> None:
    settings = meta["settings"]
    full = meta.get("full_settings", settings)
    lines = [
        f"Data: {meta['title']}; starting model(s) {', '.join(meta['starts'])} "
        f"({meta['start_config']}). Test set, mean ± std over seeds, % (min coverage as a "
        f"fraction). Frozen-backbone runs: {settings['steps']} steps of batch "
        f"{settings['batch_size']}, lr_head {settings['lr_head']}, feedback every "
        f"{settings['feedback_every']} steps, s = {settings['gain_scale']}, min-recall w = "
        f"{settings['rate']}, coverage alpha = {settings['coverage_alpha']} (target alpha/K "
        f"on validation), confusion smoothing {settings['confusion_smoothing']}; cRT "
        f"{settings['crt_epochs']} epochs; LA tau {settings['la_tau']}. Fine-tuned-backbone "
        f"runs: {full['full_steps']} steps, feedback every "
        f"{full['full_feedback_every']}, lr_backbone = lr_head / 10. "
        f"Machine: {meta['machine']}; wall time {meta['seconds']:.0f} s.",
        "",
        "Command(s):",
        "",
        *[f"    {command}" for command in meta["commands"]],
    ]
    objectives = [o for o in OBJECTIVES if any(r["objective"] == o for r in runs)]
    for objective in objectives:
        column = _objective_column(objective)
        chosen = [r for r in runs if r["objective"] == objective]
        rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for run in chosen:
            rows.setdefault((run["method"], run["backbone"]), []).append(run)
        ranking = {key: _rank(objective, column, group) for key, group in rows.items()}
        top = max(ranking.values())
        best = {key for key, rank in ranking.items() if rank == top and rank[0]}
        lines += [
            "",
            f"### Objective: {OBJECTIVES[objective]}",
            "",
            "| method | backbone | seeds | "
            + " | ".join(METRIC_NAMES[c] for c in METRIC_COLUMNS)
            + " | worst val "
            + METRIC_NAMES[TRACKED[objective]]
            + " | s/run |",
            "|---|---|---|" + "---|" * (len(METRIC_COLUMNS) + 2),
        ]
        for (method, backbone), group in rows.items():
            cells = []
            for metric in METRIC_COLUMNS:
                text = format_metric(metric, [r["test"][metric] for r in group])
                if metric == column and (method, backbone) in best:
                    text = f"**{text}**"
                cells.append(text)
            dips = [
                min(r["trajectory"][1:] or r["trajectory"])
                for r in group
                if r["trajectory"] and r.get("tracked") == TRACKED[objective]
            ]
            dip = "–" if not dips else (format_metric(TRACKED[objective], dips))
            label = method
            if method == "post-hoc LA":
                label += " (tau " + ", ".join(f"{r['tau']:g}" for r in group) + ")"
            seconds = sum(r["seconds"] for r in group) / len(group)
            lines.append(
                f"| {label} | {backbone} | {len(group)} | "
                + " | ".join(cells)
                + f" | {dip} | {seconds:.1f} |"
            )
        lines += _verdicts(objective, column, rows)
        if "coverage" in objective:
            mean, low, below = coverage_floor(
                meta["test_size"] // meta["num_classes"], meta["num_classes"]
            )
            lines.append(
                f"- For scale: a classifier whose predictions are exactly balanced (coverage "
                f"1/K for every class in the population) scores on average {mean:.4f} test "
                f"min coverage on a {meta['test_size']}-image test set (5th percentile "
                f"{low:.4f}; below {COVERAGE_TARGET} in {100 * below:.0f}% of test sets), from "
                "the sampling noise of the test set alone."
            )
    table = "\n".join(lines)
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")


def _mean(group: list[dict[str, Any]], metric: str) -> float:
    return sum(r["test"][metric] for r in group) / len(group)


def _rank(objective: str, column: str, group: list[dict[str, Any]]) -> tuple:
    """Sort key of a method on an objective: the seed-mean metric; under a coverage
    constraint, meeting the target on average comes first, then the metric (or, short of
    the target, the coverage)."""
    if "coverage" not in objective:
        return (True, _mean(group, column))
    coverage = _mean(group, "min_coverage")
    if coverage >= COVERAGE_TARGET:
        return (True, _mean(group, column))
    return (False, coverage)


def _verdicts(objective: str, column: str, rows: dict) -> list[str]:
    """Plain statements: SelMix against the start and against the best baseline."""
    start = rows.get(("start", "frozen"))
    if not start:
        return []
    lines = [""]

    for backbone in ("frozen", "fine-tuned"):
        selmix = rows.get(("SelMix", backbone))
        if not selmix:
            continue
        others = {k: g for k, g in rows.items() if k[0] != "SelMix"}
        best_key = max(others, key=lambda k: _rank(objective, column, others[k]))
        gain = 100 * (_mean(selmix, column) - _mean(start, column))
        margin = 100 * (_mean(selmix, column) - _mean(others[best_key], column))
        spread = mean_spread([r["test"][column] for r in selmix])
        lines.append(
            f"- SelMix ({backbone}): {METRIC_NAMES[column]} {spread} ({gain:+.1f} points over "
            f"the start; {margin:+.1f} against the best other method, "
            f"{best_key[0]} ({best_key[1]}))."
        )
        if "coverage" in objective:
            coverage = [r["test"]["min_coverage"] for r in selmix]
            met = min(coverage) >= COVERAGE_TARGET
            lines.append(
                f"  Test min coverage {format_metric('min_coverage', coverage)}, lowest seed "
                f"{min(coverage):.4f}: target >= {COVERAGE_TARGET} "
                f"{'met on every seed' if met else 'NOT met on every seed'}; mean recall "
                f"{100 * _mean(selmix, 'mean_recall'):.1f} against the start's "
                f"{100 * _mean(start, 'mean_recall'):.1f}."
            )
    return lines


if __name__ == "__main__":
    main()
