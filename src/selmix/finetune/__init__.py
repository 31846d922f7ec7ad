"""The SelMix fine-tuning loop (MATH.md section 5, paper Alg. 1).

Every ``feedback_every`` steps: evaluate the validation set (confusion matrix C and class
means mu), update the objective's multipliers, compute the gain matrix and the mixup
distribution P (and, semi-supervised, refresh the pseudo-labels), and score the model for
the objective (the best step is kept, the start included). Every step: draw B pairs
(i, j) ~ P, x1 from class i and x2 from class j, mix their features with lam ~ U[lam_min, 1]
and take an SGD step on the cross-entropy with label i. Batch norm stays in eval mode.
With the backbone fine-tuned, a head-first phase trains the head on cached features before
the whole model trains (``head_first_steps``; docs/DESIGN.md, "Robust defaults").

The loop is a :class:`Trainer` (:mod:`selmix.finetune.trainer`) composed of small parts that
are tested alone; each owns its state and none knows the Trainer:

* :mod:`selmix.finetune.config`: the settings (:class:`FinetuneConfig`, :data:`PRESETS`)
  and the resolution of a run's objective and head classes (:func:`resolve_objective`);
* :mod:`selmix.finetune.result`: what a run returns (:class:`FinetuneResult`);
* :mod:`selmix.finetune.best`: the best feedback step so far, its weights and ``patience``;
* :mod:`selmix.finetune.run_state`: what a resumed run must agree on (:func:`check_resume`,
  :func:`data_fingerprint`);
* :mod:`selmix.finetune.monitor`: the training loss, its divergence warning, the stops on a
  non-finite loss or a batch too large, and the JSON-lines log;
* :mod:`selmix.finetune.head_step`: the closed-form frozen-head step and the loss-scaled
  autograd step;

and, from the rest of selmix: the objective (:mod:`selmix.objectives`),
:func:`selmix.gain_matrix`, :func:`selmix.mixup_distribution`,
:class:`selmix.sampler.PairSampler`, a model view (:mod:`selmix.views`: frozen cached features
or the full backbone), a collective (:mod:`selmix.collective`: one process or ``torchrun``) and
the selection rule (:func:`selmix.selection.objective_score`).
"""

from selmix.feedback import smoothed_confusion as smoothed_confusion  # re-exported (old name)
from selmix.finetune.config import CHECKPOINT_EVERY as CHECKPOINT_EVERY
from selmix.finetune.config import (
    HEAD_FIRST_STEPS,
    PRESETS,
    SELECT,
    FinetuneConfig,
    resolve_objective,
)
from selmix.finetune.config import PRECISION_DEFAULT as PRECISION_DEFAULT
from selmix.finetune.head_step import _LinearHeadStep as _LinearHeadStep
from selmix.finetune.monitor import DIVERGENCE_FACTOR as DIVERGENCE_FACTOR
from selmix.finetune.result import FinetuneResult
from selmix.finetune.run_state import check_resume, data_fingerprint
from selmix.finetune.trainer import Trainer, finetune
from selmix.optim import split_sgd_cosine
from selmix.views import MixupForward

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "HEAD_FIRST_STEPS",
    "PRESETS",
    "SELECT",
    "Trainer",
    "check_resume",
    "data_fingerprint",
    "finetune",
    "resolve_objective",
]

# the old name of the training module (tests and scripts import it from here)
_MixupForward = MixupForward
#: the optimiser of fine-tuning, now in :mod:`selmix.optim` (this name stays for old imports)
sgd_cosine = split_sgd_cosine
