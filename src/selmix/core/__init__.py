"""The maths of SelMix: metrics, objectives, the gain matrix, the sampling policy.

Pure functions of K x K confusion matrices and small tensors (torch only: no I/O, no device
or process logic), as the formulas of ``docs/maths.md`` write them. The fine-tuning loop
(:mod:`selmix.finetune`) composes them; each can be used and tested alone.
"""

from selmix.core.estimates import SmallValidationWarning, shrunk_confusion
from selmix.core.gain import confusion_gradient, gain_matrix
from selmix.core.metrics import (
    MetricTracker,
    accuracy,
    all_metrics,
    confusion_matrix,
    g_mean,
    h_mean,
    head_mask,
    mean_recall,
    min_coverage,
    min_head_tail_coverage,
    min_head_tail_recall,
    min_recall,
    per_class_coverage,
    per_class_recall,
)
from selmix.core.mixing import MixedBatch, MixupOperation, list_mixups, register_mixup
from selmix.core.objectives import (
    Objective,
    as_objective,
    get_objective,
    list_objectives,
    register_objective,
)
from selmix.core.policy import (
    StationaryPointWarning,
    effective_pairs,
    mixup_distribution,
    policy_entropy,
)
from selmix.core.selection import ObjectiveScore, best_index, objective_score

__all__ = [
    "MetricTracker",
    "MixedBatch",
    "MixupOperation",
    "Objective",
    "ObjectiveScore",
    "SmallValidationWarning",
    "StationaryPointWarning",
    "accuracy",
    "all_metrics",
    "as_objective",
    "best_index",
    "confusion_gradient",
    "confusion_matrix",
    "effective_pairs",
    "g_mean",
    "gain_matrix",
    "get_objective",
    "h_mean",
    "head_mask",
    "list_mixups",
    "list_objectives",
    "mean_recall",
    "min_coverage",
    "min_head_tail_coverage",
    "min_head_tail_recall",
    "min_recall",
    "mixup_distribution",
    "objective_score",
    "per_class_coverage",
    "per_class_recall",
    "policy_entropy",
    "register_mixup",
    "register_objective",
    "shrunk_confusion",
]
