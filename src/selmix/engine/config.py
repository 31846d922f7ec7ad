"""The settings of a fine-tuning run: :class:`FinetuneConfig`, its presets, and the
resolution of a run's objective and head classes (:func:`resolve_objective`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

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
from selmix._progress import progress_setting
from selmix._validation import check_head_classes
from selmix.core.estimates import SHRINKAGE
from selmix.core.metrics import infer_head_classes
from selmix.core.mixing import FEATURE, check_mixup_needs_backbone, list_mixups
from selmix.core.objectives import MinRecall, Objective, as_objective, get_objective, noise_rate
from selmix.core.policy import MIN_RECALL_UNIFORM_MIX, POLICIES, min_recall_uniform_mix
from selmix.devices import to_host
from selmix.engine.evaluate import DEVICE_HELP
from selmix.engine.precision import (
    channels_last_setting,
    precision_setting,
    threads_setting,
)
from selmix.engine.timing import parse_duration

SELECT = ("best", "last")
MULTIPLIER_RATES = ("noise", "objective")
"""Choices of ``multiplier_rate``: from the validation noise, or the objective's own."""
HEAD_INIT = ("none", "posthoc_la", "crt", "auto")
"""Choices of ``head_init`` (:mod:`selmix.finetune.head_init`)."""


#: The default ``precision`` of fine-tuning (see docs/results/precision_parity.md).
PRECISION_DEFAULT = "fp32"


#: Steps of the head-first phase when the backbone is fine-tuned and ``head_first_steps``
#: is unset (docs/DESIGN.md, "Robust defaults").
HEAD_FIRST_STEPS = 2000


#: Named sets of settings (``FinetuneConfig.preset``), applied under the user's own values.
#: ``"defaults"`` changes nothing: the field defaults are the robust defaults of
#: docs/DESIGN.md. ``"paper"`` is the paper's supervised recipe (docs/maths.md sections 5-6: the
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
        "head_init": "none",
        "shrinkage": "none",
        "multiplier_rate": "objective",
        "select_tolerance": 0.0,
    },
}


#: Steps between resume checkpoints unless set (see ``FinetuneConfig.checkpoint_every``).
CHECKPOINT_EVERY = 200


RunConfig = TypeVar("RunConfig", bound=ConfigMixin)


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
        "time (selmix.engine.timing.backbone_feedback_every, from the validation size and "
        "batch_size; the paper: 50)",
    )  # fmt: skip
    lam_min: float = setting(
        0.6, help="mixing weights lam ~ U[lam_min, 1]", check=Real(high=1.0), run=True
    )
    mixup: str = setting(
        FEATURE, check=Choice(list_mixups), run=True, flag=True, metavar="NAME",
        help="how a pair is mixed: 'feature' (the paper: features, label i), 'input' (the "
        "images, lam x1 + (1 - lam) x2), 'cutmix' (a box of x2 of area 1 - lam pasted into "
        "x1), or a name given to selmix.register_mixup; all but 'feature' need "
        "frozen_backbone off and mix features in the head-first phase (selmix.core.mixing)",
    )  # fmt: skip
    confusion_smoothing: float = setting(
        1.0, check=Real(strict=False), run=True, flag=True,
        help="pseudo-count added to each validation confusion cell before the multipliers "
        "and the gain (0 = the paper; 1 lets the gain see classes with zero recall)",
    )  # fmt: skip
    head_init: str = setting(
        "auto", check=Choice(HEAD_INIT), run=True, flag=True,
        help="the head SelMix starts from: 'none' the model's own; 'posthoc_la' or 'crt' "
        "a re-balanced head on the same features; 'auto' the best of the three on the "
        "validation set for the objective",
    )  # fmt: skip
    shrinkage: str = setting(
        "auto", check=Choice(SHRINKAGE), run=True, flag=True,
        help="pool the classes' validation estimates (empirical Bayes, "
        "selmix.core.estimates.shrunk_confusion) to steer and to select the best step: 'auto' "
        "for objectives of per-class recalls (min recall, H-mean, G-mean), 'on' always, "
        "'none' never (the paper)",
    )  # fmt: skip
    soft_confusion: bool = setting(
        False, check=Flag(), run=True,
        help="use the validation softmax probabilities (never 0) in the gain's derivative "
        "factor instead of the counts (an alternative to confusion_smoothing)",
    )  # fmt: skip
    uniform_mix: float | None = setting(
        None, check=Optional(Real(strict=False, high=1.0)), run=True,
        help="share eps of the uniform policy mixed into P: (1 - eps) P + eps / K^2; unset: "
        "for min recall and min head/tail recall, from the validation set's size "
        f"(selmix.core.policy.min_recall_uniform_mix: {MIN_RECALL_UNIFORM_MIX} up to 100 "
        "samples of the smallest class, 0.1 at 500: class-balanced pairs keep the other "
        "classes' recall where the worst class is measured with noise), 0 otherwise",
    )  # fmt: skip
    multiplier_step: float = setting(
        1.0, check=Real(high=1.0), run=True,
        help="step a of the multiplier update l <- (1 - a) l + a l_new (1: the paper)",
    )  # fmt: skip
    multiplier_rate: str = setting(
        "objective", check=Choice(MULTIPLIER_RATES), run=True,
        help="the rate w of the min-recall objectives' multipliers softmax(-w * recall) "
        "when objective_params gives none: 'noise' sets it from the validation set's size "
        "so that classes within their noise share the weight (selmix.core.objectives.noise_rate; "
        "16 at 40 samples of the smallest class), 'objective' keeps the objective's "
        "(w = 50, the paper)",
    )  # fmt: skip
    augment: bool = setting(
        True, help="random crop and flip (full-backbone mode)", check=Flag(), run=True
    )
    select: str = setting(
        "best", check=Choice(SELECT), run=True, flag=True,
        help="the model returned: the best feedback step on the validation objective "
        "(the start included) or the last step",
    )  # fmt: skip
    select_tolerance: float = setting(
        0.0, check=Real(strict=False), run=True,
        help="with select 'best' and min recall or min head/tail recall: steps whose metric "
        "is within this many of its standard errors (0.5 / sqrt(n) for n validation samples "
        "of the smallest class) of the best step's tie, and the one with the highest mean "
        "recall is returned (selmix.core.selection.undominated_index); 0: the strictly best",
    )  # fmt: skip
    head_init_tolerance: float | None = setting(
        1.0, check=Optional(Real(strict=False)), run=True,
        help="head_init 'auto' with min recall or min head/tail recall: heads whose metric "
        "is within this many standard errors of the best one's tie, and the one with the "
        "highest mean recall starts; unset: select_tolerance",
    )  # fmt: skip
    patience: int | None = setting(
        None, check=Optional(Int(1)), run=True,
        help="stop after this many feedback steps without a better validation score; "
        "unset: never stop early",
    )  # fmt: skip
    max_time: float | str | None = setting(
        None, check=Optional(parse_duration), flag=True, metavar="SECONDS|DD:HH:MM:SS",
        help="wall-clock budget of the training loop (as Lightning's max_time): when it runs "
        "out the run evaluates its last step and returns the best step so far (or the last, "
        "with select 'last'), and says so; a resumed run gets the budget afresh; unset: none",
    )  # fmt: skip
    eval_batch_size: int | None = setting(
        None, check=Optional(Int(1)), metavar="N",
        help="batch size of evaluation and feature extraction; unset: sized from the input "
        "size, the model's activations and the memory available "
        "(selmix.engine.memory; at most 512)",
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
    # checkpoint holds about three copies of the weights (model, momentum, best), which is
    # cheap to write next to 200 training steps, and a kill loses at most those steps
    checkpoint_every: int | None = setting(
        CHECKPOINT_EVERY, check=Optional(Int(1)), flag=True, metavar="STEPS",
        help="steps between resume checkpoints (OUT/finetune_state.pt, also written at the "
        "end); null (--set checkpoint_every=null): only at the end",
    )  # fmt: skip
    progress: bool = progress_setting()
    tensorboard_dir: str | None = setting(
        None, flag=True, key="tensorboard", metavar="DIR",
        help="also log every feedback step (metrics, multipliers, the gain matrix as an "
        "image) to TensorBoard in DIR (needs the extra selmix[tensorboard])",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.multiplier_step <= 0:
            raise ValueError(f"`multiplier_step` must be in (0, 1], got {self.multiplier_step}")
        check_mixup_needs_backbone(self.mixup, self.frozen_backbone)
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


def plain_data(value: Any) -> Any:
    """Tensors and tuples as lists, recursively (for YAML, JSON and checkpoints)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    return value


def resolve_objective(
    config: RunConfig,
    objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str | None,
    train_labels: Any,
    num_classes: int,
    val_labels: Any = None,
) -> tuple[RunConfig, Objective]:
    """The run's objective and its config with everything the run uses filled in.

    The one place where a run is resolved, so that :func:`finetune`, a :class:`Trainer`
    and the CLI get the same run from the same settings:

    * ``head_classes`` unset: the 90% most frequent training classes
      (:func:`selmix.core.metrics.infer_head_classes`);
    * the objective: ``objective`` if given (a name, an :class:`Objective` or a callable),
      else ``config.objective`` with ``config.objective_params``; an objective that uses
      head classes and was given none gets the config's;
    * ``uniform_mix`` unset: for the min-recall objectives
      :func:`selmix.core.policy.min_recall_uniform_mix` of the validation set's recall
      spread (0.5 up to 100 samples of the smallest class, 0.1 at 500; 0.5 without
      ``val_labels``), 0 for the others;
    * a min-recall objective built from its name without a ``rate`` in
      ``objective_params``, with ``multiplier_rate="noise"`` and ``val_labels`` given: the
      rate :func:`selmix.core.objectives.noise_rate` of the validation set's class counts;
    * the config records the objective's name and its hyper-parameters
      (``objective_params``), e.g. ``{"rate": 20}`` for ``MinRecall(rate=20)``.

    Args:
        config: the settings as given: a :class:`FinetuneConfig` or any configuration
            with ``objective``, ``objective_params`` and ``head_classes`` fields (e.g.
            :class:`selmix.baselines.BaselineConfig`).
        objective: overrides ``config.objective`` when not None.
        train_labels: Tensor[N] of training labels (for the head classes).
        num_classes: K.
        val_labels: Tensor[M] of validation labels (for the noise rate), or None.

    Returns:
        ``(config, objective)``.
    """
    # any configuration with these fields (duck-typed: the config classes share no base
    # that declares them)
    fields: Any = config
    head_classes = fields.head_classes
    if head_classes is None:
        head_classes = infer_head_classes(train_labels, num_classes)
    else:
        head_classes = check_head_classes(head_classes, num_classes)
    by_name = objective is None or isinstance(objective, str)
    if objective is None:
        objective = get_objective(fields.objective, **fields.objective_params)
    elif isinstance(objective, str):
        objective = get_objective(objective, **fields.objective_params)
    else:
        objective = as_objective(objective)
    if "head_classes" in objective.hyperparameters() and objective.head_classes is None:
        objective.head_classes = list(head_classes)
    spread = None
    if val_labels is not None and hasattr(objective, "recall_spread"):
        counts = torch.bincount(to_host(torch.as_tensor(val_labels)).long(), minlength=num_classes)
        spread = objective.recall_spread(counts.clamp_min(1))
    if getattr(fields, "uniform_mix", 0.0) is None:
        mix = min_recall_uniform_mix(spread) if objective.worst_case else 0.0
        config = config.replace(uniform_mix=mix)
        fields = config
    noise = getattr(fields, "multiplier_rate", "objective") == "noise"
    if noise and by_name and spread is not None and isinstance(objective, MinRecall):
        if "rate" not in fields.objective_params:
            objective.rate = noise_rate(spread)
    config = config.replace(
        objective=objective.name,
        objective_params=plain_data(objective.hyperparameters()),
        head_classes=plain_data(head_classes),
    )
    return config, objective
