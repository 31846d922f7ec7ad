"""The baselines SelMix is compared against, for any model :func:`selmix.split_model` splits.

* :func:`posthoc_logit_adjustment` (Menon et al. 2020): predict with
  ``logits - tau * log(prior)``, tau tuned on the validation set for the objective. The
  result is an ordinary classifier: the shift lives in its head's bias.
* :func:`classifier_retraining` (cRT, Kang et al. 2020): freeze the backbone, re-initialise
  the linear head and retrain it on features computed once, with class-balanced sampling;
  optionally with label-aware smoothing (:func:`label_aware_smoothing`).
* :func:`mislas_stage2`: MiSLAS's stage 2 (Zhong et al. 2021) on a frozen backbone: cRT that
  fine-tunes the model's own head with label-aware smoothing.
* :func:`logit_adjusted_finetune`: fine-tune with the logit-adjusted cross-entropy and
  instance-balanced sampling under SelMix fine-tuning's optimiser (SGD with momentum, weight
  decay, cosine decay, batch norm frozen), i.e. SelMix's fine-tuning without the mixup.

:func:`objective_score` (from :mod:`selmix.core.selection`, re-exported here) is the post-hoc
baseline's rule for tau, the same rule that picks fine-tuning's best step.
:func:`baseline` runs one by name with a :class:`BaselineConfig` (as :func:`selmix.finetune`
runs SelMix with a :class:`selmix.FinetuneConfig`); :func:`run_baseline` runs one by name
with its function's keyword arguments (:func:`list_baselines`; ``"start"`` is an unchanged
copy of the model).

Uniform and greedy mixup, and SelMix itself, are not in this registry: they are
:func:`selmix.finetune` with ``policy="uniform"``, ``"greedy"`` or ``"selmix"``.

One module per method (:mod:`~selmix.baselines.posthoc`, :mod:`~selmix.baselines.crt`,
:mod:`~selmix.baselines.mislas`, :mod:`~selmix.baselines.logit_adjusted`); what they share
(the copied model, the frozen backbone's training features, the optimiser step) is
:mod:`selmix.baselines._common`; the registry and the configuration
(:mod:`~selmix.baselines.registry`) sit above them.

Every function returns a new model and leaves the one it is given untouched.
"""

from selmix.baselines.crt import (
    ClassBalancedSampler,
    classifier_retraining,
    label_aware_smoothing,
    smoothed_cross_entropy,
)
from selmix.baselines.logit_adjusted import logit_adjusted_finetune
from selmix.baselines.mislas import mislas_stage2
from selmix.baselines.posthoc import (
    DEFAULT_TAUS,
    PosthocResult,
    class_log_prior,
    posthoc_logit_adjustment,
)
from selmix.baselines.registry import (
    BASELINES,
    BaselineConfig,
    BaselineResult,
    baseline,
    list_baselines,
    run_baseline,
)
from selmix.core.selection import ObjectiveScore, best_index, objective_score

__all__ = [
    "BASELINES",
    "DEFAULT_TAUS",
    "BaselineConfig",
    "BaselineResult",
    "ClassBalancedSampler",
    "ObjectiveScore",
    "PosthocResult",
    "baseline",
    "best_index",
    "class_log_prior",
    "classifier_retraining",
    "label_aware_smoothing",
    "list_baselines",
    "logit_adjusted_finetune",
    "mislas_stage2",
    "objective_score",
    "posthoc_logit_adjustment",
    "run_baseline",
    "smoothed_cross_entropy",
]
