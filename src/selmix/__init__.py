"""selmix: Selective Mixup Fine-Tuning for the metric you care about on long-tailed data.

The public API is the names below; the rest lives in the subpackages, which show the layers:
:mod:`selmix.core` (the maths), :mod:`selmix.data`, :mod:`selmix.models`,
:mod:`selmix.engine` (the machinery of a run), :mod:`selmix.baselines`,
:mod:`selmix.finetune` (the SelMix run), :mod:`selmix.report` and :mod:`selmix.cli`.
"""

from selmix._version import __version__
from selmix.baselines import baseline, list_baselines
from selmix.core import (
    Objective,
    all_metrics,
    get_objective,
    list_objectives,
    register_mixup,
    register_objective,
)
from selmix.data import load_data
from selmix.engine.evaluate import Evaluation, evaluate
from selmix.engine.pretrain import PretrainConfig, pretrain
from selmix.finetune import FinetuneConfig, FinetuneResult, Trainer, finetune
from selmix.models import create_model, list_models, register_model, split_model
from selmix.models.checkpoint import load_model, save_model

__all__ = [
    "Evaluation",
    "FinetuneConfig",
    "FinetuneResult",
    "Objective",
    "PretrainConfig",
    "Trainer",
    "__version__",
    "all_metrics",
    "baseline",
    "create_model",
    "evaluate",
    "finetune",
    "get_objective",
    "list_baselines",
    "list_models",
    "list_objectives",
    "load_data",
    "load_model",
    "pretrain",
    "register_mixup",
    "register_model",
    "register_objective",
    "save_model",
    "split_model",
]
