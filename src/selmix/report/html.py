"""Plain-text metric tables and a self-contained HTML report with PNG plots.

The text table (:func:`format_metrics_table`) needs nothing beyond the standard library.
The HTML report (:func:`write_report`) draws its plots with matplotlib's Agg canvas, which
is imported only inside the functions that draw, so ``import selmix.report`` stays light
and never touches the global pyplot backend.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from selmix._io import atomic_write_text
from selmix.devices import to_host
from selmix.report.verdict import (
    METRIC_LABELS,
    format_start,
    format_verdict,
    objective_marks,
)

__all__ = ["format_metrics_table", "format_per_class_table", "write_report"]


# -- plain-text tables -----------------------------------------------------------------------
def _scalar_keys(columns: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Metric keys present in any column: known ones first (in order), then the others."""
    present: list[str] = []
    for metrics in columns.values():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in present:
                    present.append(key)
    known = [key for key in METRIC_LABELS if key in present]
    return known + [key for key in present if key not in METRIC_LABELS]


def _format_value(value: Any, percent: bool, digits: int) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value * 100:.{digits}f}" if percent else f"{value:.{digits + 2}f}"


def _render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def format_metrics_table(
    columns: Mapping[str, Mapping[str, Any]],
    *,
    metrics: Sequence[str] | None = None,
    percent: bool = True,
    digits: int = 1,
    change: bool | None = None,
    objective: str | None = None,
) -> str:
    """A plain-text table: one row per metric, one column per run (e.g. before/after).

    Example::

        metric (%)            before  after  change
        --------------------  ------  -----  ------
        mean recall             71.3   74.0    +2.7
        min recall              35.0   58.0   +23.0

    Args:
        columns: maps a column label (``"before"``, ``"after"``, an objective name...) to a
            metrics dict such as :func:`selmix.all_metrics` returns. Non-numeric entries
            (per-class lists) are skipped.
        metrics: the metric keys to show, in order; default: every scalar metric present
            (the keys of ``all_metrics`` first, in their usual order).
        percent: show fractions as percentages.
        digits: decimals shown (in percent; two more without ``percent``).
        change: add a ``change`` column (last minus first). Default: only when there are
            exactly two columns.
        objective: the run's objective: its metric's row is marked ``(objective)`` and a
            coverage objective's bounded metric ``(constraint)``.

    Returns:
        The table as one string (no trailing newline).
    """
    if not isinstance(columns, Mapping) or not columns:
        raise ValueError("`columns` must be a non-empty mapping of label -> metrics dict")
    for label, column in columns.items():
        if not isinstance(column, Mapping):
            raise TypeError(
                f"`columns[{label!r}]` must be a metrics dict, got {type(column).__name__}"
            )
    keys = list(metrics) if metrics is not None else _scalar_keys(columns)
    labels = list(columns)
    show_change = (len(labels) == 2) if change is None else bool(change)
    header = ["metric (%)" if percent else "metric", *labels]
    if show_change:
        header.append("change")
    marks = objective_marks(objective)
    body = []
    for key in keys:
        row = [METRIC_LABELS.get(key, key)]
        row += [_format_value(columns[label].get(key), percent, digits) for label in labels]
        if show_change:
            first, last = columns[labels[0]].get(key), columns[labels[-1]].get(key)
            if isinstance(first, (int, float)) and isinstance(last, (int, float)):
                delta = (last - first) * (100 if percent else 1)
                row.append(f"{delta:+.{digits if percent else digits + 2}f}")
            else:
                row.append("-")
        if key in marks:
            row[0] += f" ({marks[key]})"
        body.append(row)
    return _render(header, body)


def format_per_class_table(
    columns: Mapping[str, Mapping[str, Any]],
    *,
    classes: Sequence[str] | None = None,
    key: str = "per_class_recall",
    digits: int = 1,
) -> str:
    """A plain-text table of a per-class metric: one row per class, one column per run.

    Args:
        columns: maps a column label to a metrics dict holding ``key`` (a list of K floats).
        classes: class names (default: the class indices).
        key: ``"per_class_recall"`` or ``"per_class_coverage"``.
        digits: decimals shown (values are shown as percentages).

    Returns:
        The table as one string.
    """
    lists = {label: list(column.get(key) or []) for label, column in columns.items()}
    num_classes = max((len(values) for values in lists.values()), default=0)
    if num_classes == 0:
        raise ValueError(f"no column of `columns` holds {key!r}")
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"`classes` has {len(names)} names but the metrics have {num_classes}")
    title = key.replace("per_class_", "") + " (%)"
    header = [f"class / {title}", *lists]
    body = []
    for index, name in enumerate(names):
        row = [f"{index} {name}" if classes is not None else name]
        for values in lists.values():
            value = values[index] if index < len(values) else None
            row.append(_format_value(value, True, digits))
        body.append(row)
    return _render(header, body)


# -- the HTML report --------------------------------------------------------------------------
def _require_matplotlib() -> Any:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "the report needs matplotlib, a dependency of selmix that is missing from this "
            "environment: pip install matplotlib (or reinstall selmix)"
        ) from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new_figure(width: float, height: float) -> Any:
        figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        return figure

    return new_figure


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower()
    return slug or "run"


def _as_list(values: Any) -> list[float]:
    if values is None:
        return []
    if hasattr(values, "detach"):
        values = to_host(values).flatten().tolist()
    return [float(v) for v in values]


def _as_matrix(values: Any) -> list[list[float]]:
    if hasattr(values, "detach"):
        values = to_host(values).double().tolist()
    return [[float(v) for v in row] for row in values]


def _normalise_run(name: str, run: Any) -> dict[str, Any]:
    """Accepts a mapping (before, after, history, gains, result) or an object with them."""
    if isinstance(run, Mapping):
        get = run.get
    else:

        def get(key: str, default: Any = None) -> Any:
            return getattr(run, key, default)

    result = get("result")
    history = get("history")
    gains = get("gains")
    if result is not None:
        history = history if history is not None else getattr(result, "history", None)
        gains = gains if gains is not None else getattr(result, "gains", None)
    metrics: dict[str, dict[str, Any]] = {}
    for label in ("before", "after"):
        given = get(label)
        if not isinstance(given, Mapping):
            raise ValueError(
                f"`runs[{name!r}]` needs a `{label}` metrics dict, got {type(given).__name__}"
            )
        metrics[label] = dict(given)
    config = getattr(result, "config", None)
    objective = get("objective")
    if objective is not None and not isinstance(objective, str):
        objective = getattr(objective, "name", None)  # an Objective, as FinetuneResult holds
    objective = objective or getattr(config, "objective", None) or name
    params = getattr(config, "objective_params", None) or {}
    baselines = get("baselines") or {}
    verdict = format_verdict(
        str(objective), metrics["before"], metrics["after"],
        alpha=get("alpha", params.get("alpha")),
        baselines={str(k): dict(v) for k, v in baselines.items()},
    )  # fmt: skip
    selected = get("selected_step", getattr(result, "selected_step", None))
    start = None
    if selected is not None:
        method = get("head_init_method") or getattr(config, "head_init", None) or "none"
        head = get("head_init", getattr(result, "head_init", None))
        start = format_start(int(selected), head, str(method))
    return {
        "before": metrics["before"],
        "after": metrics["after"],
        "history": list(history or []),
        "gains": [(int(step), _as_matrix(matrix)) for step, matrix in (gains or [])],
        "title": get("title") or name,
        "objective": str(objective),
        "verdict": verdict,
        "start": start,
        "selected_step": None if selected is None else int(selected),
    }


def _tick_labels(axis: Any, names: Sequence[str], which: str) -> None:
    count = len(names)
    if count > 20:
        return
    positions = list(range(count))
    if which == "x":
        axis.set_xticks(positions, names, rotation=45 if count > 5 else 0, ha="right")
    else:
        axis.set_yticks(positions, names)


def _plot_recall(new_figure: Any, path: Path, run: dict[str, Any], names: list[str]) -> None:
    before = _as_list(run["before"].get("per_class_recall"))
    after = _as_list(run["after"].get("per_class_recall"))
    count = max(len(before), len(after))
    figure = new_figure(max(6.0, 0.55 * count + 2), 3.6)
    axis = figure.add_subplot()
    width = 0.4
    positions = list(range(count))
    if before:
        axis.bar(
            [p - width / 2 for p in positions[: len(before)]],
            [100 * v for v in before],
            width,
            label="before",
            color="#9aa5b1",
        )
    if after:
        axis.bar(
            [p + width / 2 for p in positions[: len(after)]],
            [100 * v for v in after],
            width,
            label="after",
            color="#2f6fb0",
        )
    for values, colour, label in (
        (before, "#6b7480", "min before"),
        (after, "#1c4f85", "min after"),
    ):
        if values:
            axis.axhline(
                100 * min(values),
                color=colour,
                linestyle=":",
                linewidth=1.2,
                label=f"{label} ({100 * min(values):.1f}%)",
            )
    axis.set_ylim(0, 119)
    axis.set_ylabel("test recall (%)")
    axis.set_title(f"Per-class recall before and after fine-tuning for {run['title']}")
    _tick_labels(axis, names[:count], "x")
    axis.legend(loc="upper center", fontsize=8, ncols=4, frameon=False)
    axis.grid(axis="y", alpha=0.3)
    figure.savefig(path)


def _pick_snapshots(gains: list[tuple[int, list[list[float]]]]) -> list[tuple[str, int, Any]]:
    if not gains:
        return []
    picks = [("start", 0), ("middle", len(gains) // 2), ("end", len(gains) - 1)]
    chosen, seen = [], set()
    for label, index in picks:
        if index not in seen:
            seen.add(index)
            chosen.append((label, gains[index][0], gains[index][1]))
    return chosen


def _plot_gains(new_figure: Any, path: Path, run: dict[str, Any], names: list[str]) -> None:
    snapshots = _pick_snapshots(run["gains"])
    figure = new_figure(4.2 * len(snapshots) + 0.6, 4.0)
    axes = figure.subplots(1, len(snapshots), squeeze=False)[0]
    for axis, (label, step, matrix) in zip(axes, snapshots, strict=True):
        largest = max((abs(v) for row in matrix for v in row), default=0.0) or 1.0
        image = axis.imshow(
            matrix, cmap="RdBu_r", vmin=-largest, vmax=largest, interpolation="nearest"
        )
        positive = sum(v > 0 for row in matrix for v in row)
        axis.set_title(
            f"{label}: step {step}\nmax gain {max(map(max, matrix)):.3g}, "
            f"{positive} positive pairs",
            fontsize=9,
        )
        axis.set_xlabel("j (second sample's class)")
        axis.set_ylabel("i (label kept)")
        _tick_labels(axis, [str(i) for i in range(len(matrix))], "x")
        _tick_labels(axis, [str(i) for i in range(len(matrix))], "y")
        figure.colorbar(image, ax=axis, shrink=0.8)
    figure.suptitle(f"Gain matrix G[i, j] for {run['title']}")
    figure.savefig(path)


def _plot_history(new_figure: Any, path: Path, run: dict[str, Any], names: list[str]) -> None:
    history = run["history"]
    steps = [int(record.get("step", index)) for index, record in enumerate(history)]
    figure = new_figure(13.0, 3.6)
    axes = figure.subplots(1, 3)

    values = [record.get("objective") for record in history]
    points = [(s, float(v)) for s, v in zip(steps, values, strict=True) if v is not None]
    axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    axes[0].set_title("objective on validation (psi)")
    axes[0].set_xlabel("step")

    multipliers = [_as_list(record.get("multipliers")) for record in history]
    if any(multipliers):
        _plot_multipliers(axes[1], steps, multipliers, names)
    else:
        axes[1].text(
            0.5,
            0.5,
            "this objective has\nno multipliers",
            ha="center",
            va="center",
            transform=axes[1].transAxes,
            color="#666666",
        )
    axes[1].set_title("Lagrange multipliers")
    axes[1].set_xlabel("step")

    curves = (("mean_recall", "mean recall"), ("min_recall", "min recall"), ("g_mean", "G-mean"))
    for key, label in curves:
        series = [(s, r.get("metrics", {}).get(key)) for s, r in zip(steps, history, strict=True)]
        series = [(s, 100 * v) for s, v in series if isinstance(v, (int, float))]
        if series:
            axes[2].plot([p[0] for p in series], [p[1] for p in series], label=label)
    series = [
        (s, r.get("metrics", {}).get("min_coverage")) for s, r in zip(steps, history, strict=True)
    ]
    count = len(names)
    series = [(s, 100 * v * count) for s, v in series if isinstance(v, (int, float))]
    if series:
        axes[2].plot(
            [p[0] for p in series], [p[1] for p in series], linestyle="--", label="min coverage x K"
        )
    axes[2].set_title("validation metrics (%)")
    axes[2].set_xlabel("step")
    selected = run.get("selected_step")
    if selected is not None:
        for axis in (axes[0], axes[2]):
            axis.axvline(selected, color="#555555", linestyle=":", linewidth=1.2,
                         label=f"selected step {selected}")  # fmt: skip
        axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(f"Fine-tuning trajectory for {run['title']}")
    figure.savefig(path)


#: Multipliers drawn in colour and named; the others are grey.
HIGHLIGHTED_MULTIPLIERS = 3


def _plot_multipliers(
    axis: Any, steps: list[int], multipliers: list[list[float]], names: list[str]
) -> None:
    """The few largest multipliers (by their largest value over the run) in colour and
    named, the rest thin and grey: ten overlapping coloured lines cannot be read."""
    count = max(len(m) for m in multipliers)
    series = []
    for k in range(count):
        points = [(s, m[k]) for s, m in zip(steps, multipliers, strict=True) if len(m) > k]
        series.append(points)
    peaks = [max((abs(v) for _, v in points), default=0.0) for points in series]
    order = sorted(range(count), key=lambda k: -peaks[k])
    shown = [k for k in order[:HIGHLIGHTED_MULTIPLIERS] if peaks[k] > 0]
    rest = [k for k in range(count) if k not in shown]
    for index, k in enumerate(rest):
        axis.plot(
            [p[0] for p in series[k]], [p[1] for p in series[k]], color="#b8bec6",
            linewidth=0.8, label=f"other {len(rest)} classes" if index == 0 else None,
        )  # fmt: skip
    colours = ("#c0392b", "#2f6fb0", "#1e8449")
    for k, colour in zip(shown, colours, strict=False):
        name = names[k] if k < len(names) else str(k)
        axis.plot(
            [p[0] for p in series[k]], [p[1] for p in series[k]], color=colour,
            linewidth=1.8, label=f"{k} {name}" if name != str(k) else f"class {k}",
        )  # fmt: skip
    axis.legend(fontsize=7, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.18),
                frameon=False)  # fmt: skip


_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #1d232b; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccd; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e3e6ea; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f1f3f6; }
td.up { color: #17703a; font-weight: 600; } td.down { color: #a32020; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
table.details td { text-align: left; }
p.note { color: #555; } code { background: #f1f3f6; padding: 1px 4px; }
p.verdict { font-size: 1.05em; margin: 0.3em 0; }
p.verdict.bad { color: #a32020; } p.verdict.good { color: #17703a; }
td.objective { font-weight: 700; background: #fff7d6; } td.constraint { background: #f4f0ff; }
"""


def _html_metrics_table(runs: dict[str, dict[str, Any]], shared_before: bool) -> str:
    columns: list[tuple[str, Mapping[str, Any], Mapping[str, Any] | None]] = []
    if shared_before:
        first = next(iter(runs.values()))
        columns.append(("before", first["before"], None))
        for name, run in runs.items():
            columns.append((f"after: {name}", run["after"], first["before"]))
    else:
        for name, run in runs.items():
            columns.append((f"{name}: before", run["before"], None))
            columns.append((f"{name}: after", run["after"], run["before"]))
    keys = _scalar_keys({label: metrics for label, metrics, _ in columns})
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in columns)
    # each column's run marks its objective's metric (and a coverage objective's constraint)
    objectives = [run["objective"] for run in runs.values()]
    marks: list[dict[str, str]]
    if shared_before:
        marks = [{}] + [objective_marks(objective) for objective in objectives]
    else:
        marks = [objective_marks(objective) for objective in objectives for _ in range(2)]
    rows = []
    for key in keys:
        cells = [f"<td>{html.escape(METRIC_LABELS.get(key, key))}</td>"]
        for (_, metrics, reference), marked in zip(columns, marks, strict=True):
            value = metrics.get(key)
            text = _format_value(value, True, 1)
            classes = []
            if reference is not None and isinstance(value, (int, float)):
                old = reference.get(key)
                if isinstance(old, (int, float)) and abs(value - old) >= 5e-4:
                    classes.append("up" if value > old else "down")
            if key in marked:
                classes.append(marked[key])
                text += " \u25c0" if marked[key] == "objective" else " \u25c1"
            css = f' class="{" ".join(classes)}"' if classes else ""
            title = f' title="the run\'s {marked[key]}"' if key in marked else ""
            cells.append(f"<td{css}{title}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<table><thead><tr><th>test metric (%)</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _verdict_class(verdict: str) -> str:
    """The CSS class of a verdict line: red when the objective got worse or a constraint was
    missed, green when it improved."""
    if ": worse" in verdict or "constraint missed" in verdict:
        return "verdict bad"
    return "verdict good" if ": improved" in verdict else "verdict"


def write_report(
    out_dir: str | os.PathLike,
    runs: Mapping[str, Any],
    *,
    title: str = "SelMix report",
    classes: Sequence[str] | None = None,
    description: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``out_dir/index.html`` and its PNG plots (one folder, opens with no server).

    For each run: per-class test recall before and after (bar chart), the gain matrix at
    the start, middle and end of fine-tuning (heat-maps, from ``FinetuneResult.gains``),
    and the objective, the multipliers and the validation metrics over the steps (from
    ``FinetuneResult.history``). The page starts with the before/after metrics table.

    Args:
        out_dir: the report folder (created if needed).
        runs: maps a run name (e.g. the objective) to a mapping or object with ``before``
            and ``after`` (test metrics dicts, as :func:`selmix.all_metrics` returns) and
            optionally ``history`` and ``gains``, or ``result`` (a ``FinetuneResult`` to
            take them from).
        title: the page title.
        classes: class names for the axes (default: indices).
        description: a paragraph shown under the title (plain text).
        details: extra key/value pairs listed at the end (e.g. the configuration).

    Returns:
        The path of ``index.html``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("`runs` must be a non-empty mapping of run name -> run")
    new_figure = _require_matplotlib()
    prepared = {str(name): _normalise_run(str(name), run) for name, run in runs.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    sizes = [len(_as_list(r["after"].get("per_class_recall"))) for r in prepared.values()]
    num_classes = max(sizes, default=0)
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    befores = [run["before"] for run in prepared.values()]
    shared_before = all(before == befores[0] for before in befores)

    sections = []
    for name, run in prepared.items():
        slug = _slug(name)
        parts = [f"<h2>{html.escape(run['title'])}</h2>"]
        parts.append(
            f'<p class="{_verdict_class(run["verdict"])}">{html.escape(run["verdict"])}</p>'
        )
        if run["start"]:
            parts.append(f'<p class="note">{html.escape(run["start"])}</p>')
        figures = []
        if run["before"].get("per_class_recall") or run["after"].get("per_class_recall"):
            figures.append((f"recall_{slug}.png", _plot_recall, "per-class recall"))
        if run["gains"]:
            figures.append((f"gains_{slug}.png", _plot_gains, "gain matrices"))
        if run["history"]:
            figures.append((f"history_{slug}.png", _plot_history, "trajectory"))
        for filename, draw, alt in figures:
            draw(new_figure, out / filename, run, names)
            alt_text = html.escape(f"{alt} for {run['title']}")
            parts.append(f'<img src="{html.escape(filename)}" alt="{alt_text}">')
        if not figures:
            parts.append('<p class="note">No per-class metrics or history recorded.</p>')
        sections.append("\n".join(parts))

    intro = f"<p>{html.escape(description)}</p>" if description else ""
    verdicts = "".join(
        f'<p class="{_verdict_class(run["verdict"])}"><b>{html.escape(name)}</b> '
        f"{html.escape(run['verdict'])}</p>"
        for name, run in prepared.items()
    )
    legend = ""
    if names and classes is not None:
        items = ", ".join(f"{i} = {html.escape(str(n))}" for i, n in enumerate(names))
        legend = f'<p class="note">Classes: {items}.</p>'
    extra = ""
    if details:
        items = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td><code>{html.escape(str(v))}</code></td></tr>"
            for k, v in details.items()
        )
        extra = f'<h2>Details</h2><table class="details"><tbody>{items}</tbody></table>'
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{intro}
{verdicts}
<h2>Test metrics before and after fine-tuning</h2>
{_html_metrics_table(prepared, shared_before)}
<p class="note">Green: better than before fine-tuning; red: worse. &#9664; marks the metric
each run optimises, &#9665; a coverage objective's constraint. Coverage of a class is the
share of test predictions that fall in it (fair share = 1/K).</p>
{legend}
{"".join(sections)}
{extra}
</body>
</html>
"""
    index = out / "index.html"
    # written last and atomically: a report that exists refers only to finished images
    atomic_write_text(index, page)
    return index
