"""The SelMix fine-tuning loop (docs/maths.md, paper Alg. 1).

Every ``feedback_every`` steps: evaluate the validation set (confusion matrix C and class
means mu), update the objective's multipliers, compute the gain matrix and the mixup
distribution P (and, semi-supervised, refresh the pseudo-labels), and score the model for
the objective (the best step is kept, the start included). Every step: draw B pairs
(i, j) ~ P, x1 from class i and x2 from class j, mix their features with lam ~ U[lam_min, 1]
and take an SGD step on the cross-entropy with label i. Batch norm stays in eval mode.
With the backbone fine-tuned, a head-first phase trains the head on cached features before
the whole model trains (``head_first_steps``; docs/DESIGN.md, "Robust defaults").

A run is built, then run: :func:`selmix.finetune.build.build_run` prepares it (the split,
the checked data sets, the resolved objective and settings, the hardware choice, the
generator and sampler, the start head) as :class:`selmix.finetune.build.RunParts`, and the
loop is a :class:`Trainer` (:mod:`selmix.finetune.trainer`) that takes them and trains,
feeds back and selects. It is composed of small parts that are tested alone; each owns its
state and none knows the Trainer:

* :mod:`selmix.finetune.result`: what a run returns (:class:`FinetuneResult`);
* :mod:`selmix.finetune.best`: the best feedback step so far, its weights and ``patience``;
* :mod:`selmix.finetune.run_state`: what a resumed run must agree on (:func:`check_resume`,
  :func:`data_fingerprint`);
* :mod:`selmix.finetune.monitor`: the training loss, its divergence warning, the stops on a
  non-finite loss or a batch too large, and the JSON-lines log;
* :mod:`selmix.finetune.head_step`: the closed-form frozen-head step and the loss-scaled
  autograd step;

and, from the layers below: the settings (:mod:`selmix.engine.config`: :class:`FinetuneConfig`,
:data:`PRESETS`, :func:`resolve_objective`), the objective (:mod:`selmix.core.objectives`),
:func:`selmix.core.gain_matrix`, :func:`selmix.core.mixup_distribution`,
:class:`selmix.core.sampler.PairSampler`, a model view (:mod:`selmix.engine.views`: frozen
cached features or the full backbone), a collective (:mod:`selmix.engine.collective`: one
process or ``torchrun``) and the selection rule (:func:`selmix.core.selection.objective_score`).
"""

from selmix.engine.config import (
    HEAD_FIRST_STEPS,
    PRESETS,
    SELECT,
    FinetuneConfig,
    resolve_objective,
)
from selmix.finetune.result import FinetuneResult
from selmix.finetune.run_state import check_resume, data_fingerprint
from selmix.finetune.trainer import Trainer, finetune

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
