"""SelMix against the simple baselines, on many classes and small validation sets.

For every case (a start, a validation size, a backbone mode and an objective) it runs, on
the same start: SelMix (a *variant*: the library defaults, or named settings), cRT,
post-hoc logit adjustment (tau tuned on the validation set for the objective) and
logit-adjusted fine-tuning of the head. Every method is scored by the case's objective
metric (:func:`selmix.core.selection.objective_score`'s metric; mean recall s.t. coverage as
``mean recall - max(0, 1 - K min_cov / alpha)``) on the validation set the run saw and on
the test set, so the table shows both the lead over the baselines and the
validation-to-test gap of the selected model.

Cases (``--suite``):

* ``versus`` (default): K = 20 from two image domains (CIFAR-10 + Fashion-MNIST at 32 x 32,
  three shuffled tails, 10/20/40/100 validation images per class, min recall and mean
  recall s.t. coverage), and synthetic class-conditional features at K = 100 (10 and 100
  validation samples per class) and K = 1000 (10 and 50); see ``_versus_cases.py``.
* ``robust``: the 14 cases of ``benchmarks/robustness.py`` (K = 10).
* ``all``: both.

Each run is one JSON record under ``benchmarks/records/versus/`` (case, method, variant,
seed); records that exist are reused, so the suite resumes after a kill and a second
variant reruns only SelMix. Frozen-backbone methods share one feature extraction per
start.

    PYTHONPATH=src python benchmarks/versus_baselines.py --suite all --seeds 0
    PYTHONPATH=src python benchmarks/versus_baselines.py --variant before --suite all
    PYTHONPATH=src python benchmarks/versus_baselines.py --render docs/results/versus_baselines.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _robust_cases as robust  # noqa: E402
import _versus_cases as versus  # noqa: E402
import selmix  # noqa: E402
from _common import feature_space, machine_line  # noqa: E402
from selmix.baselines import run_baseline  # noqa: E402
from selmix.core.metrics import all_metrics  # noqa: E402
from selmix.engine.evaluate import evaluate  # noqa: E402

RUNS = Path("benchmarks/records/versus")
ALPHA = 0.95
TUNED_BACKBONE_STEPS = 300  # as benchmarks/robustness.py
TUNED_BATCH = 64

# SelMix variants: keyword settings of selmix.finetune on top of the library defaults.
# "before" pins the defaults as they were before issue 22 (each setting that issue 22
# changed, at its old value), so that the comparison can be rerun after the change.


def _issue38(**settings: Any) -> dict[str, Any]:
    """An issue-38 variant: the issue-22 defaults (w = 50, the strict best step and start
    head, no uniform pairs) with ``settings`` on top; ``min_recall_params`` apply to the
    min-recall cases only (finetune settings such as uniform_mix, or the objective's own,
    such as floor)."""
    base = {"multiplier_rate": "objective", "select_tolerance": 0.0,
            "head_init_tolerance": None, "uniform_mix": 0.0}  # fmt: skip
    return {**base, **settings}


VARIANTS: dict[str, dict[str, Any]] = {
    # the library's defaults of issue 22 (the records `selmix-defaults` were made with them)
    "defaults": _issue38(),
    # the library's defaults of issue 38 (uniform-head-select)
    "defaults-38": {},
    # the library before issue 22: these records are made with PYTHONPATH pointing at the
    # source of commit 5ff6b11 (git worktree add --detach ../selmix-before 5ff6b11)
    "before": {},
    # the defaults without one of their two changes of issue 22 (the tie-break by mean
    # recall stays in both)
    "no-head-init": {"head_init": "none"},
    "no-shrinkage": {"shrinkage": "none"},
    "crt-init": {"init": "crt", "head_init": "none", "shrinkage": "none"},
    "rate-scaled": {"rate": "scaled", "head_init": "none", "shrinkage": "none"},
    # issue 38 candidates (docs/RESULTS.md): the multiplier rate from the validation noise
    # (noise), the best step chosen among those tied within the noise (select; with
    # head_init_tolerance unset the start head too), the start head alone chosen so
    # (head-select), a floor of evenly spread multiplier weight (floor), half the pairs
    # drawn uniformly (uniform)
    "noise-rate": _issue38(multiplier_rate="noise"),
    "tied-select": _issue38(select_tolerance=1.0),
    "noise-select": _issue38(multiplier_rate="noise", select_tolerance=1.0),
    "noise-floor": _issue38(multiplier_rate="noise", min_recall_params={"floor": 0.3}),
    "floor": _issue38(min_recall_params={"floor": 0.3}),
    "noise-floor-half": _issue38(multiplier_rate="noise", min_recall_params={"floor": 0.5}),
    "noise-uniform-half": _issue38(multiplier_rate="noise", min_recall_params={"uniform_mix": 0.5}),
    "noise-uniform-half-select": _issue38(
        multiplier_rate="noise", select_tolerance=1.0, min_recall_params={"uniform_mix": 0.5}
    ),
    "noise-uniform-half-select-half": _issue38(
        multiplier_rate="noise", select_tolerance=0.5, min_recall_params={"uniform_mix": 0.5}
    ),
    "noise-head-select": _issue38(multiplier_rate="noise", head_init_tolerance=1.0),
    "head-select": _issue38(head_init_tolerance=1.0),
    "noise-uniform-head-select": _issue38(
        multiplier_rate="noise", head_init_tolerance=1.0, min_recall_params={"uniform_mix": 0.5}
    ),
    "uniform-head-select": _issue38(
        head_init_tolerance=1.0, min_recall_params={"uniform_mix": 0.5}
    ),
    # the share of uniform pairs against the validation set's size (issue 38, second
    # session): the defaults-38 head with 0.25 and 0.1 of the pairs uniform
    "uniform-quarter": _issue38(head_init_tolerance=1.0, min_recall_params={"uniform_mix": 0.25}),
    "uniform-tenth": _issue38(head_init_tolerance=1.0, min_recall_params={"uniform_mix": 0.1}),
}


@dataclass(frozen=True)
class Case:
    name: str
    start: Any  # robust.StartSpec | versus.TwoDomainSpec | versus.GaussSpec
    val_per_class: int
    frozen: bool
    objective: str

    @property
    def num_classes(self) -> int:
        if isinstance(self.start, versus.GaussSpec):
            return self.start.num_classes
        return 20 if isinstance(self.start, versus.TwoDomainSpec) else 10


def _versus_cases() -> list[Case]:
    cases = []
    for spec in versus.TWO_DOMAIN_STARTS:
        for per_class in (10, 20, 40, 100):
            for objective, short in (
                ("min_recall", "minrec"),
                ("mean_recall_min_coverage", "mrcov"),
            ):
                cases.append(
                    Case(
                        f"k20-o{spec.order_seed}-v{per_class}-{short}",
                        spec,
                        per_class,
                        True,
                        objective,
                    )  # fmt: skip
                )
    for spec, sizes in ((versus.GAUSS_100, (10, 100)), (versus.GAUSS_1000, (10, 50))):
        k = spec.num_classes
        for per_class in sizes:
            for objective, short in (
                ("min_recall", "minrec"), ("h_mean", "hmean"),
                ("mean_recall_min_coverage", "mrcov"),
            ):  # fmt: skip
                if k == 1000 and objective == "min_recall":
                    continue  # min over 1000 classes of 200 test samples is test noise
                cases.append(Case(f"gauss{k}-v{per_class}-{short}", spec, per_class, True,
                                  objective))  # fmt: skip
    return cases


def _robust_cases() -> list[Case]:
    return [Case(c.name, c.start, c.val_per_class, c.frozen, c.objective) for c in robust.CASES]


SUITES = {"versus": _versus_cases, "robust": _robust_cases}

# ---------------------------------------------------------------- data and starts


class _Start:
    """A start's data, model and (frozen) features, loaded once per start."""

    def __init__(self, spec: Any) -> None:
        if isinstance(spec, robust.StartSpec):
            robust.build_start(spec)
            self.data = robust.load_case_data(spec)
            self.model = robust.load_start(spec)
        else:
            versus.build_start(spec)
            self.data = versus.load_case_data(spec)
            self.model = versus.load_start(spec)
        self.space = feature_space(self.model, self.data)

    def val_index(self, per_class: int) -> torch.Tensor:
        labels = torch.as_tensor(self.data.val.labels)
        keep = [(labels == k).nonzero().flatten()[:per_class] for k in range(int(labels.max()) + 1)]
        return torch.cat(keep).sort().values

    def inputs(self, case: Case) -> tuple[Any, Any, Any, Any]:
        """(model, train, val, test) for the case: features if frozen, images otherwise."""
        index = self.val_index(case.val_per_class)
        if case.frozen:
            space = self.space
            return space.fresh_model(), space.train, space.val.subset(index), space.test
        model = copy.deepcopy(self.model)
        return model, self.data.train, self.data.val.subset(index), self.data.test


_STARTS: dict[Any, _Start] = {}


def start_of(spec: Any) -> _Start:
    if spec not in _STARTS:
        _STARTS.clear()  # one start in memory at a time (K = 1000 features are large)
        _STARTS[spec] = _Start(spec)
    return _STARTS[spec]


# ---------------------------------------------------------------- scoring


def score(objective: str, metrics: dict[str, Any]) -> float:
    """The case's objective metric; coverage objectives pay their shortfall share."""
    if objective == "mean_recall_min_coverage":
        k = len(metrics["per_class_coverage"])
        shortfall = max(0.0, 1.0 - k * float(metrics["min_coverage"]) / ALPHA)
        return float(metrics["mean_recall"]) - shortfall
    return float(metrics[objective])


def summary(metrics: dict[str, Any], objective: str) -> dict[str, float]:
    return {
        "objective": score(objective, metrics),
        "min_recall": float(metrics["min_recall"]),
        "mean_recall": float(metrics["mean_recall"]),
        "h_mean": float(metrics["h_mean"]),
        "min_coverage": float(metrics["min_coverage"]),
    }


# ---------------------------------------------------------------- methods


def _selmix_settings(case: Case, variant: str) -> dict[str, Any]:
    """finetune's settings for the variant ("init" is the benchmark's, not the library's)."""
    settings = {**VARIANTS[variant], "frozen_backbone": case.frozen}
    init = settings.pop("init", None)
    min_recall_params = dict(settings.pop("min_recall_params", None) or {})
    if min_recall_params and case.objective == "min_recall":
        # finetune settings (uniform_mix) and the objective's own (floor)
        for key in [
            k for k in min_recall_params if k in selmix.FinetuneConfig.__dataclass_fields__
        ]:
            settings[key] = min_recall_params.pop(key)
        if min_recall_params:
            settings["objective_params"] = min_recall_params
    if settings.pop("rate", None) == "scaled" and case.objective == "min_recall":
        # w = 50 treats recalls as known to about 2% (500 per class); scale w with the
        # standard error, 1 / sqrt(n)
        settings["objective_params"] = {"rate": 50 * (case.val_per_class / 500) ** 0.5}
    if not case.frozen:
        # the layout the committed runs had ("auto" measures the machine and may pick
        # channels-last, and the numbers then differ a little)
        settings.setdefault("channels_last", False)
        head_first = selmix.FinetuneConfig.from_dict(settings).head_first
        settings.update(steps=head_first + TUNED_BACKBONE_STEPS, batch_size=TUNED_BATCH)
        settings.setdefault("head_first_steps", head_first)
    return {**settings, "init": init}


def run_method(case: Case, method: str, variant: str, seed: int) -> dict[str, Any]:
    start = start_of(case.start)
    model, train, val, test = start.inputs(case)
    began = time.perf_counter()
    extra: dict[str, Any] = {}
    if method == "selmix":
        settings = _selmix_settings(case, variant)
        if settings.pop("init", None) == "crt":
            # SelMix from the cRT head (the head re-trained with class-balanced sampling)
            model = run_baseline("crt", model, train, val, case.objective, seed=seed).model
        result = selmix.finetune(
            model, train, val, case.objective, progress=False, seed=seed, **settings
        )
        returned = result.model
        extra = {
            "selected_step": result.selected_step,
            "settings": result.config.to_dict(),
            "warnings": [str(w) for w in getattr(result, "warnings", [])],
        }
    else:
        _, train_f, val_f, _ = start.inputs(Case(case.name, case.start, case.val_per_class,
                                                 True, case.objective))  # fmt: skip
        head = start.space.fresh_model()
        options = {
            "crt": {"seed": seed},
            "posthoc_la": {},
            "la_finetune": {"frozen_backbone": True, "seed": seed},
        }[method]
        result = run_baseline(method, head, train_f, val_f, case.objective, **options)
        returned = result.model
        if method == "posthoc_la":
            extra["tau"] = result.details["tau"]
        train, val, test = train_f, val_f, start.space.test
    wall = time.perf_counter() - began
    val_metrics = evaluate(returned, val).metrics()
    test_metrics = evaluate(returned, test).metrics()
    return {
        "case": case.name,
        "method": method,
        "variant": variant if method == "selmix" else None,
        "seed": seed,
        "objective": case.objective,
        "num_classes": case.num_classes,
        "val_per_class": case.val_per_class,
        "frozen": case.frozen,
        "val": summary(val_metrics, case.objective),
        "test": summary(test_metrics, case.objective),
        "wall_s": wall,
        **extra,
    }


def start_record(case: Case) -> dict[str, Any]:
    start = start_of(case.start)
    model, _, val, test = start.inputs(case)
    val_metrics = all_metrics(evaluate(model, val).confusion)
    test_metrics = evaluate(model, test).metrics()
    return {
        "case": case.name, "method": "start", "variant": None, "seed": 0,
        "objective": case.objective, "num_classes": case.num_classes,
        "val_per_class": case.val_per_class, "frozen": case.frozen,
        "val": summary(val_metrics, case.objective), "test": summary(test_metrics, case.objective),
        "wall_s": 0.0,
    }  # fmt: skip


def record_path(case: Case, method: str, variant: str, seed: int) -> Path:
    tag = f"selmix-{variant}" if method == "selmix" else method
    return RUNS / f"{case.name}__{tag}__s{seed}.json"


# ---------------------------------------------------------------- rendering


def load_records(folders: list[Path] | None = None) -> list[dict[str, Any]]:
    folders = folders or [RUNS]
    return [json.loads(p.read_text()) for folder in folders for p in sorted(folder.glob("*.json"))]


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * _mean(values):.1f} ± {100 * statistics.pstdev(values):.1f}"


BASELINES = ("crt", "posthoc_la", "la_finetune")

# issue 38: a min-recall run is dominated by another objective's run on the same start and
# validation set when that run's test min recall is within 1 point of its own and its test
# mean recall 2 or more points higher
DOMINANCE_MIN_RECALL = 0.01
DOMINANCE_MEAN_RECALL = 0.02


def partners(cases: list[Case]) -> dict[str, list[str]]:
    """For each min-recall case, the cases of other objectives on the same start,
    validation size and backbone mode."""
    return {
        c.name: [
            o.name for o in cases
            if o.objective != c.objective and (o.start, o.val_per_class, o.frozen)
            == (c.start, c.val_per_class, c.frozen)
        ]
        for c in cases if c.objective == "min_recall"
    }  # fmt: skip


def dominated_by(
    runs: list[dict[str, Any]], others: dict[str, list[dict[str, Any]]]
) -> list[tuple[str, float, float]]:
    """The other cases whose runs dominate ``runs`` (means over seeds of the test min and
    mean recall): ``(case, min recall difference, mean recall difference)``, other - own."""
    own_min = _mean([r["test"]["min_recall"] for r in runs])
    own_mean = _mean([r["test"]["mean_recall"] for r in runs])
    out = []
    for name, other in others.items():
        if not other:
            continue
        d_min = _mean([r["test"]["min_recall"] for r in other]) - own_min
        d_mean = _mean([r["test"]["mean_recall"] for r in other]) - own_mean
        if d_min >= -DOMINANCE_MIN_RECALL - 1e-9 and d_mean >= DOMINANCE_MEAN_RECALL - 1e-9:
            out.append((name, d_min, d_mean))
    return out


def render(
    records: list[dict[str, Any]],
    variants: list[str],
    cases: list[str],
    pairs: dict[str, list[str]] | None = None,
    partner_variant: str = "defaults",
) -> str:
    """The table and the verdicts; ``pairs`` (:func:`partners`) adds, for each min-recall
    case, whether another objective's run of the same variant (else of
    ``partner_variant``) on the same start dominated it."""
    pairs = pairs or {}
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        tag = f"selmix-{r['variant']}" if r["method"] == "selmix" else r["method"]
        by_key.setdefault((r["case"], tag), []).append(r)
    head = ["case", "K", "val/class", "start", "cRT", "post-hoc LA", "LA fine-tuning"]
    for v in variants:
        head += [f"SelMix {v}", f"val (gap) {v}", f"min / mean rec {v}"]
        if pairs:
            head.append(f"dominated {v}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdict_rows = []
    for name in cases:
        start = by_key.get((name, "start"))
        if not start:
            continue
        s = start[0]
        row = [
            name,
            str(s["num_classes"]),
            str(s["val_per_class"]),
            _cell([s["test"]["objective"]]),
        ]
        best_baseline = -1e9
        baseline_spread = 0.0
        for method in BASELINES:
            runs = by_key.get((name, method), [])
            values = [r["test"]["objective"] for r in runs]
            row.append(_cell(values))
            if values and _mean(values) > best_baseline:
                best_baseline = _mean(values)
                baseline_spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        crt_mean = _mean([r["test"]["mean_recall"] for r in by_key.get((name, "crt"), [])])
        for v in variants:
            runs = by_key.get((name, f"selmix-{v}"), [])
            test_values = [r["test"]["objective"] for r in runs]
            val_values = [r["val"]["objective"] for r in runs]
            gaps = [a - b for a, b in zip(val_values, test_values, strict=True)]
            row.append(_cell(test_values))
            row.append(f"{_cell(val_values)} ({100 * _mean(gaps):+.1f})" if runs else "")
            row.append(
                f"{_cell([r['test']['min_recall'] for r in runs])} / "
                f"{_cell([r['test']['mean_recall'] for r in runs])}"
                if runs
                else ""
            )
            dominators: list[tuple[str, float, float]] | None = None
            if pairs:
                if name in pairs and runs:
                    others = {
                        o: by_key.get((o, f"selmix-{v}"))
                        or by_key.get((o, f"selmix-{partner_variant}"), [])
                        for o in pairs[name]
                    }  # fmt: skip
                    dominators = dominated_by(runs, others)
                    row.append(
                        ", ".join(
                            f"by {o.rsplit('-', 1)[-1]} ({100 * a:+.1f} / {100 * b:+.1f})"
                            for o, a, b in dominators
                        ) or ("no" if any(others.values()) else "")
                    )  # fmt: skip
                else:
                    row.append("")
            if runs:
                spread = statistics.pstdev(test_values) if len(test_values) > 1 else 0.0
                verdict_rows.append({
                    "case": name, "variant": v, "objective": s["objective"],
                    "val_per_class": s["val_per_class"],
                    "selmix": _mean(test_values), "best_baseline": best_baseline,
                    "tolerance": max(spread, baseline_spread),
                    "gap_min_recall": _mean([r["val"]["min_recall"] - r["test"]["min_recall"]
                                             for r in runs]),
                    "mean_recall_vs_crt": _mean([r["test"]["mean_recall"] for r in runs])
                    - crt_mean,
                    "min_recall": _mean([r["test"]["min_recall"] for r in runs]),
                    "mean_recall": _mean([r["test"]["mean_recall"] for r in runs]),
                    "gain_over_start": _mean(test_values) - s["test"]["objective"],
                    "seeds": len(runs),
                    "dominated": dominators,
                })  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + verdicts(verdict_rows, variants)


def _by_val_size(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The rows in three groups of validation images per class: <= 40, 41-100, > 100."""
    groups = [("<= 40", lambda n: n <= 40), ("100", lambda n: 40 < n <= 100),
              ("> 100", lambda n: n > 100)]  # fmt: skip
    out = []
    for label, test in groups:
        group = [r for r in rows if test(r["val_per_class"])]
        if group:
            out.append((label, group))
    return out


def verdicts(rows: list[dict[str, Any]], variants: list[str]) -> str:
    out = []
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        if not mine:
            continue
        ahead = [r for r in mine if r["selmix"] >= r["best_baseline"] - r["tolerance"]]
        behind = [
            f"{r['case']} ({100 * (r['selmix'] - r['best_baseline']):+.1f})"
            for r in mine if r not in ahead
        ]  # fmt: skip
        minrec = [r for r in mine if r["objective"] == "min_recall"]
        small = [r for r in minrec if r["val_per_class"] <= 40]
        within = [r for r in minrec if r["mean_recall_vs_crt"] >= -0.03]
        cov_pairs = []
        by_name = {r["case"]: r for r in mine}
        for r in minrec:
            partner = by_name.get(r["case"].replace("minrec", "mrcov"))
            if partner is not None and r["case"] != partner["case"]:
                cov_pairs.append((r, partner))
        reach = [a for a, b in cov_pairs if a["min_recall"] >= b["min_recall"] - 1e-9]
        checked = [r for r in minrec if r.get("dominated") is not None]
        dominated = [
            f"{r['case']} (by " + ", ".join(
                f"{o.rsplit('-', 1)[-1]}: {100 * a:+.1f} min / {100 * b:+.1f} mean"
                for o, a, b in r["dominated"]
            ) + ")"
            for r in checked if r["dominated"]
        ]  # fmt: skip
        by_coverage = [r for r in checked if any(o.endswith("mrcov") for o, _, _ in r["dominated"])]
        out += [
            f"**{v}** ({len(mine)} cases):",
            f"- test objective >= best baseline (or within the seed spread): "
            f"{len(ahead)}/{len(mine)}" + (f"; behind: {', '.join(behind)}" if behind else ""),
            f"- mean validation-to-test gap of min recall, min-recall runs with <= 40 "
            f"validation images per class: "
            f"{100 * _mean([r['gap_min_recall'] for r in small]):+.1f} points "
            f"({len(small)} cases)",
            f"- min-recall runs with mean recall within 3 points of cRT's: "
            f"{len(within)}/{len(minrec)}",
            f"- test min / mean recall of the min-recall runs, mean over cases: "
            f"{100 * _mean([r['min_recall'] for r in minrec]):.1f} / "
            f"{100 * _mean([r['mean_recall'] for r in minrec]):.1f} ({len(minrec)} cases)",
            "- the same by validation images per class: " + "; ".join(
                f"{size}: {100 * _mean([r['min_recall'] for r in group]):.1f} / "
                f"{100 * _mean([r['mean_recall'] for r in group]):.1f} ({len(group)})"
                for size, group in _by_val_size(minrec)
            ),
            *(
                [
                    f"- min-recall runs dominated by another objective's run on the same start "
                    f"and validation set (its min recall within 1 point, its mean recall 2+ "
                    f"points higher): {len(dominated)}/{len(checked)}, by the coverage "
                    f"objective {len(by_coverage)}"
                    + (f"; {'; '.join(dominated)}" if dominated else "")
                ]
                if checked
                else []
            ),
            f"- min-recall objective reaching the coverage objective's test min recall on the "
            f"same start and validation set: {len(reach)}/{len(cov_pairs)}",
            f"- cases gaining >= 10 points over the start: "
            f"{sum(r['gain_over_start'] >= 0.1 for r in mine)}/{len(mine)}",
            "",
        ]
    return "\n".join(out)


# ---------------------------------------------------------------- one run's course


def trace(case: Case, variant: str, seed: int = 0, every: int = 200) -> list[str]:
    """One SelMix run's feedback steps every ``every`` steps: its validation score (the
    pooled min recall for min recall), validation and test min / mean recall, and the start
    head ``head_init`` chose; nothing is saved."""
    start = start_of(case.start)
    model, train, val, test = start.inputs(case)
    settings = _selmix_settings(case, variant)
    if settings.pop("init", None) == "crt":
        model = run_baseline("crt", model, train, val, case.objective, seed=seed).model
    lines = [f"{case.name} {variant} s{seed}: step, score, val min / mean, test min / mean"]

    def callback(record: dict[str, Any]) -> None:
        if record["step"] % every:
            return
        measured = evaluate(model, test).metrics()  # the head is trained in place
        head = f" (start: {record['head_init']['head_init']})" if "head_init" in record else ""
        lines.append(
            f"{record['step']:5d} {100 * record['score']['metric']:5.1f} "
            f"{100 * record['metrics']['min_recall']:5.1f} / "
            f"{100 * record['metrics']['mean_recall']:5.1f} "
            f"{100 * measured['min_recall']:5.1f} / {100 * measured['mean_recall']:5.1f}{head}"
        )

    selmix.finetune(model, train, val, case.objective, progress=False, seed=seed,
                    callback=callback, **settings)  # fmt: skip
    return lines


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    global RUNS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="versus", choices=[*SUITES, "all"])
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--variant", nargs="+", default=["defaults"], choices=sorted(VARIANTS),
                        help="SelMix variant(s), run one after the other on each case")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-baselines", action="store_true", help="SelMix runs only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace", action="store_true",
                        help="print each case's run (--variant, --seeds) every 200 steps: "
                        "validation score, validation and test min / mean recall; no "
                        "records")  # fmt: skip
    parser.add_argument("--render", metavar="MD", default=None,
                        help="write the table of the saved records, run nothing")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=["before", "defaults"],
                        help="variants shown by --render")  # fmt: skip
    parser.add_argument("--partner-variant", default="defaults",
                        help="--render: the variant whose other-objective runs are checked "
                        "for dominating a min-recall run when the variant has none")  # fmt: skip
    parser.add_argument("--records", type=Path, default=None,
                        help=f"where runs are written and read (default: {RUNS}), e.g. a "
                        "folder of extra seeds kept out of the suite's table")  # fmt: skip
    parser.add_argument("--runs", nargs="+", type=Path, default=None,
                        help="record folders read by --render (default: the suite's)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.records is not None:
        RUNS = args.records
    torch.set_num_threads(args.threads)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    every_case = [c for s in suites for c in SUITES[s]()]
    wanted = [w for w in args.cases.split(",") if w]
    cases = [c for c in every_case if not wanted or any(w in c.name for w in wanted)]
    if args.trace:
        for case in cases:
            for variant in args.variant:
                for seed in args.seeds:
                    print("\n".join(trace(case, variant, seed)), flush=True)
        return
    if args.render:
        text = render(
            load_records(args.runs), args.variants, [c.name for c in cases], partners(every_case),
            args.partner_variant,
        )  # fmt: skip
        command = "python benchmarks/versus_baselines.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        header = (
            f"Command: `{command}`; test set, %; SelMix: the selected model's test value, its "
            "validation value and the gap (validation - test), and its test min / mean "
            "recall. Baselines on the frozen features of the same start.\n\n"
        )
        Path(args.render).write_text(header + text + "\n")
        print(header + text)
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    methods = ["selmix"] if args.no_baselines else ["selmix", *BASELINES]
    for case in cases:
        path = RUNS / f"{case.name}__start__s0.json"
        if not path.exists():
            path.write_text(json.dumps(start_record(case), indent=1))
        jobs = [(m, v) for m in methods for v in (args.variant if m == "selmix" else [None])]
        for seed in args.seeds:
            for method, variant in jobs:
                path = record_path(case, method, variant, seed)
                if path.exists():
                    continue
                record = run_method(case, method, variant, seed)
                record["machine"] = machine_line(torch.get_num_threads())
                record["command"] = "python benchmarks/versus_baselines.py " + " ".join(
                    sys.argv[1:] if argv is None else argv
                )
                path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
                path.with_suffix(".tmp").rename(path)
                print(
                    f"{case.name} {method} {variant or ''} s{seed}: "
                    f"val {100 * record['val']['objective']:.1f} test "
                    f"{100 * record['test']['objective']:.1f} "
                    f"(min {100 * record['test']['min_recall']:.1f}, mean "
                    f"{100 * record['test']['mean_recall']:.1f}) {record['wall_s']:.0f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
