"""Robustness suite: does a settings preset lift the objective on data nobody tuned it for?

Runs SelMix with one preset on every case of ``benchmarks/_robust_cases.py`` (14 cases:
Fashion-MNIST-LT, CIFAR-10-LT (JPEG copy) and an ImageFolder PNG tree of
Fashion-MNIST-LT; rho 10/100/200; standard, reversed, shuffled and alphabetical class
order; cross-entropy, logit-adjusted and mixup starts; 20/100/500 validation images per
class; backbone frozen and fine-tuned; min recall, H-mean and mean recall s.t. coverage).
Starting models are pre-trained once and cached (see ``_robust_cases.py``).

For every case it reports start -> selected and start -> last on test (the case's
objective metric, min and mean recall), the step the library selected (``select``: the
best validation score over the feedback steps, the start included, or the last step),
the lowest validation score after the first feedback step, and the wall time; then the
worst case and the share of cases improved. Settings reach :func:`selmix.finetune` as a
library preset and keyword overrides only; the fine-tuned cases run their backbone for
300 steps of B = 64 (after the head-first phase, if any) under every preset.

    PYTHONPATH=src python benchmarks/robustness.py --preset defaults
    PYTHONPATH=src python benchmarks/robustness.py --preset paper --cases c10,tuned

Writes ``benchmarks/records/robustness_<preset>.json`` and prints a markdown table;
``--compare A.json B.json`` prints two saved presets side by side.
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

import selmix  # noqa: E402
from _common import feature_space  # noqa: E402
from _robust_cases import CASES, Case, load_case_data, load_start  # noqa: E402
from selmix.engine.evaluate import evaluate  # noqa: E402

# Suite presets: the library preset (FinetuneConfig.preset) the run starts from, then keyword
# overrides, "common" for every case and "frozen" / "tuned" by backbone mode (the case sets
# frozen_backbone). "defaults" and "paper" are the library's own; the others are the
# ablations of docs/DESIGN.md ("Robust defaults"), measured on the paper's settings (1000
# steps then) with the best step selected.
PRESETS: dict[str, dict[str, Any]] = {
    "defaults": {"library": "defaults", "common": {}, "frozen": {}, "tuned": {}},
    "paper": {"library": "paper", "common": {}, "frozen": {}, "tuned": {}},
}
_OLD_PAPER = {"steps": 1000, "select": "best"}  # the library defaults before issue 13
PRESETS["readme"] = {
    "library": "paper",
    "common": {**_OLD_PAPER, "feedback_every": 10, "gain_scale": 3.0, "confusion_smoothing": 1.0},
    "frozen": {"steps": 4000},
    "tuned": {},
}
PRESETS["soft-stabilised"] = {
    "library": "paper",
    "common": {
        **_OLD_PAPER, "soft_confusion": True, "normalize_gain": True, "gain_scale": 3.0,
        "uniform_mix": 0.1, "multiplier_step": 0.5, "feedback_every": 10,
    },
    "frozen": {"steps": 2000},
    "tuned": {"head_first_steps": 2000},
}  # fmt: skip

# CPU budget of the fine-tuned-backbone cases, applied under every preset: 300 steps of
# B = 64 with the backbone training (after the head-first phase, if any; a SelMix step
# forwards 2B images through the backbone; 1000 steps of B = 128 take ~8 min on a loaded
# 2-core machine).
TUNED_BACKBONE_STEPS = 300
TUNED_BATCH = 64


def _ablation(base: str, **changes: Any) -> dict[str, Any]:
    preset = copy.deepcopy(PRESETS[base])
    preset["common"].update(changes)
    return preset


def _frozen_steps(base: str, steps: int) -> dict[str, Any]:
    preset = copy.deepcopy(PRESETS[base])
    preset["frozen"]["steps"] = steps
    return preset


# one part of a preset removed (or replaced) at a time
PRESETS.update(
    {
        "soft-stabilised-hard": _ablation("soft-stabilised", soft_confusion=False),
        "soft-stabilised-smoothing": _ablation(
            "soft-stabilised", soft_confusion=False, confusion_smoothing=1.0
        ),
        "soft-stabilised-no_uniform": _ablation("soft-stabilised", uniform_mix=0.0),
        "soft-stabilised-no_dual": _ablation("soft-stabilised", multiplier_step=1.0),
        "soft-stabilised-raw_gain": _ablation("soft-stabilised", normalize_gain=False),
        "soft-stabilised-E50": _ablation("soft-stabilised", feedback_every=50),
        "defaults-soft": _ablation("defaults", soft_confusion=True, confusion_smoothing=0.0),
        "defaults-raw_gain": _ablation("defaults", normalize_gain=False),
        "defaults-2000": _frozen_steps("defaults", 2000),
    }
)

OBJECTIVE_METRIC = {
    "min_recall": "min_recall",
    "h_mean": "h_mean",
    "mean_recall_min_coverage": "mean_recall",
}


def score(objective: str, metrics: dict[str, Any], alpha: float = 0.95) -> float:
    """The validation objective as a fixed function of C (used to select the step).

    Min recall and H-mean are the metrics themselves. Mean recall s.t. coverage is the
    mean recall minus the share of the coverage target that is missed,
    ``mean_recall - max(0, 1 - K * min_coverage / alpha)``: a model that meets the target
    always beats one that misses it by more than its mean-recall lead. (Not the
    Lagrangian of docs/maths.md section 2: that rewards coverage below the target linearly and
    scored a model with a class at 0 coverage like a feasible one with the same mean
    recall.)
    """
    if objective != "mean_recall_min_coverage":
        return float(metrics[OBJECTIVE_METRIC[objective]])
    num_classes = len(metrics["per_class_coverage"])
    shortfall = max(0.0, 1.0 - num_classes * float(metrics["min_coverage"]) / alpha)
    return float(metrics["mean_recall"]) - shortfall


def summary(metrics: dict[str, Any], objective: str) -> dict[str, float]:
    return {
        "objective": score(objective, metrics),
        "min_recall": float(metrics["min_recall"]),
        "mean_recall": float(metrics["mean_recall"]),
        "h_mean": float(metrics["h_mean"]),
        "min_coverage": float(metrics["min_coverage"]),
    }


def settings_for(preset: str, case: Case) -> dict[str, Any]:
    """The keyword settings of :func:`selmix.finetune` for a case under a suite preset."""
    table = PRESETS[preset]
    mode = "frozen" if case.frozen else "tuned"
    settings = {
        "preset": table["library"], **table["common"], **table[mode],
        "frozen_backbone": case.frozen,
    }  # fmt: skip
    if not case.frozen:
        head_first = selmix.FinetuneConfig.from_dict(settings).head_first
        settings.update(steps=head_first + TUNED_BACKBONE_STEPS, batch_size=TUNED_BATCH)
        settings.setdefault("head_first_steps", head_first)
    return settings


_DATA: dict[Any, Any] = {}


def run_case(case: Case, preset: str, seed: int = 0) -> dict[str, Any]:
    spec = case.start
    if spec not in _DATA:
        _DATA[spec] = load_case_data(spec)
    data = _DATA[spec]
    val = data.val_subset(case.val_per_class)
    model = load_start(spec)
    started = time.perf_counter()
    if case.frozen:
        # one feature extraction for the run and its test evaluations
        space = feature_space(model, argparse.Namespace(train=data.train, val=val, test=data.test))
        model, train, val, test = space.fresh_model(), space.train, space.val, space.test
    else:
        train, test = data.train, data.test
    start_test = evaluate(model, test).metrics()

    trajectory: list[tuple[int, float]] = []

    def remember(record: dict[str, Any]) -> None:
        trajectory.append((int(record["step"]), score(case.objective, record["metrics"])))

    settings = settings_for(preset, case)
    # the library runs the case as a user would: its own head-first phase and selection
    result = selmix.finetune(
        model, train, val, case.objective, callback=remember, progress=False, seed=seed,
        **settings,
    )  # fmt: skip
    best_test = evaluate(result.model, test).metrics()
    last_test = evaluate(result.model_at("last"), test).metrics()
    wall = time.perf_counter() - started
    selected = result.selected_step
    val_selected = next(value for step, value in trajectory if step == selected)
    after_first = [value for step, value in trajectory[1:]]
    return {
        "case": case.name,
        "objective": case.objective,
        "frozen": case.frozen,
        "val_per_class": case.val_per_class,
        "start_spec": spec.key,
        "settings": result.config.to_dict(),
        "seed": seed,
        "test_start": summary(start_test, case.objective),
        "test_best": summary(best_test, case.objective),
        "test_last": summary(last_test, case.objective),
        "test_start_per_class_recall": start_test["per_class_recall"],
        "test_best_per_class_recall": best_test["per_class_recall"],
        "selected_step": selected,
        "val_start": trajectory[0][1],
        "val_best": val_selected,
        "val_last": trajectory[-1][1],
        "val_lowest_after_first": min(after_first) if after_first else trajectory[0][1],
        "val_trajectory": trajectory,
        "wall_s": wall,
    }


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| case | metric | test start -> best (last) | min rec start -> best | "
        "mean rec start -> best | step | val start -> best | val lowest | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        start, best, last = run["test_start"], run["test_best"], run["test_last"]
        metric = OBJECTIVE_METRIC[run["objective"]].replace("_", " ")
        if run["objective"] == "mean_recall_min_coverage":
            metric = "mean rec - cov shortfall (min cov)"
            head = (
                f"{pct(start['objective'])} ({pct(start['min_coverage'])}) -> "
                f"{pct(best['objective'])} ({pct(best['min_coverage'])}) "
                f"[{pct(last['objective'])}]"
            )
        else:
            head = f"{pct(start['objective'])} -> {pct(best['objective'])}"
            head += f" ({pct(last['objective'])})"
        lines.append(
            f"| {run['case']} | {metric} | {head} | "
            f"{pct(start['min_recall'])} -> {pct(best['min_recall'])} | "
            f"{pct(start['mean_recall'])} -> {pct(best['mean_recall'])} | "
            f"{run['selected_step']} | {pct(run['val_start'])} -> {pct(run['val_best'])} | "
            f"{pct(run['val_lowest_after_first'])} | {run['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def test_delta(run: dict[str, Any]) -> float:
    """Test change of the case's objective (:func:`score`), as a fraction (0.1 = 10 points)."""
    return run["test_best"]["objective"] - run["test_start"]["objective"]


def verdict(runs: list[dict[str, Any]]) -> str:
    deltas = [test_delta(r) for r in runs]
    improved = sum(d > 0 for d in deltas)
    worst = min(range(len(runs)), key=lambda i: deltas[i])
    low_start = [r for r in runs if r["test_start"]["min_recall"] < 0.5]
    lifted = [
        r for r in low_start if r["test_best"]["min_recall"] - r["test_start"]["min_recall"] >= 0.1
    ]
    min_recall_runs = [r for r in runs if r["objective"] == "min_recall"]
    kept_mean = [
        r
        for r in min_recall_runs
        if r["test_best"]["mean_recall"] >= r["test_start"]["mean_recall"] - 0.03
    ]
    below_val = [r["case"] for r in runs if r["val_best"] < r["val_start"]]
    return "\n".join(
        [
            f"- improved on test (objective): {improved}/{len(runs)}",
            f"- worst case: {runs[worst]['case']} ({100 * deltas[worst]:+.1f} points)",
            "- start test min recall < 50% and gained >= 10 points: "
            f"{len(lifted)}/{len(low_start)}",
            f"- min-recall runs keeping mean recall >= start - 3: {len(kept_mean)}/"
            f"{len(min_recall_runs)}",
            f"- cases ending below their start on validation (selected model): {below_val}",
            f"- wall time: {sum(r['wall_s'] for r in runs):.0f} s",
        ]
    )


def side_by_side(first: dict[str, Any], second: dict[str, Any]) -> str:
    """Markdown table of two presets' runs (the JSON payloads), case by case: test start ->
    selected (last), the selected step and the lowest validation score after the first
    feedback step under each."""
    a, b = first["preset"], second["preset"]
    lines = [
        f"| case | metric | test start | {a}: selected (last) | step | val lowest | "
        f"{b}: selected (last) | step | val lowest |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    others = {run["case"]: run for run in second["runs"]}
    for run in first["runs"]:
        other = others[run["case"]]
        metric = OBJECTIVE_METRIC[run["objective"]].replace("_", " ")
        if run["objective"] == "mean_recall_min_coverage":
            metric = "mean rec - cov shortfall"
        cells = [run["case"], metric, pct(run["test_start"]["objective"])]
        for item in (run, other):
            cells += [
                f"{pct(item['test_best']['objective'])} ({pct(item['test_last']['objective'])})",
                str(item["selected_step"]),
                pct(item["val_lowest_after_first"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="defaults", choices=sorted(PRESETS))
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON output (default: benchmarks/records/)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--compare", nargs=2, metavar="JSON", default=None,
        help="print two presets' saved results side by side (and their verdicts), run nothing",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.compare:
        payloads = [json.loads(Path(path).read_text()) for path in args.compare]
        print(side_by_side(*payloads))
        for payload in payloads:
            print(f"\n{payload['preset']}:\n{verdict(payload['runs'])}")
        return
    torch.set_num_threads(args.threads)
    wanted = [w for w in args.cases.split(",") if w]
    cases = [c for c in CASES if not wanted or any(w in c.name for w in wanted)]
    if not cases:
        raise SystemExit(f"no case matches --cases {args.cases!r}")
    runs = []
    for case in cases:
        run = run_case(case, args.preset, args.seed)
        runs.append(run)
        print(
            f"{case.name}: {pct(run['test_start']['objective'])} -> "
            f"{pct(run['test_best']['objective'])} (last {pct(run['test_last']['objective'])}), "
            f"min rec {pct(run['test_start']['min_recall'])} -> "
            f"{pct(run['test_best']['min_recall'])}, step {run['selected_step']}, "
            f"{run['wall_s']:.0f} s",
            flush=True,
        )
    out = args.out
    if out is None:
        suffix = "" if not wanted else "_" + "_".join(wanted).replace("/", "-")
        out = f"benchmarks/records/robustness_{args.preset}{suffix}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/robustness.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"preset": args.preset, "presets": PRESETS[args.preset], "command": command}
    Path(out).write_text(json.dumps({**payload, "runs": runs}, indent=1))
    print()
    print(f"### preset `{args.preset}`\n")
    print(table(runs))
    print()
    print(verdict(runs))


if __name__ == "__main__":
    main()
