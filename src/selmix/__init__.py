"""selmix: Selective Mixup Fine-Tuning for the metric you care about on long-tailed data."""

from selmix.checkpoint import load_model, save_model
from selmix.evaluate import Evaluation, evaluate
from selmix.finetune import FinetuneConfig, FinetuneResult, Trainer, finetune
from selmix.gain import confusion_gradient, gain_matrix
from selmix.metrics import (
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
from selmix.models import create_model, list_models, register_model, split_model
from selmix.objectives import (
    Objective,
    as_objective,
    get_objective,
    list_objectives,
    register_objective,
)
from selmix.policy import (
    StationaryPointWarning,
    effective_pairs,
    mixup_distribution,
    policy_entropy,
)
from selmix.pretrain import PretrainConfig, PretrainResult, pretrain
from selmix.semisup import FixMatchConfig, FixMatchResult, fixmatch_pretrain

__version__ = "0.1.0"

__all__ = [
    "Evaluation",
    "FixMatchConfig",
    "FixMatchResult",
    "fixmatch_pretrain",
    "FinetuneConfig",
    "FinetuneResult",
    "MetricTracker",
    "PretrainConfig",
    "PretrainResult",
    "Trainer",
    "create_model",
    "evaluate",
    "finetune",
    "list_models",
    "load_model",
    "pretrain",
    "register_model",
    "save_model",
    "split_model",
    "Objective",
    "StationaryPointWarning",
    "accuracy",
    "all_metrics",
    "as_objective",
    "confusion_gradient",
    "confusion_matrix",
    "effective_pairs",
    "g_mean",
    "gain_matrix",
    "get_objective",
    "h_mean",
    "head_mask",
    "list_objectives",
    "mean_recall",
    "min_coverage",
    "min_head_tail_coverage",
    "min_head_tail_recall",
    "min_recall",
    "mixup_distribution",
    "per_class_coverage",
    "per_class_recall",
    "policy_entropy",
    "register_objective",
]
