"""Whether a fine-tuning run worked, in one line: the objective's test metric before and
after, the best baseline's, a coverage objective's constraint met or missed; the step the
run returned and the head it started from; the marks of the objective in a metrics table.

Used by :mod:`selmix.report` (the HTML report and the text tables) and the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "METRIC_LABELS",
    "format_start",
    "format_verdict",
    "objective_marks",
    "objective_metric",
]

#: The scalar metrics of :func:`selmix.all_metrics`, in display order, with their labels.
METRIC_LABELS: dict[str, str] = {
    "mean_recall": "mean recall",
    "min_recall": "min recall",
    "g_mean": "G-mean",
    "h_mean": "H-mean",
    "min_head_tail_recall": "min head-tail recall",
    "min_coverage": "min coverage",
    "min_head_tail_coverage": "min head-tail coverage",
    "accuracy": "accuracy",
}


#: The coverage objectives' constraint: objective suffix -> the test metric it bounds.
_CONSTRAINTS = {
    "_min_head_tail_coverage": "min_head_tail_coverage",
    "_min_coverage": "min_coverage",
}


def objective_metric(objective: str) -> tuple[str | None, str | None]:
    """The test metric an objective names and the metric its constraint bounds.

    ``"min_recall"`` gives ``("min_recall", None)``; ``"mean_recall_min_coverage"`` gives
    ``("mean_recall", "min_coverage")``; a name that is no metric (a custom objective)
    gives ``(None, None)``.
    """
    if not isinstance(objective, str):
        raise TypeError(f"`objective` must be a str, got {type(objective).__name__}")
    for suffix, bounded in _CONSTRAINTS.items():
        if objective.endswith(suffix):
            metric = objective[: -len(suffix)]
            return (metric if metric in METRIC_LABELS else None), bounded
    return (objective if objective in METRIC_LABELS else None), None


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_verdict(
    objective: str,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    alpha: float | None = None,
    num_classes: int | None = None,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """One line saying whether a run worked: the objective's test metric before -> after,
    the best baseline's value when baselines were run, and for a coverage objective
    whether its constraint (coverage >= ``alpha`` / K) is met.

    Example: ``verdict: mean recall 70.2% -> 71.0% (+0.8): improved; min coverage 9.1% <
    target 9.5%: constraint missed``.

    Args:
        objective: the objective's name (:func:`selmix.list_objectives`).
        before, after: test metrics dicts (:func:`selmix.all_metrics`).
        alpha: a coverage objective's target share of the fair coverage 1/K (default 0.95,
            the objectives' default).
        num_classes: K (default: the length of ``after["per_class_recall"]``).
        baselines: maps a baseline's name to its test metrics dict.

    Returns:
        The line, starting with ``"verdict: "``.
    """
    metric, bounded = objective_metric(objective)
    if metric is None:
        return f"verdict: objective {objective!r} is not a test metric; see the table"
    parts = []
    old, new = before.get(metric), after.get(metric)
    label = METRIC_LABELS[metric]
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        change = 100 * (new - old)
        # the table shows one decimal: a change below it is no change
        outcome = "improved" if change >= 0.05 else "worse" if change <= -0.05 else "unchanged"
        parts.append(f"{label} {_percent(old)} -> {_percent(new)} ({change:+.1f}): {outcome}")
    else:
        parts.append(f"{label}: not in the metrics")
    scored = {
        name: metrics[metric]
        for name, metrics in (baselines or {}).items()
        if isinstance(metrics.get(metric), (int, float))
    }
    if scored and isinstance(new, (int, float)):
        best = max(scored, key=lambda name: scored[name])
        beaten = "beaten" if new > scored[best] else "not beaten"
        parts.append(f"best baseline {best} {_percent(scored[best])}: {beaten}")
    if bounded is not None:
        share = 0.95 if alpha is None else float(alpha)
        count = num_classes or len(after.get("per_class_recall") or []) or None
        reached = after.get(bounded)
        if count is None or not isinstance(reached, (int, float)):
            parts.append(f"{METRIC_LABELS[bounded]}: not in the metrics")
        else:
            target = share / count
            # compared as the table shows them, so the line never contradicts the table
            met = round(100 * reached, 1) >= round(100 * target, 1)
            relation = ">=" if met else "<"
            parts.append(
                f"{METRIC_LABELS[bounded]} {_percent(reached)} {relation} target "
                f"{_percent(target)}: constraint {'met' if met else 'missed'}"
            )
    return "verdict: " + "; ".join(parts)


def format_start(
    selected_step: int,
    head_init: Mapping[str, Any] | None,
    method: str,
    detail: str | None = None,
) -> str:
    """One line naming the step the run returned and the head it started from.

    Args:
        selected_step: the step whose weights were returned (0: the start).
        head_init: ``FinetuneResult.head_init`` (the chosen head and the candidates'
            scores), or None when the run kept the model's head.
        method: the run's ``head_init`` setting.
        detail: shown in parentheses after the step (e.g. how it was selected).
    """
    chosen = (head_init or {}).get("head_init") or "model"
    names = {"model": "the model's own", "posthoc_la": "post-hoc logit adjusted", "crt": "cRT"}
    head = f"start head: {names.get(chosen, chosen)} ({chosen}"
    head += f", chosen by head_init={method})" if method == "auto" else ")"
    step = f"selected step {selected_step}"
    if selected_step == 0:
        step += ", the starting weights"
    if detail:
        step += f" ({detail})"
    return f"{step}; {head}"


def objective_marks(objective: str | None) -> dict[str, str]:
    """Metric key -> its mark in a table for ``objective`` (none for a custom one)."""
    if objective is None:
        return {}
    metric, bounded = objective_metric(objective)
    marks = {metric: "objective"} if metric is not None else {}
    if bounded is not None:
        marks[bounded] = "constraint"
    return marks
