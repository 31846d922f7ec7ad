"""What a run reports: plain-text tables, the verdict against the baselines, the HTML report.

:mod:`selmix.report.verdict` says whether a fine-tuned model beat its start and the simple
baselines; :mod:`selmix.report.html` writes the tables and the self-contained HTML report.
"""

from selmix.report.html import format_metrics_table, format_per_class_table, write_report
from selmix.report.verdict import (
    METRIC_LABELS,
    format_start,
    format_verdict,
    objective_marks,
    objective_metric,
)

__all__ = [
    "METRIC_LABELS",
    "format_metrics_table",
    "format_per_class_table",
    "format_start",
    "format_verdict",
    "objective_marks",
    "objective_metric",
    "write_report",
]
