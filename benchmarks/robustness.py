"""Robustness suite: does a settings preset lift the objective on data nobody tuned it for?

Runs SelMix with one preset on every case of ``benchmarks/_robust_cases.py`` (14 cases:
Fashion-MNIST-LT, CIFAR-10-LT (JPEG copy) and an ImageFolder PNG tree of
Fashion-MNIST-LT; rho 10/100/200; standard, reversed, shuffled and alphabetical class
order; cross-entropy, logit-adjusted and mixup starts; 20/100/500 validation images per
class; backbone frozen and fine-tuned; min recall, H-mean and mean recall s.t. coverage).
Starting models are pre-trained once and cached (see ``_robust_cases.py``).

For every case it reports start -> selected and start -> last on test (the case's
objective metric, min and mean recall), the selected step (the best validation score
over the feedback steps, the start included: ``select="best"``), the lowest validation
score after the first feedback step, and the wall time; then the worst case and the share
of cases improved. Settings reach :func:`selmix.finetune` as keyword overrides only.

    PYTHONPATH=src python benchmarks/robustness.py --preset defaults
    PYTHONPATH=src python benchmarks/robustness.py --preset paper --cases c10,tuned

Writes ``docs/results/runs/robustness_<preset>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selmix  # noqa: E402
from _common import feature_space  # noqa: E402
from _robust_cases import CASES, Case, load_case_data, load_start  # noqa: E402
from selmix.evaluate import evaluate  # noqa: E402

# Settings by preset: "common" for every case, then "frozen" / "tuned" by backbone mode.
# Field names are FinetuneConfig's; soft_confusion, uniform_mix and multiplier_step are the
# fields this branch adds (ROBUST-HOOK in finetune.py).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # the library defaults of the paper (steps 1000, E = 50, s = 10, lr 3e-3, no smoothing)
    "paper": {"common": {}, "frozen": {}, "tuned": {}},
    # README "Choosing hyper-parameters"
    "readme": {
        "common": {
            "feedback_every": 10,
            "gain_scale": 3.0,
            "confusion_smoothing": 1.0,
        },
        "frozen": {"steps": 4000},
        "tuned": {},
    },  # fmt: skip
    # the first proposal of issue 13: soft confusion and three stabilisers (measured, then
    # simplified into "defaults")
    "soft-stabilised": {
        "common": {
            "soft_confusion": True,
            "normalize_gain": True,
            "gain_scale": 3.0,
            "uniform_mix": 0.1,
            "multiplier_step": 0.5,
            "feedback_every": 10,
        },
        "frozen": {"steps": 2000},
        "tuned": {
            "head_first_steps": 2000,
            "second_phase": {"lr_head": 3e-4, "lr_backbone": 3e-5},
        },
    },
    # the proposed defaults: what the ablations of "soft-stabilised" kept
    "defaults": {
        "common": {
            "confusion_smoothing": 1.0,
            "normalize_gain": True,
            "gain_scale": 3.0,
            "feedback_every": 10,
        },
        "frozen": {"steps": 4000},
        # backbone fine-tuning on request: the head first (as frozen), then the whole model
        # from the selected head with a 10x lower head learning rate
        "tuned": {
            "head_first_steps": 2000,
            "second_phase": {"lr_head": 3e-4, "lr_backbone": 3e-5},
        },
    },
}

# CPU budget of the fine-tuned-backbone cases, applied under every preset (a SelMix step
# forwards 2B images through the backbone; 1000 steps of B = 128 take ~8 min on a loaded
# 2-core machine).
TUNED_BUDGET = {"steps": 300, "batch_size": 64}


def _ablation(base: str, **changes: Any) -> dict[str, dict[str, Any]]:
    preset = copy.deepcopy(PRESETS[base])
    preset["common"].update(changes)
    return preset


def _frozen_steps(base: str, steps: int) -> dict[str, dict[str, Any]]:
    preset = copy.deepcopy(PRESETS[base])
    preset["frozen"]["steps"] = steps
    return preset


# one part of "soft-stabilised" removed (or replaced) at a time
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
    Lagrangian of MATH.md section 2: that rewards coverage below the target linearly and
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
    table = PRESETS[preset]
    mode = "frozen" if case.frozen else "tuned"
    budget = {} if case.frozen else TUNED_BUDGET
    return {**table["common"], **budget, **table[mode], "frozen_backbone": case.frozen}


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
    best: dict[str, Any] = {"score": -math.inf}

    def remember(record: dict[str, Any]) -> None:
        value = score(case.objective, record["metrics"])
        trajectory.append((int(record["step"]), value))
        if value > best["score"]:  # emulates select="best": the start (step 0) competes
            best.update(score=value, step=int(record["step"]))
            best["state"] = copy.deepcopy(model.state_dict())

    settings = settings_for(preset, case)
    run_settings = dict(settings)
    head_first = run_settings.pop("head_first_steps", 0)
    run_settings.update(run_settings.pop("second_phase", {}) if head_first else {})
    if head_first and not case.frozen:
        # head first (backbone frozen, cached features), then the whole model from the
        # best head; one selection over both phases (the phase-2 steps are offset)
        phase1 = {**settings, "frozen_backbone": True, "steps": head_first}
        for key in ("batch_size", "head_first_steps", "second_phase"):
            phase1.pop(key, None)
        selmix.finetune(
            model, train, val, case.objective, callback=remember, progress=False, seed=seed,
            **phase1,
        )  # fmt: skip
        model.load_state_dict(best["state"])
        offset = head_first

        def remember_offset(record: dict[str, Any]) -> None:
            if record["step"] > 0:  # phase 2's step 0 is phase 1's selected model
                remember({**record, "step": record["step"] + offset})

        selmix.finetune(
            model, train, val, case.objective, callback=remember_offset, progress=False,
            seed=seed, **run_settings,
        )  # fmt: skip
    else:
        selmix.finetune(
            model, train, val, case.objective, callback=remember, progress=False, seed=seed,
            **run_settings,
        )  # fmt: skip
    last_test = evaluate(model, test).metrics()
    model.load_state_dict(best["state"])
    best_test = evaluate(model, test).metrics()
    wall = time.perf_counter() - started
    after_first = [value for step, value in trajectory[1:]]
    return {
        "case": case.name,
        "objective": case.objective,
        "frozen": case.frozen,
        "val_per_class": case.val_per_class,
        "start_spec": spec.key,
        "settings": settings,
        "seed": seed,
        "test_start": summary(start_test, case.objective),
        "test_best": summary(best_test, case.objective),
        "test_last": summary(last_test, case.objective),
        "test_start_per_class_recall": start_test["per_class_recall"],
        "test_best_per_class_recall": best_test["per_class_recall"],
        "selected_step": best["step"],
        "val_start": trajectory[0][1],
        "val_best": best["score"],
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="defaults", choices=sorted(PRESETS))
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON output (default: docs/results/runs/)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
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
        out = f"docs/results/runs/robustness_{args.preset}{suffix}.json"
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
