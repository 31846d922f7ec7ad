"""The baselines by name and their one configuration: :data:`BASELINES`,
:func:`list_baselines`, :func:`run_baseline` (one call signature for every baseline),
:class:`BaselineConfig` and :func:`baseline`, which runs one with it (as
:func:`selmix.finetune` runs SelMix)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from selmix._config import (
    ClassIndices,
    ConfigMixin,
    Dict,
    Flag,
    Int,
    Optional,
    Real,
    Seed,
    setting,
    settings_of,
)
from selmix._validation import (
    check_choice,
    check_in_range,
)
from selmix.baselines._common import _DEFAULTS, ObjectiveLike
from selmix.baselines.crt import classifier_retraining
from selmix.baselines.logit_adjusted import logit_adjusted_finetune
from selmix.baselines.mislas import mislas_stage2
from selmix.baselines.posthoc import _check_taus, posthoc_logit_adjustment
from selmix.engine.config import resolve_objective
from selmix.engine.evaluate import DEVICE_HELP, as_batch_dataset, resolve_device
from selmix.engine.precision import (
    channels_last_setting,
    configure_threads,
    precision_setting,
    threads_setting,
)
from selmix.models import split_model

_ALL = ("posthoc_la", "crt", "la_finetune", "mislas_stage2")


@dataclass
class BaselineResult:
    """What :func:`run_baseline` returns.

    Attributes:
        name: the baseline's name.
        model: the new model (the input model is untouched).
        details: plain data about the run: for ``"posthoc_la"`` the chosen ``tau``, the
            grid ``taus``, the per-tau ``scores`` (:meth:`ObjectiveScore.to_dict`) and
            ``val_metrics``; for ``"crt"`` and ``"mislas_stage2"`` the per-epoch
            ``history``; empty otherwise.
        config: the resolved :class:`BaselineConfig` (from :func:`baseline`; None from
            :func:`run_baseline`).
    """

    name: str
    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    config: BaselineConfig | None = None


def _start(model: nn.Module, *, device: str | torch.device = "cpu") -> nn.Module:
    """An unchanged copy of the model (the starting point), on ``device`` in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    return copy.deepcopy(model).to(resolve_device(device)).eval()


BASELINES: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "start": _start,
        "posthoc_la": posthoc_logit_adjustment,
        "crt": classifier_retraining,
        "la_finetune": logit_adjusted_finetune,
        "mislas_stage2": mislas_stage2,
    }
)


# The arguments run_baseline fills in itself, by baseline.
_SUPPLIED = {
    "start": ("model",),
    "posthoc_la": ("model", "prior", "val", "objective"),
    "crt": ("model", "train", "val"),
    "la_finetune": ("model", "train"),
    "mislas_stage2": ("model", "train", "val"),
}


def list_baselines() -> list[str]:
    """Names accepted by :func:`run_baseline`."""
    return sorted(BASELINES)


def run_baseline(
    name: str,
    model: nn.Module,
    train: Any,
    val: Any,
    objective: ObjectiveLike,
    **options: Any,
) -> BaselineResult:
    """Runs a baseline by name with one call signature, for benchmark scripts.

    ``"start"``: a copy of ``model``; ``"posthoc_la"``: :func:`posthoc_logit_adjustment`
    with the prior counted from ``train`` and tau tuned on ``val`` for ``objective``;
    ``"crt"``: :func:`classifier_retraining` (``val`` metrics per epoch in the details);
    ``"mislas_stage2"``: :func:`mislas_stage2` (the same details); ``"la_finetune"``:
    :func:`logit_adjusted_finetune`. Baselines that have no use for
    ``val`` or ``objective`` ignore them.

    Args:
        name: one of :func:`list_baselines`.
        model: the trained classifier (not modified).
        train: the labelled training set.
        val: the validation set.
        objective: the objective (name, Objective or callable).
        **options: keyword arguments of the baseline's function, e.g. ``device="cuda"``,
            ``taus=[0, 1]``, ``epochs=5`` or ``steps=500``.

    Returns:
        A :class:`BaselineResult`.
    """
    check_choice("name", name, list_baselines())
    function = BASELINES[name]
    parameters = inspect.signature(function).parameters
    valid = [key for key in parameters if key not in _SUPPLIED[name]]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for baseline {name!r}; valid: {valid}")
    if name == "start":
        return BaselineResult(name, function(model, **options))
    if name == "posthoc_la":
        result = function(model, train, val, objective, **options)
        details = {
            "tau": result.tau,
            "taus": result.taus,
            "scores": [score.to_dict() for score in result.scores],
            "val_metrics": result.val_metrics,
        }
        return BaselineResult(name, result.model, details)
    if name in ("crt", "mislas_stage2"):
        history: list[dict[str, Any]] = []
        user_callback = options.pop("callback", None)

        def record(entry: dict[str, Any]) -> None:
            history.append(entry)
            if user_callback is not None:
                user_callback(entry)

        new = function(model, train, val, callback=record, **options)
        return BaselineResult(name, new, {"history": history})
    return BaselineResult(name, function(model, train, **options))


_LA, _CRT, _POSTHOC, _MISLAS = (
    {"methods": ("la_finetune",)},
    {"methods": ("crt", "mislas_stage2")},
    {"methods": ("posthoc_la",)},
    {"methods": ("mislas_stage2",)},
)


_TRAINED = {"methods": ("crt", "la_finetune", "mislas_stage2")}


class _Smoothing:
    """A label-smoothing eps: a finite number in [0, 1)."""

    def __call__(self, name: str, value: Any) -> Any:
        if check_in_range(name, value, 0.0, 1.0) == 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {value}")
        return value


class _Taus:
    """None (the default grid) or a non-empty sequence of finite taus >= 0."""

    def __call__(self, name: str, value: Any) -> Any:
        return value if value is None else _check_taus(value)


@dataclass
class BaselineConfig(ConfigMixin):
    """Settings of the baselines, like :class:`selmix.FinetuneConfig` for SelMix.

    Each field declares which baselines use it (``extra={"methods": ...}``; the others
    ignore it) next to its help text and constraint; :meth:`options` turns the config into
    the keyword arguments of one baseline's function.
    """

    settings_name = "baseline"

    objective: str = setting(
        _DEFAULTS.objective, flag=True, metavar="NAME", extra=_POSTHOC,
        help="objective tau is tuned for (posthoc_la; ignored by the other methods, see the "
        "list below)",
    )  # fmt: skip
    objective_params: dict[str, Any] = setting(
        default_factory=dict, check=Dict(), extra=_POSTHOC,
        help="objective hyper-parameters, e.g. {rate: 20} (posthoc_la)",
    )  # fmt: skip
    taus: list[float] | None = setting(
        None, check=_Taus(), extra=_POSTHOC,
        help="the tau grid of posthoc_la, e.g. [0, 0.5, 1]; unset: 0 to 3 by 0.25",
    )  # fmt: skip
    epochs: int = setting(
        10, help="training epochs of the head (crt and mislas_stage2)", check=Int(1),
        flag=True, extra=_CRT,
    )  # fmt: skip
    lr: float = setting(
        0.1, help="learning rate of the head (crt and mislas_stage2)", check=Real(), flag=True,
        extra=_CRT,
    )  # fmt: skip
    smooth_head: float = setting(
        0.3, help="label smoothing of the most frequent class, in [0, 1) (mislas_stage2 only)",
        check=_Smoothing(), flag=True, metavar="EPS", extra=_MISLAS,
    )  # fmt: skip
    smooth_tail: float = setting(
        0.0, help="label smoothing of the rarest class, in [0, 1); the others' is linear in "
        "the class count (mislas_stage2 only)", check=_Smoothing(), flag=True, metavar="EPS",
        extra=_MISLAS,
    )  # fmt: skip
    steps: int = setting(
        _DEFAULTS.steps, help="SGD steps (la_finetune only)", check=Int(1), flag=True, extra=_LA
    )
    lr_head: float = setting(
        _DEFAULTS.lr_head, help="learning rate of the linear head (la_finetune only)",
        check=Real(), flag=True, extra=_LA,
    )  # fmt: skip
    lr_backbone: float | None = setting(
        None, help="backbone learning rate (la_finetune); unset: lr_head / 10",
        check=Optional(Real(strict=False)), extra=_LA,
    )  # fmt: skip
    frozen_backbone: bool = setting(
        False, help="train the linear head only (la_finetune only)", check=Flag(), flag=True,
        extra=_LA,
    )  # fmt: skip
    la_tau: float = setting(
        1.0, help="logit-adjustment temperature of the loss (la_finetune only)",
        check=Real(strict=False), flag=True, metavar="TAU", extra=_LA,
    )  # fmt: skip
    batch_size: int = setting(
        _DEFAULTS.batch_size, help="samples per step (crt, mislas_stage2 and la_finetune)",
        check=Int(1),
        flag=True, extra=_TRAINED,
    )  # fmt: skip
    momentum: float = setting(
        _DEFAULTS.momentum, help="SGD momentum (crt, mislas_stage2 and la_finetune)",
        check=Real(high=1.0),
        extra=_TRAINED,
    )  # fmt: skip
    weight_decay: float = setting(
        _DEFAULTS.weight_decay, help="SGD weight decay (crt, mislas_stage2 and la_finetune)",
        check=Real(strict=False), extra=_TRAINED,
    )  # fmt: skip
    augment: bool = setting(
        _DEFAULTS.augment, help="random crop and flip (la_finetune, full backbone)",
        check=Flag(), extra=_LA,
    )  # fmt: skip
    eval_batch_size: int = setting(
        512, help="batch size of feature extraction and evaluation",
        check=Int(1),
    )  # fmt: skip
    head_classes: list[int] | None = setting(
        None, help="head classes for head/tail metrics and objectives; unset: the 90% most "
        "frequent training classes", check=Optional(ClassIndices()),
    )  # fmt: skip
    seed: int = setting(
        0, help="random seed (model initialisation, data split, sampling)", check=Seed(),
        flag=True,
    )  # fmt: skip
    device: str = setting(
        "cpu", help=f"where to run: {DEVICE_HELP}", cli_default="auto", flag=True,
        metavar="DEVICE",
    )  # fmt: skip
    precision: str = precision_setting(_DEFAULTS.precision, flag=True)
    threads: int | None = threads_setting(flag=True)
    channels_last: bool = channels_last_setting(False, flag=True, extra=_TRAINED)
    progress: bool = setting(
        True, help="show progress bars (crt, mislas_stage2 and la_finetune; plain lines when "
        "not a terminal)",
        check=Flag(), flag=True, extra=_TRAINED,
    )  # fmt: skip

    @classmethod
    def used_by(cls, method: str) -> list[str]:
        """The fields ``method`` uses (the others are ignored by it)."""
        return [item.name for item in settings_of(cls) if method in item.extra.get("methods", _ALL)]

    def options(self, method: str) -> dict[str, Any]:
        """The keyword arguments of :data:`BASELINES` ``[method]`` (for :func:`run_baseline`)."""
        check_choice("method", method, list_baselines())
        values = self.to_dict()
        if method == "start":
            return {"device": self.device}
        if method == "posthoc_la":
            return {"taus": self.taus, "batch_size": self.eval_batch_size, "device": self.device,
                    "precision": self.precision}  # fmt: skip
        renamed = {"la_tau": "tau"}
        # threads are set once for the process by `baseline`
        skipped = {"objective", "objective_params", "taus", "head_classes", "threads",
                   "smooth_head", "smooth_tail"}  # fmt: skip
        options = {
            renamed.get(name, name): values[name]
            for name in self.used_by(method)
            if name not in skipped
        }
        if method == "mislas_stage2":
            options["label_smoothing"] = (self.smooth_head, self.smooth_tail)
        return options


def baseline(
    method: str,
    model: nn.Module,
    train: Any,
    val: Any,
    config: BaselineConfig | dict[str, Any] | None = None,
    *,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    **overrides: Any,
) -> BaselineResult:
    """Runs a baseline with a :class:`BaselineConfig`, as :func:`selmix.finetune` runs SelMix.

    The objective and the head classes are resolved as for fine-tuning
    (:func:`selmix.finetune.resolve_objective`: head classes inferred from the training
    labels when unset, and given to head/tail objectives), so a baseline and a SelMix run
    with the same settings tune for the same objective.

    Args:
        method: one of :func:`list_baselines`.
        model: the trained classifier (not modified).
        train: the labelled training set.
        val: the validation set.
        config: a :class:`BaselineConfig` or a dict of its fields.
        features, head: an explicit split of ``model``.
        **overrides: any :class:`BaselineConfig` field.

    Returns:
        A :class:`BaselineResult` whose ``config`` is the resolved configuration.
    """

    check_choice("method", method, list_baselines())
    config = BaselineConfig.resolve(config, overrides)
    configure_threads(config.threads)
    num_classes = split_model(model, features=features, head=head).head.out_features
    labels = as_batch_dataset(train, "train").labels
    config, objective = resolve_objective(config, None, labels, num_classes)
    options = config.options(method)
    if method != "start" and (features is not None or head is not None):
        options.update(features=features, head=head)
    result = run_baseline(method, model, train, val, objective, **options)
    result.config = config
    return result
