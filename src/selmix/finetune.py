"""The SelMix fine-tuning loop (MATH.md section 5, paper Alg. 1).

Every ``feedback_every`` steps: evaluate the validation set (confusion matrix C and class
means mu), update the objective's multipliers, compute the gain matrix and the mixup
distribution P (and, semi-supervised, refresh the pseudo-labels), and score the model for
the objective (the best step is kept, the start included). Every step: draw B pairs
(i, j) ~ P, x1 from class i and x2 from class j, mix their features with lam ~ U[lam_min, 1]
and take an SGD step on the cross-entropy with label i. Batch norm stays in eval mode.
With the backbone fine-tuned, a head-first phase trains the head on cached features before
the whole model trains (``head_first_steps``; docs/DESIGN.md, "Robust defaults").

The loop is a :class:`Trainer` composed of small parts that are tested alone: the
objective (:mod:`selmix.objectives`), :func:`selmix.gain_matrix`,
:func:`selmix.mixup_distribution`, :class:`selmix.sampler.PairSampler`, a model view
(:mod:`selmix.views`: frozen cached features or the full backbone), a collective
(:mod:`selmix.collective`: one process or ``torchrun``) and the selection rule
(:func:`selmix.selection.objective_score`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from selmix._config import (
    Choice,
    ClassIndices,
    ConfigMixin,
    Dict,
    Flag,
    Int,
    Optional,
    Real,
    Seed,
    setting,
)
from selmix._io import atomic_write_text
from selmix._progress import progress_bar
from selmix._validation import check_head_classes, check_labels
from selmix.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    require_keys,
    restore_rng_state,
    save_checkpoint,
    save_model,
)
from selmix.collective import Collective, SingleProcess
from selmix.evaluate import DEVICE_HELP, Evaluation, as_batch_dataset, evaluate
from selmix.feedback import feedback_step
from selmix.feedback import smoothed_confusion as smoothed_confusion  # re-exported (old name)
from selmix.hardware import resolve_for_run
from selmix.memory import resolve_eval_batch_size
from selmix.metrics import all_metrics, infer_head_classes
from selmix.objectives import Objective, as_objective, get_objective
from selmix.optim import split_sgd_cosine
from selmix.policy import POLICIES, effective_pairs, policy_entropy
from selmix.precision import (
    channels_last_setting,
    configure_threads,
    grad_scaler,
    precision_setting,
    threads_setting,
    to_channels_last,
)
from selmix.sampler import PairSampler
from selmix.selection import ObjectiveScore, objective_score
from selmix.timing import PhaseTimings, backbone_feedback_every
from selmix.views import MixupForward, PairPools, make_view

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

SELECT = ("best", "last")
#: The default ``precision`` of fine-tuning (see docs/results/precision_parity.md).
PRECISION_DEFAULT = "fp32"
#: Steps of the head-first phase when the backbone is fine-tuned and ``head_first_steps``
#: is unset (docs/DESIGN.md, "Robust defaults").
HEAD_FIRST_STEPS = 2000

#: Named sets of settings (``FinetuneConfig.preset``), applied under the user's own values.
#: ``"defaults"`` changes nothing: the field defaults are the robust defaults of
#: docs/DESIGN.md. ``"paper"`` is the paper's supervised recipe (MATH.md sections 5-6: the
#: whole model fine-tuned, E = 50, s = 10 on the raw gain, no smoothing, 2k steps of B = 128,
#: lr_W = 3e-3, lr_g = 3e-4) with the last step returned.
PRESETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "paper": {
        "frozen_backbone": False,
        "head_first_steps": 0,
        "steps": 2000,
        "batch_size": 128,
        "feedback_every": 50,
        "backbone_feedback_every": 50,
        "gain_scale": 10.0,
        "normalize_gain": False,
        "confusion_smoothing": 0.0,
        "lr_head": 3e-3,
        "lr_backbone": None,
        "select": "last",
        "soft_confusion": False,
        "uniform_mix": 0.0,
        "multiplier_step": 1.0,
    },
}
#: Steps between resume checkpoints unless set (see ``FinetuneConfig.checkpoint_every``).
CHECKPOINT_EVERY = 200
#: The training loss is reported as diverging above this multiple of
#: ``max(first step's loss, log K)`` (log K: the loss of a uniform guess).
DIVERGENCE_FACTOR = 5.0

RunConfig = TypeVar("RunConfig", bound=ConfigMixin)

# the old name of the training module (tests and scripts import it from here)
_MixupForward = MixupForward


@dataclass
class FinetuneConfig(ConfigMixin):
    """Settings of a SelMix fine-tuning run.

    The defaults are the robust defaults of docs/DESIGN.md ("Robust defaults", measured by
    ``benchmarks/robustness.py``): the head trains on frozen features for 4000 steps with
    feedback every 10 steps, a scale-free policy (s = 3), a pseudo-count of 1 on the
    validation confusion matrix, and the best validation step is returned.
    ``preset="paper"`` gives the paper's recipe (:data:`PRESETS`); a preset fills only the
    settings the user did not give (see :meth:`from_dict`).

    Each field declares its help text, constraint, CLI flag and whether a resumed run must
    agree on it (``run``); see :mod:`selmix._config`; :func:`selmix._config.settings_of` lists
    them.
    """

    settings_name = "fine-tuning"

    preset: str = setting(
        "defaults", check=Choice(tuple(PRESETS)), flag=True,
        help="named settings applied under the ones given: 'defaults' (the robust defaults) "
        "or 'paper' (the paper's recipe: backbone fine-tuned, 2000 steps, E = 50, s = 10 on "
        "the raw gain, no smoothing, the last step returned)",
    )  # fmt: skip
    objective: str = setting(
        "min_recall", help="objective to maximise (see the list below)", run=True, flag=True,
        metavar="NAME",
    )  # fmt: skip
    objective_params: dict[str, Any] = setting(
        default_factory=dict, check=Dict(), run=True,
        help="objective hyper-parameters, e.g. {rate: 20}",
    )  # fmt: skip
    policy: str = setting(
        "selmix", help="mixup pair policy", check=Choice(POLICIES), run=True, flag=True
    )
    gain_scale: float = setting(
        3.0, help="s in P ~ exp(s * gain) (the paper: 10 on the raw gain)", check=Real(),
        run=True, flag=True,
    )  # fmt: skip
    normalize_gain: bool = setting(
        True, help="scale-free policy exp(s * G / max|G|) (the paper: off)", check=Flag(),
        run=True, flag=True,
    )  # fmt: skip
    steps: int = setting(
        4000, help="SGD steps, the head-first phase included", check=Int(1), run=True,
        flag=True,
    )  # fmt: skip
    batch_size: int = setting(
        128, help="mixup pairs per step (the global batch)", check=Int(1), run=True, flag=True
    )
    lr_head: float = setting(
        3e-3, help="learning rate of the linear head", check=Real(), run=True, flag=True
    )
    lr_backbone: float | None = setting(
        None, help="backbone learning rate; unset: lr_head / 10, or lr_head / 100 after a "
        "head-first phase (whose backbone phase trains the head at lr_head / 10)",
        check=Optional(Real(strict=False)), run=True,
    )  # fmt: skip
    frozen_backbone: bool = setting(
        True, help="train the linear head only, on features computed once (off: the whole "
        "model, after a head-first phase)", check=Flag(), run=True, flag=True,
    )  # fmt: skip
    head_first_steps: int | None = setting(
        None, check=Optional(Int(0)), run=True, flag=True, metavar="STEPS",
        help="with frozen_backbone off: the first STEPS steps train the head on cached "
        f"features, the rest the whole model; unset: {HEAD_FIRST_STEPS} (steps // 2 for "
        "shorter runs; 0: the paper)",
    )  # fmt: skip
    momentum: float = setting(0.9, help="SGD momentum", check=Real(high=1.0), run=True)
    weight_decay: float = setting(5e-4, help="SGD weight decay", check=Real(strict=False), run=True)
    feedback_every: int = setting(
        10, help="steps between feedback (validation) steps (the paper: 50)", check=Int(1),
        run=True, flag=True,
    )  # fmt: skip
    # the whole-model phase evaluates less often: at feedback_every it spent most of its
    # time on the validation set (docs/results/feedback_share.md)
    backbone_feedback_every: int | None = setting(
        None, check=Optional(Int(1)), run=True, metavar="STEPS",
        help="steps between feedback steps while the whole model trains; unset: the "
        "smallest multiple of feedback_every that keeps feedback near 15% of the phase's "
        "time (selmix.timing.backbone_feedback_every, from the validation size and "
        "batch_size; the paper: 50)",
    )  # fmt: skip
    lam_min: float = setting(
        0.6, help="mixing weights lam ~ U[lam_min, 1]", check=Real(high=1.0), run=True
    )
    confusion_smoothing: float = setting(
        1.0, check=Real(strict=False), run=True, flag=True,
        help="pseudo-count added to each validation confusion cell before the multipliers "
        "and the gain (0 = the paper; 1 lets the gain see classes with zero recall)",
    )  # fmt: skip
    soft_confusion: bool = setting(
        False, check=Flag(), run=True,
        help="use the validation softmax probabilities (never 0) in the gain's derivative "
        "factor instead of the counts (an alternative to confusion_smoothing)",
    )  # fmt: skip
    uniform_mix: float = setting(
        0.0, check=Real(strict=False, high=1.0), run=True,
        help="share eps of the uniform policy mixed into P: (1 - eps) P + eps / K^2",
    )  # fmt: skip
    multiplier_step: float = setting(
        1.0, check=Real(high=1.0), run=True,
        help="step a of the multiplier update l <- (1 - a) l + a l_new (1: the paper)",
    )  # fmt: skip
    augment: bool = setting(
        True, help="random crop and flip (full-backbone mode)", check=Flag(), run=True
    )
    select: str = setting(
        "best", check=Choice(SELECT), run=True, flag=True,
        help="the model returned: the best feedback step on the validation objective "
        "(the start included) or the last step",
    )  # fmt: skip
    patience: int | None = setting(
        None, check=Optional(Int(1)), run=True,
        help="stop after this many feedback steps without a better validation score; "
        "unset: never stop early",
    )  # fmt: skip
    eval_batch_size: int | None = setting(
        None, check=Optional(Int(1)), metavar="N",
        help="batch size of evaluation and feature extraction; unset: sized from the input "
        "size, the model's activations and the memory available (selmix.memory; at most 512)",
    )  # fmt: skip
    seed: int = setting(
        0, help="random seed (model initialisation, data split, sampling)", check=Seed(),
        run=True, flag=True,
    )  # fmt: skip
    device: str = setting(
        "cpu", help=f"where to run: {DEVICE_HELP}", cli_default="auto", flag=True,
        metavar="DEVICE",
    )  # fmt: skip
    precision: str = precision_setting(PRECISION_DEFAULT, run=True, flag=True)
    threads: int | None = threads_setting(flag=True)
    channels_last: bool | str = channels_last_setting(flag=True)
    compile: bool = setting(
        False, check=Flag(), flag=True,
        help="torch.compile the feature extractor (pays back its compile time only in "
        "long full-backbone runs; see docs/results/compile_speed.md)",
    )  # fmt: skip
    head_classes: list[int] | None = setting(
        None, help="head classes for head/tail metrics and objectives; unset: the 90% most "
        "frequent training classes", check=Optional(ClassIndices()),
    )  # fmt: skip
    log_path: str | None = setting(
        None, help="JSON-lines file of one record per feedback step", cli=False
    )
    checkpoint_path: str | None = setting(
        None, help="where resume checkpoints go (written atomically)", cli=False
    )
    # every 200 steps: 5 checkpoints in a default run, each resumable bit-identically. A
    # checkpoint holds about three copies of the weights (model, momentum, best): for
    # ResNet-32 5.5 MiB written in 32 ms against 1.47 s per B = 128 step on one CPU thread,
    # 0.01% of the time (benchmarks/checkpoint_cost.py); a GPU step of ~10 ms would make it
    # ~2%, still cheap for at most 200 steps lost to a kill
    checkpoint_every: int | None = setting(
        CHECKPOINT_EVERY, check=Optional(Int(1)), flag=True, metavar="STEPS",
        help="steps between resume checkpoints (OUT/finetune_state.pt, also written at the "
        "end); null (--set checkpoint_every=null): only at the end",
    )  # fmt: skip
    progress: bool = setting(
        True, check=Flag(), flag=True,
        help="show progress (a bar on a terminal, a plain line every tenth of the run otherwise; "
        "TQDM_DISABLE=1 also turns it off)",
    )  # fmt: skip
    tensorboard_dir: str | None = setting(
        None, flag=True, key="tensorboard", metavar="DIR",
        help="also log every feedback step (metrics, multipliers, the gain matrix as an "
        "image) to TensorBoard in DIR (needs the extra selmix[tensorboard])",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.multiplier_step <= 0:
            raise ValueError(f"`multiplier_step` must be in (0, 1], got {self.multiplier_step}")
        if not self.frozen_backbone and self.head_first_steps is not None:
            if self.head_first_steps >= self.steps:
                raise ValueError(
                    f"`head_first_steps` must be < `steps` ({self.steps}) when the backbone "
                    f"is fine-tuned, got {self.head_first_steps}"
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Builds a config; the preset named in ``values`` fills the settings it lacks.

        ``values`` holds what the user gave (a YAML file, keyword overrides); a full dict
        (``to_dict``) leaves its preset nothing to fill, so :meth:`replace` never re-applies
        one.

        Raises:
            ValueError: an unknown setting or preset (one line).
        """
        name = values.get("preset", "defaults")
        if name not in PRESETS:
            raise ValueError(
                f"`preset` must be one of {', '.join(map(repr, PRESETS))}, got {name!r}"
            )
        return super().from_dict({**PRESETS[name], **values})

    @classmethod
    def resolve(
        cls, config: FinetuneConfig | dict[str, Any] | None, overrides: dict[str, Any]
    ) -> FinetuneConfig:
        """The config of a run: defaults < preset < ``config`` < ``overrides``.

        A preset named in ``overrides`` over a :class:`FinetuneConfig` instance is applied
        over the instance (whose fields cannot tell given from default values), then the
        other overrides.
        """
        if config is None or isinstance(config, dict):
            return cls.from_dict({**(config or {}), **overrides})
        if isinstance(config, cls) and "preset" in overrides:
            name = overrides["preset"]
            cls.from_dict({"preset": name})  # one-line error for an unknown name
            return config.replace(**{**PRESETS[name], **overrides})
        return super().resolve(config, overrides)

    @property
    def head_first(self) -> int:
        """Steps of the head-first phase: 0 with a frozen backbone, else
        ``head_first_steps`` (unset: :data:`HEAD_FIRST_STEPS`, or ``steps // 2`` for a
        shorter run)."""
        if self.frozen_backbone:
            return 0
        if self.head_first_steps is None:
            # a run too short for the full phase splits evenly
            return HEAD_FIRST_STEPS if self.steps > HEAD_FIRST_STEPS else self.steps // 2
        return self.head_first_steps

    @property
    def backbone_lr(self) -> float:
        """The feature extractor's learning rate (``lr_head / 10`` unless set; after a
        head-first phase ``lr_head / 100``, a tenth of the phase's head rate)."""
        if self.lr_backbone is not None:
            return self.lr_backbone
        return self.lr_head / (100 if self.head_first else 10)

    @property
    def backbone_phase_lr_head(self) -> float:
        """The head's learning rate while the backbone trains: ``lr_head``, or
        ``lr_head / 10`` after a head-first phase (a head trained to a sharp optimum
        forgets classes at the full rate; docs/DESIGN.md)."""
        return self.lr_head / 10 if self.head_first else self.lr_head

    @property
    def mix(self) -> float:
        """m = E[lam] = (1 + lam_min) / 2, the weight of x1 in the expected mixed feature."""
        return (1 + self.lam_min) / 2


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the fine-tuned model (the object that was passed in), holding the weights
            of the selected step (``config.select``).
        split: its (features, head) split.
        objective: the objective, with its last multipliers.
        config: the resolved configuration (head classes and objective parameters
            filled in).
        history: one record per feedback step (validation metrics, objective value and
            score, multipliers, largest gain, policy entropy, learning rates, mean loss).
        gains: ``(step, Tensor[K, K])`` gain matrices of the feedback steps (all of them for
            K <= 200, else the first and the last).
        selected_step: the step whose weights :attr:`model` holds.
        best_step: the feedback step with the best validation score (0: the start).
        last_step: the step the run ended at (before ``config.steps`` if it stopped early).
        best_state, last_state: CPU ``state_dict`` copies of the best and the last weights.
    """

    model: nn.Module
    split: Any
    objective: Objective
    config: FinetuneConfig
    history: list[dict[str, Any]]
    gains: list[tuple[int, torch.Tensor]]
    selected_step: int = 0
    best_step: int = 0
    last_step: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    last_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: wall time of training and feedback per phase (:class:`selmix.timing.PhaseTimings`)
    timings: dict[str, Any] = field(default_factory=dict)
    #: what ``auto`` precision and layout resolved to (:class:`selmix.hardware.HardwareChoice`)
    hardware: dict[str, Any] = field(default_factory=dict)

    def model_at(self, which: str) -> nn.Module:
        """A copy of the model with the ``"best"`` or the ``"last"`` weights."""
        if which not in SELECT:
            raise ValueError(f"`which` must be 'best' or 'last', got {which!r}")
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.best_state if which == "best" else self.last_state)
        return model

    def evaluate(self, dataset: Any) -> Evaluation:
        """Confusion counts and prototypes of the fine-tuned model on ``dataset``."""
        return evaluate(
            self.model, dataset, self.config.device, self.config.eval_batch_size,
            features=self.split.features, head=self.split.head,
        )  # fmt: skip

    def metrics(self, dataset: Any) -> dict[str, Any]:
        """Every metric of :func:`selmix.all_metrics` on ``dataset``."""
        return self.evaluate(dataset).metrics(self.config.head_classes)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Saves the model (rebuildable with :func:`selmix.load_model` for registry models)."""
        meta = {"finetune_config": self.config.to_dict(), **(meta or {})}
        return save_model(path, self.model, meta)


#: the optimiser of fine-tuning, now in :mod:`selmix.optim` (this name stays for old imports)
sgd_cosine = split_sgd_cosine


def _plain(value: Any) -> Any:
    """Tensors and tuples as lists, recursively (for YAML, JSON and checkpoints)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def resolve_objective(
    config: RunConfig,
    objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str | None,
    train_labels: Any,
    num_classes: int,
) -> tuple[RunConfig, Objective]:
    """The run's objective and its config with everything the run uses filled in.

    The one place where a run is resolved, so that :func:`finetune`, a :class:`Trainer`
    and the CLI get the same run from the same settings:

    * ``head_classes`` unset: the 90% most frequent training classes
      (:func:`selmix.metrics.infer_head_classes`);
    * the objective: ``objective`` if given (a name, an :class:`Objective` or a callable),
      else ``config.objective`` with ``config.objective_params``; an objective that uses
      head classes and was given none gets the config's;
    * the config records the objective's name and its hyper-parameters
      (``objective_params``), e.g. ``{"rate": 20}`` for ``MinRecall(rate=20)``.

    Args:
        config: the settings as given: a :class:`FinetuneConfig` or any configuration
            with ``objective``, ``objective_params`` and ``head_classes`` fields (e.g.
            :class:`selmix.baselines.BaselineConfig`).
        objective: overrides ``config.objective`` when not None.
        train_labels: Tensor[N] of training labels (for the head classes).
        num_classes: K.

    Returns:
        ``(config, objective)``.
    """
    head_classes = config.head_classes
    if head_classes is None:
        head_classes = infer_head_classes(train_labels, num_classes)
    else:
        head_classes = check_head_classes(head_classes, num_classes)
    if objective is None:
        objective = get_objective(config.objective, **config.objective_params)
    elif isinstance(objective, str):
        objective = get_objective(objective, **config.objective_params)
    else:
        objective = as_objective(objective)
    if "head_classes" in objective.hyperparameters() and objective.head_classes is None:
        objective.head_classes = list(head_classes)
    config = config.replace(
        objective=objective.name,
        objective_params=_plain(objective.hyperparameters()),
        head_classes=_plain(head_classes),
    )
    return config, objective


class _BestSoFar:
    """The best feedback step so far by validation score, with a CPU copy of its weights."""

    def __init__(self) -> None:
        self.score: ObjectiveScore | None = None
        self.step = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.stale = 0  # feedback steps since the best

    def offer(self, score: ObjectiveScore, step: int, model: nn.Module) -> bool:
        """Keeps ``model``'s weights if ``score`` beats the best (ties keep the earlier)."""
        if self.score is not None and not score > self.score:
            self.stale += 1
            return False
        self.score, self.step, self.stale = score, step, 0
        self.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return True

    def exhausted(self, patience: int | None) -> bool:
        """Whether ``patience`` feedback steps in a row failed to beat the best."""
        return patience is not None and self.stale >= patience

    def state_dict(self) -> dict[str, Any]:
        score = None if self.score is None else self.score.to_dict()
        return {"score": score, "step": self.step, "weights": self.weights, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        score = state["score"]
        self.score = None if score is None else ObjectiveScore(
            score["metric"], score["coverage"], score["target"]
        )  # fmt: skip
        self.step, self.weights, self.stale = state["step"], state["weights"], state["stale"]


def _check_datasets(train: Any, val: Any, num_classes: int) -> None:
    """Labels in range, every class in ``val``, declared class counts that match the head.

    The missing classes are named first: a validation set that lacks its last class
    infers one class fewer, and "no samples of class(es) [9]" says what is wrong where
    "num_classes = 9 but the head has 10" does not.
    """
    check_labels("train", train.labels, num_classes)
    check_labels("val", val.labels, num_classes, every_class=True)
    for name, dataset in (("train", train), ("val", val)):
        declared = getattr(dataset, "num_classes", None)
        if declared is not None and declared != num_classes:
            raise ValueError(
                f"`{name}` has num_classes = {declared} but the model's head has "
                f"{num_classes} outputs"
            )


def _append_json_line(path: str, record: dict[str, Any]) -> None:
    file_path = Path(path)
    file_path.parent.mkdir(parents=True, exist_ok=True)
    with file_path.open("a") as file:
        file.write(json.dumps(record) + "\n")


def _pseudo_label_report(pseudo_labels: torch.Tensor, unlabelled: Any, num_classes: int) -> dict:
    """The feedback record's pseudo-label histogram (and accuracy, if the labels are known)."""
    histogram = torch.bincount(pseudo_labels, minlength=num_classes)
    report: dict[str, Any] = {"pseudo_label_histogram": histogram.tolist()}
    true_labels = getattr(unlabelled, "hidden_labels", None)
    if true_labels is not None:
        # reporting only: the hidden labels never reach the sampler or the loss
        agree = torch.as_tensor(true_labels).long() == pseudo_labels
        report["pseudo_label_accuracy"] = float(agree.double().mean())
    return report


def _check_finite(loss: float, step: int, good_checkpoint: tuple[str, int] | None) -> None:
    """Stops on a non-finite loss, naming a checkpoint only if this run wrote it with
    finite weights (see :meth:`Trainer.save_checkpoint`)."""
    if not math.isfinite(loss):
        where = ""
        if good_checkpoint is not None:
            path, saved_step = good_checkpoint
            where = f"; the last checkpoint with finite weights is {path!r} (step {saved_step})"
        raise FloatingPointError(
            f"non-finite loss ({loss}) at step {step}: lower `lr_head` / "
            f"`lr_backbone` or use `frozen_backbone`{where}"
        )


class _LinearHeadStep:
    """The gradients of the frozen-backbone step in closed form, without autograd.

    For a linear head ``z = x W^T + b`` and the mean cross-entropy over a batch of B,
    ``dL/dz = (softmax(z) - onehot(y)) / B``, ``dL/dW = (dL/dz)^T x`` and
    ``dL/db = sum_rows dL/dz``. They are computed with the kernels autograd runs for
    ``F.cross_entropy(head(x), y).backward()`` (the log-softmax backward of the NLL
    gradient, ``(dL/dz)^T x`` as one ``mm``, a row sum), so loss and gradients are
    bit-identical to autograd's (tests/test_finetune.py compares them), and the update stays
    ``torch.optim.SGD``'s own (``optimizer.step()``: weight decay, momentum, hooks).
    The autograd graph, ``zero_grad`` and the module call were most of a head step's time
    (docs/results/finetune_speed_trainer.md).
    """

    def __init__(self, head: nn.Linear) -> None:
        self.head = head

    def loss_and_gradients(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Sets ``head.weight.grad`` (and ``head.bias.grad``) for the batch; returns the loss.

        Args:
            features: float32 Tensor[B, d], the head's input.
            labels: LongTensor[B] on the same device.
        """
        head = self.head
        batch = features.shape[0]
        with torch.no_grad():
            log_probs = torch.log_softmax(F.linear(features, head.weight, head.bias), dim=1)
            loss = F.nll_loss(log_probs, labels)
            # the NLL loss's gradient (-1/B at the labels), through autograd's own
            # log-softmax backward kernel: softmax / B minus 1/B at the labels
            grad_log_probs = torch.zeros_like(log_probs)
            grad_log_probs.scatter_(1, labels[:, None], -1.0 / batch)
            grad_logits = torch._log_softmax_backward_data(
                grad_log_probs, log_probs, 1, log_probs.dtype
            )
            head.weight.grad = grad_logits.t().mm(features)
            if head.bias is not None:
                head.bias.grad = grad_logits.sum(0)
        return float(loss)


def _closed_form_head_step(view: Any, collective: Collective) -> _LinearHeadStep | None:
    """The closed-form head step where it is exact: a frozen backbone and a plain
    ``nn.Linear`` head (no subclass, no hooks, trainable weights)."""
    from selmix.views import FrozenFeatures

    head = view.split.head
    if not isinstance(view, FrozenFeatures) or type(head) is not nn.Linear:
        return None
    if head._forward_hooks or head._forward_pre_hooks or head._backward_hooks:
        return None
    if not all(param.requires_grad for param in head.parameters()):
        return None
    return _LinearHeadStep(head)


def _weights_are_finite(model: nn.Module) -> bool:
    return all(
        bool(torch.isfinite(value).all())
        for value in model.state_dict().values()
        if value.is_floating_point()
    )


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or any(
        sign in text for sign in ("out of memory", "DefaultCPUAllocator", "Unable to allocate")
    )


def _labels_digest(labels: Any) -> str:
    data = torch.as_tensor(labels).long().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def data_fingerprint(train: Any, val: Any, unlabelled: Any = None) -> dict[str, Any]:
    """What a resumed run must find again in its data: the sizes of the sets and a digest
    of their labels in order (cheap: no images are read).

    Args:
        train, val: the labelled sets (anything with ``labels`` and a length).
        unlabelled: the unlabelled set, if any (its size only: its labels are never read).

    Returns:
        Plain data, e.g. ``{"train": [5000, "3f2a..."], "val": [...], "unlabelled": None}``.
    """
    fingerprint: dict[str, Any] = {}
    for name, dataset in (("train", train), ("val", val)):
        labels = torch.as_tensor(dataset.labels)
        fingerprint[name] = [int(labels.numel()), _labels_digest(labels)]
    fingerprint["unlabelled"] = None if unlabelled is None else int(len(unlabelled))
    return fingerprint


_RESUME_KEYS = (
    "format", "step", "config", "model", "optimizer", "scheduler", "objective", "distribution",
    "pseudo_labels", "history", "gains", "rng", "loss",
)  # fmt: skip


def check_resume(
    state: dict[str, Any],
    config: FinetuneConfig,
    *,
    world_size: int = 1,
    data: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    path: str | Path = "resume",
) -> None:
    """Checks that ``state`` (a loaded ``finetune_state.pt``) continues this run.

    Everything that changes what the run computes must agree: the run settings of
    ``config`` (:meth:`selmix._config.ConfigMixin.check_resumable`), the world size, the data
    (:func:`data_fingerprint`, when the checkpoint has one) and ``identity`` (what the
    caller says the run was made from, e.g. the CLI's data source, ``imbalance`` and
    starting checkpoint).

    Raises:
        ValueError: one line listing what changed.
    """
    if state.get("format") != "selmix-finetune-v1":
        raise ValueError(f"`resume` {str(path)!r} is not a selmix fine-tuning checkpoint")
    require_keys(state, _RESUME_KEYS, path, "selmix fine-tuning checkpoint")
    if int(state.get("world_size", 1)) != world_size:
        raise ValueError(
            f"`resume` checkpoint was written by {state.get('world_size', 1)} process(es) "
            f"but this run has {world_size} (world size): resume on as many processes"
        )
    # checkpoints written before the precision setting existed ran in float32, those before
    # backbone_feedback_every fed back every feedback_every steps in both phases
    saved_config = state["config"]
    older = {"precision": "fp32", "backbone_feedback_every": saved_config.get("feedback_every")}
    changed = config.resume_changes({**older, **saved_config})
    # compared when both sides name one (checkpoints of selmix <= 0.1 carry none; an API
    # caller that passes none claims nothing)
    saved_identity = state.get("identity")
    compared = {} if not saved_identity or identity is None else {**saved_identity, **identity}
    saved_identity = saved_identity or {}
    for key in sorted(compared):
        before, now = saved_identity.get(key), (identity or {}).get(key)
        if before != now:
            changed.append(f"{key}: {before!r} -> {now!r}")
    saved_data = state.get("data")
    if data is not None and saved_data is not None:
        for key in sorted(set(saved_data) | set(data)):
            before, now = saved_data.get(key), data.get(key)
            if _plain(before) != _plain(now):
                changed.append(f"{key} data: {_describe_set(before)} -> {_describe_set(now)}")
    if changed:
        # one line listing everything that differs, settings, data and start alike
        raise ValueError(f"`resume` checkpoint was made with other settings ({'; '.join(changed)})")


def _describe_set(entry: Any) -> str:
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return f"{entry[0]} samples, labels {entry[1]}"
    return repr(entry)


class _LossMonitor:
    """The training loss of a run: its mean between feedback steps, its first value and
    the divergence warning (raised once)."""

    def __init__(self, num_classes: int, is_main: bool) -> None:
        self.num_classes, self.is_main = num_classes, is_main
        self.total, self.count = 0.0, 0
        self.start_loss: float | None = None  # the first step's loss
        self.diverged_step: int | None = None

    def add(self, loss: float) -> None:
        if self.start_loss is None:
            self.start_loss = loss
        self.total += loss
        self.count += 1

    def take_mean(self) -> float | None:
        """The mean loss since the last call (None if no step), and a fresh sum."""
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean

    def warn_if_diverging(self, train_loss: float | None, step: int) -> None:
        """Warns once when the mean training loss since the last feedback step is far
        above where it started: ``DIVERGENCE_FACTOR * max(first loss, log K)``.

        The floor log K (a uniform guess) keeps a model that starts almost perfect on its
        training data from warning at the first rise; a loss 5x worse than guessing does
        not happen in a run that learns (``--lr-head 1e3`` reaches 1e4).
        """
        if train_loss is None or self.start_loss is None or self.diverged_step is not None:
            return
        reference = max(self.start_loss, math.log(self.num_classes))
        if train_loss > DIVERGENCE_FACTOR * reference:
            self.diverged_step = step
            if self.is_main:
                # called from Trainer.feedback: the warning points at feedback's caller
                warnings.warn(
                    f"the training loss ({train_loss:.3g} before step {step}) is far above "
                    f"its start ({self.start_loss:.3g}): the run is diverging; lower "
                    "`lr_head` / `lr_backbone`",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's keys ``loss``, ``start_loss`` and ``diverged_step``."""
        return {
            "loss": [self.total, self.count],
            "start_loss": self.start_loss,
            "diverged_step": self.diverged_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.count = state["loss"]
        # checkpoints written before the divergence warning have neither
        self.start_loss = state.get("start_loss")
        self.diverged_step = state.get("diverged_step")


@contextlib.contextmanager
def _batch_must_fit(batch_size: int, device: torch.device) -> Iterator[None]:
    """Turns running out of memory inside the block into one clear error naming
    ``batch_size`` (other errors pass through unchanged)."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        if not _is_out_of_memory(error):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise MemoryError(
            f"`batch_size` = {batch_size} does not fit in the memory of "
            f"{device} ({first}); lower `batch_size`"
        ) from None


def _feedback_record(
    trainer: Trainer,
    evaluation: Evaluation,
    score: ObjectiveScore,
    value: float,
    gain: torch.Tensor,
) -> dict[str, Any]:
    """What a feedback step logs (before the pseudo-label report and its duration); takes
    the mean training loss since the last feedback step."""
    groups = trainer.optimizer.param_groups
    return {
        "step": trainer.step,
        "objective": value,
        "score": score.to_dict(),
        "best_step": trainer.best.step,
        "metrics": all_metrics(evaluation.confusion, trainer.config.head_classes),
        "multipliers": _plain(trainer.objective.multipliers),
        "max_gain": float(gain.max()),
        "policy_entropy": policy_entropy(trainer.distribution),
        "effective_pairs": effective_pairs(trainer.distribution),
        "lr_head": groups[0]["lr"],
        "lr_backbone": groups[1]["lr"] if len(groups) > 1 else 0.0,
        "train_loss": trainer.losses.take_mean(),
    }


def _select(trainer: Trainer) -> FinetuneResult:
    """The finished run's result, with the weights of the step ``config.select`` picks
    (the best by validation score, or the last) loaded into the model."""
    last = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    best = trainer.best
    selected = best.step if trainer.config.select == "best" else trainer.step
    if trainer.config.select == "best":
        trainer.model.load_state_dict(best.weights)
    return FinetuneResult(
        trainer.model, trainer.split, trainer.objective, trainer.config, trainer.history,
        trainer.gains, selected_step=selected, best_step=best.step, last_step=trainer.step,
        best_state=best.weights, last_state=last, timings=trainer.timings.to_dict(),
        hardware=trainer.hardware.to_dict(),
    )  # fmt: skip


def _trainer_state(trainer: Trainer) -> dict[str, Any]:
    """What :meth:`Trainer.state_dict` returns: everything a resume needs, as
    ``weights_only``-loadable data (the keys of the ``selmix-finetune-v1`` format)."""
    return {
        "format": "selmix-finetune-v1",
        "step": trainer.step,
        "head_phase": trainer.head_phase,
        "config": trainer.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "objective": trainer.objective.state_dict(),
        "distribution": trainer.distribution.clone(),
        "pseudo_labels": trainer.pseudo_labels,
        "history": trainer.history,
        "gains": [(step, gain.clone()) for step, gain in trainer.gains],
        "best": trainer.best.state_dict(),
        "rng": capture_rng_state(trainer.generator),
        "world_size": trainer.collective.world_size,
        "data": trainer.data,
        "identity": trainer.identity,
        **trainer.losses.state_dict(),  # "loss", "start_loss", "diverged_step"
    }


def _restore_trainer_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """What :meth:`Trainer.load_state_dict` does once :func:`check_resume` has passed."""
    if trainer.head_phase and not state.get("head_phase", False):
        trainer._start_phase(head_phase=False)  # the optimiser state is the backbone phase's
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(
            f"`resume` checkpoint does not match the model: {str(error).splitlines()[0]}"
        ) from None
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # checkpoints of selmix <= 0.2 have none (fp32 only)
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.objective.load_state_dict(state["objective"])
    trainer.distribution = state["distribution"]
    trainer.pseudo_labels = state["pseudo_labels"]
    if trainer.pseudo_labels is not None:
        trainer.sampler.set_second_labels(trainer.pseudo_labels)
    trainer.history = list(state["history"])
    trainer.gains = [(int(step), gain) for step, gain in state["gains"]]
    if "best" in state:
        trainer.best.load_state_dict(state["best"])
    trainer.step = int(state["step"])
    trainer.losses.load_state_dict(state)
    rank_rng = state.get("rank_rng") or [state["rng"]]
    restore_rng_state(rank_rng[trainer.collective.rank], trainer.generator)


def _phase_schedule(config: FinetuneConfig, head_phase: bool) -> tuple[int, float]:
    """The length and head learning rate of a phase's cosine schedule
    (:meth:`Trainer._start_phase`)."""
    if config.frozen_backbone or head_phase:
        return (config.head_first if head_phase else config.steps), config.lr_head
    return config.steps - config.head_first, config.backbone_phase_lr_head


def _scaled_step(loss: torch.Tensor, optimizer: Any, scaler: Any) -> None:
    """Backward and optimiser step through the loss scaler (fp16; a pass-through otherwise)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _rewrite_log(path: str, history: list[dict[str, Any]]) -> None:
    """Makes the log at ``path`` this run's history: empty for a fresh run, cut back to
    the checkpoint's step for a resumed one (no duplicate or foreign records)."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in history))


def _write_checkpoint(trainer: Trainer) -> None:
    """What :meth:`Trainer.save_checkpoint` does (every rank calls it)."""
    path = trainer.config.checkpoint_path
    if not path:
        return
    rank_rng = trainer.collective.gather_rng_states(trainer.generator)  # every rank takes part
    if trainer.collective.is_main and _weights_are_finite(trainer.model):
        save_checkpoint(path, {**trainer.state_dict(), "rank_rng": rank_rng})
        trainer.good_checkpoint = (path, trainer.step)
    trainer.collective.barrier()  # the file is complete when any rank returns


class Trainer:
    """One SelMix fine-tuning run; :func:`finetune` is the usual entry point.

    Args:
        model: the classifier to fine-tune (changed in place).
        train: labelled training set.
        val: validation set with every class present.
        objective: objective name, :class:`Objective` or differentiable callable of C
            (None: ``config.objective``); resolved with :func:`resolve_objective`.
        config: the run's settings.
        unlabelled: optional unlabelled set (semi-supervised); its labels are never read.
        features, head: an explicit split of ``model``.
        callback: called with each feedback record, plus the gain matrix under ``"gain"``
            (Tensor[K, K]; the logged record has no gain).
        distributed: the run's :class:`selmix.collective.Collective` (default: one process).
        identity: plain data naming what the run was made from beyond its settings and
            data (e.g. the data source and the starting checkpoint); stored in the
            checkpoints, and a resume must match it (:func:`check_resume`).
    """

    def __init__(
        self,
        model: nn.Module,
        train: Any,
        val: Any,
        objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str | None,
        config: FinetuneConfig,
        unlabelled: Any = None,
        features: nn.Module | None = None,
        head: nn.Linear | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        distributed: Collective | None = None,
        identity: dict[str, Any] | None = None,
    ) -> None:
        from selmix.models import split_model

        self.collective = distributed or SingleProcess()
        self.split = split_model(model, features=features, head=head)
        self.num_classes = self.split.head.out_features
        self.train = as_batch_dataset(train, "train")
        self.val = as_batch_dataset(val, "val")
        self.unlabelled = None if unlabelled is None else as_batch_dataset(unlabelled, "unlabelled")
        _check_datasets(self.train, self.val, self.num_classes)
        labels = torch.as_tensor(self.train.labels).long().cpu()
        config, self.objective = resolve_objective(config, objective, labels, self.num_classes)
        self.device = self.collective.process_device(config.device)
        configure_threads(config.threads)
        self.model = model.to(self.device)
        # "auto" precision and layout are measured here (selmix.hardware); the resolved
        # values are recorded: "auto" resumes only where it resolves alike
        self.hardware = resolve_for_run(
            self.model, self.train, self.device, config.precision, config.channels_last,
            batch_size=self.collective.local_batch_size(config.batch_size),
            train=not config.frozen_backbone, processes=self.collective.world_size,
            is_main=self.collective.is_main,
        )  # fmt: skip
        self.precision = self.hardware.precision
        self.config = config = config.replace(
            device=str(self.device), precision=self.precision,
            channels_last=self.hardware.channels_last,
        )  # fmt: skip
        # the evaluation batch sized from the memory unless set; batches that cannot fit
        # fail here, in one line naming the setting, not in the kernel's OOM killer
        self.config = config = config.replace(
            eval_batch_size=resolve_eval_batch_size(
                self.split.features, self.train, self.device, self.precision,
                config.eval_batch_size,
                None if config.frozen_backbone else self.collective.local_batch_size(
                    config.batch_size
                ),
            )
        )  # fmt: skip
        if config.channels_last:
            to_channels_last(self.model)
        if config.compile:
            # in place: the parameters and state_dict keys stay those of the model
            self.split.features.compile()
        self.callback = callback
        # distinct, reproducible streams per rank; rank 0 matches a single-process run
        self.generator = torch.Generator().manual_seed(
            config.seed + 1_000_003 * self.collective.rank
        )
        self.sampler = PairSampler(labels, None, self.num_classes, self.generator)
        self.pseudo_labels: torch.Tensor | None = None
        self.distribution = torch.full((self.num_classes,) * 2, 1.0 / self.num_classes**2)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.gains: list[tuple[int, torch.Tensor]] = []
        self.best = _BestSoFar()
        self.losses = _LossMonitor(self.num_classes, self.collective.is_main)
        self.identity = None if identity is None else _plain(dict(identity))
        self.data = data_fingerprint(self.train, self.val, self.unlabelled)
        # (path, step) of the last checkpoint this run wrote with finite weights
        self.good_checkpoint: tuple[str, int] | None = None
        self.timings = PhaseTimings()
        self.backbone_feedback_every = config.backbone_feedback_every or backbone_feedback_every(
            config.feedback_every, len(self.val), config.batch_size
        )
        self._start_phase(head_phase=config.head_first > 0)

    def _start_phase(self, head_phase: bool) -> None:
        """The view, optimiser and schedule of a phase of the run.

        Frozen backbone: one phase, the head on cached features. Backbone fine-tuned: a
        head phase (``config.head_first`` steps on cached features, when > 0), then the
        whole model for the remaining steps from where the head phase ended, with the head
        at :attr:`FinetuneConfig.backbone_phase_lr_head`; each phase has its own cosine
        schedule. The step counter, the feedback steps and the best-step selection run
        across the phases.
        """
        config = self.config
        frozen = config.frozen_backbone or head_phase
        self.head_phase = head_phase
        self.view = make_view(
            frozen, self.split, self.device, self.collective, config.eval_batch_size,
            PairPools(self.train, self.unlabelled), config.augment, precision=self.precision,
        )  # fmt: skip
        steps, lr_head = _phase_schedule(config, head_phase)
        self.optimizer, self.scheduler = split_sgd_cosine(
            self.split, steps, lr_head, config.backbone_lr if self.view.trains_backbone else None,
            config.momentum, config.weight_decay,
        )  # fmt: skip
        self.view.attach(self.optimizer)
        # loss scaling for fp16 (a pass-through otherwise); its state is checkpointed
        self.scaler = grad_scaler(self.precision, self.device)
        self._head_step = _closed_form_head_step(self.view, self.collective)

    # -- feedback -----------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """``"frozen"``, ``"head"`` (the head-first phase) or ``"backbone"``."""
        if self.config.frozen_backbone:
            return "frozen"
        return "head" if self.head_phase else "backbone"

    def feedback_due(self) -> bool:
        """Whether the current step is a feedback step: every ``feedback_every`` steps on
        cached features, every :attr:`backbone_feedback_every` steps from the start of the
        whole-model phase."""
        if self.config.frozen_backbone or self.step <= self.config.head_first:
            return self.step % self.config.feedback_every == 0
        return (self.step - self.config.head_first) % self.backbone_feedback_every == 0

    def _evaluate_val(self) -> Evaluation:
        return self.view.evaluate(self.val)

    def feedback(self) -> dict[str, Any]:
        """Evaluates, scores the model, updates multipliers, gain and policy; returns the
        logged record."""
        config = self.config
        started = time.perf_counter()
        evaluation = self._evaluate_val()
        # the score (which step is best) is the objective's metric of the raw counts, the
        # same on every rank (the counts are summed over ranks)
        score = objective_score(self.objective, evaluation.counts)
        self.best.offer(score, self.step, self.model)
        # the objective, multipliers and gain see the (optionally smoothed) estimate of C;
        # the logged metrics are those of the raw counts
        result = feedback_step(self.objective, evaluation, self.split.head, config)
        value, gain, self.distribution = result.value, result.gain, result.distribution
        record = _feedback_record(self, evaluation, score, value, gain)
        if self.unlabelled is not None:
            record.update(self._refresh_pseudo_labels())
        record["feedback_seconds"] = time.perf_counter() - started
        if self.num_classes <= 200 or not self.gains or self.step == config.steps:
            self.gains.append((self.step, gain))
        self.losses.warn_if_diverging(record["train_loss"], self.step)
        self.history.append(record)
        if config.log_path and self.collective.is_main:
            _append_json_line(config.log_path, record)
        if self.callback is not None:
            # the gain matrix goes to the callback (e.g. TensorBoardLogger draws it) but
            # not to the log: it is K x K numbers per feedback step
            self.callback({**record, "gain": gain})
        return record

    def _refresh_pseudo_labels(self) -> dict[str, Any]:
        self.model.eval()
        self.pseudo_labels = self.view.predict(self.unlabelled)
        self.sampler.set_second_labels(self.pseudo_labels)
        return _pseudo_label_report(self.pseudo_labels, self.unlabelled, self.num_classes)

    # -- training -----------------------------------------------------------------------
    def train_step(self) -> float:
        """One SGD step on a batch of mixups drawn from the current distribution."""
        config = self.config
        batch_size = self.collective.local_batch_size(config.batch_size)
        first, second, from_second, labels = self.sampler.sample(self.distribution, batch_size)
        lam = config.lam_min + (1 - config.lam_min) * torch.rand(
            batch_size, generator=self.generator
        )
        if self._head_step is None:
            # batch norm frozen: running statistics, no updates (the closed-form head step
            # calls no module, and eval() walking every module costs more than its maths)
            self.model.eval()
        lam = lam.to(self.device)[:, None]
        labels = labels.to(self.device)
        if self._head_step is not None:
            mixed = self.view.mixed_features(first, second, from_second, lam)
            loss_value = self._head_step.loss_and_gradients(mixed, labels)
            _check_finite(loss_value, self.step, self.good_checkpoint)
            self.optimizer.step()
        else:
            logits = self.view.mixed_logits(first, second, from_second, lam, self.generator)
            # the loss in float32 whatever the precision of the forward pass
            loss = F.cross_entropy(logits.float(), labels)
            loss_value = float(loss.detach())
            _check_finite(loss_value, self.step, self.good_checkpoint)
            _scaled_step(loss, self.optimizer, self.scaler)
        self.scheduler.step()
        self.losses.add(loss_value)
        return loss_value

    def run(self) -> FinetuneResult:
        """Runs from the current step to ``config.steps`` (with a last feedback at the end,
        or until ``patience`` feedback steps bring no better score), then selects."""
        config = self.config
        if config.log_path and self.collective.is_main:
            _rewrite_log(config.log_path, self.history)
        progress = progress_bar(
            config.steps, f"selmix {self.objective.name}",
            config.progress and self.collective.is_main, initial=self.step, leave=False,
        )  # fmt: skip
        first_step = True
        try:
            while self.step < config.steps and not self.best.exhausted(config.patience):
                done = bool(self.history) and self.history[-1]["step"] == self.step
                if self.feedback_due() and not done:
                    started = time.perf_counter()
                    progress.set_postfix(objective=f"{self.feedback()['objective']:.4f}")
                    self.timings.record(self.phase, "feedback", time.perf_counter() - started)
                    if self.best.exhausted(config.patience):
                        break
                if self.head_phase and self.step >= config.head_first:
                    self._start_phase(head_phase=False)
                    first_step = True  # the backbone's first step is where memory runs out
                started = time.perf_counter()
                if first_step:
                    self._first_train_step()
                    first_step = False
                else:
                    self.train_step()
                self.timings.record(self.phase, "train", time.perf_counter() - started)
                self.step += 1
                progress.update(1)
                every = config.checkpoint_every
                if every and self.step % every == 0 and self.step < config.steps:
                    self.save_checkpoint()
            if not self.history or self.history[-1]["step"] != self.step:
                started = time.perf_counter()
                self.feedback()
                self.timings.record(self.phase, "feedback", time.perf_counter() - started)
        finally:
            progress.close()
        self.save_checkpoint()
        return _select(self)

    def _first_train_step(self) -> None:
        """The first step, where a batch too large for the memory shows: one clear error."""
        with _batch_must_fit(self.config.batch_size, self.device):
            self.train_step()

    # -- state ----------------------------------------------------------------------------
    @property
    def start_loss(self) -> float | None:
        """The first training step's loss (the divergence warning's reference)."""
        return self.losses.start_loss

    @property
    def diverged_step(self) -> int | None:
        """The feedback step at which the divergence warning was raised, if it was."""
        return self.losses.diverged_step

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as ``weights_only``-loadable data."""
        return _trainer_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved (the run settings, the data and the
        identity must agree: :func:`check_resume`)."""
        check_resume(
            state, self.config, world_size=self.collective.world_size, data=self.data,
            identity=self.identity,
        )  # fmt: skip
        _restore_trainer_state(self, state)

    def save_checkpoint(self) -> None:
        """Writes the resume state to ``config.checkpoint_path`` (main process only).

        Weights that are no longer finite are not written: the previous checkpoint stays,
        so the one a failed run names can always be resumed from.
        """
        _write_checkpoint(self)


def finetune(
    model: nn.Module,
    train: Any,
    val: Any,
    objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str | None = None,
    config: FinetuneConfig | dict[str, Any] | None = None,
    *,
    unlabelled: Any = None,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    resume: str | Path | dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    distributed: Collective | None = None,
    identity: dict[str, Any] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tunes ``model`` with SelMix for ``objective``.

    Args:
        model: any classifier that splits into a feature extractor and a linear head
            (see :func:`selmix.split_model`); trained in place.
        train: the labelled training set (a selmix dataset or any map-style (x, y) dataset).
        val: the validation set; every class must be present.
        objective: a name from :func:`selmix.list_objectives`, an :class:`Objective`, or a
            differentiable function of the confusion matrix. Default: ``config.objective``.
        config: a :class:`FinetuneConfig` or a dict of its fields.
        unlabelled: unlabelled samples for semi-supervised SelMix (x2 is drawn from those
            whose current pseudo-label is j).
        features, head: an explicit split of the model.
        resume: a checkpoint written by a previous run with the same settings and data
            (its path, or the dict :func:`selmix.checkpoint.load_checkpoint` returned).
        callback: called with each feedback record and its gain matrix (``"gain"``).
        distributed: a :class:`selmix.collective.Collective`, e.g. the
            :class:`selmix.distributed.DistributedContext` of a torchrun process.
        identity: what the run was made from beyond its settings and data, checked on
            resume (see :class:`Trainer`).
        **overrides: any :class:`FinetuneConfig` field, e.g. ``steps=2000, device="cuda"``.

    Returns:
        A :class:`FinetuneResult`; the model holds the selected step's weights.
    """
    if isinstance(objective, str):
        overrides = {"objective": objective, **overrides}
        objective = None
    config = FinetuneConfig.resolve(config, overrides)
    logger = None
    if config.tensorboard_dir and (distributed is None or distributed.is_main):
        from selmix.loggers import TensorBoardLogger

        logger = TensorBoardLogger(config.tensorboard_dir)
        callback = _both(callback, logger)
    try:
        trainer = Trainer(
            model, train, val, objective, config, unlabelled=unlabelled, features=features,
            head=head, callback=callback, distributed=distributed, identity=identity,
        )  # fmt: skip
        if resume is not None:
            state = resume if isinstance(resume, dict) else load_checkpoint(resume)
            trainer.load_state_dict(state)
            if not isinstance(resume, dict) and _weights_are_finite(trainer.model):
                trainer.good_checkpoint = (str(resume), trainer.step)
        return trainer.run()
    finally:
        if logger is not None:
            logger.close()


def _both(
    first: Callable[[dict[str, Any]], None] | None, second: Callable[[dict[str, Any]], None]
) -> Callable[[dict[str, Any]], None]:
    if first is None:
        return second

    def call(record: dict[str, Any]) -> None:
        first(record)
        second(record)

    return call
