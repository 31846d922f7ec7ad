"""A SelMix run, built: everything that prepares a run before its first step.

:func:`build_run` takes what a user gives :func:`selmix.finetune` (a model, the data sets,
an objective, the settings) and returns a :class:`RunParts`: the model's split, the checked
data sets, the resolved objective and settings (device, precision, layout, evaluation batch
size), the measured hardware choice, the run's generator and pair sampler, the data's
fingerprint and the head SelMix starts from. A :class:`selmix.finetune.trainer.Trainer`
then trains, feeds back and selects with those parts, and nothing else.

Each step is a small function of its own; :func:`build_run` calls them in the order whose
side effects a resumed run relies on (the objective resolved before the hardware is timed,
the head initialised before a view wraps the model for ``torchrun``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selmix._validation import check_labels
from selmix.core.estimates import warn_if_small_validation
from selmix.core.objectives import Objective
from selmix.core.sampler import PairSampler
from selmix.engine.collective import Collective, SingleProcess
from selmix.engine.config import FinetuneConfig, plain_data, resolve_objective
from selmix.engine.evaluate import as_batch_dataset
from selmix.engine.hardware import HardwareChoice, resolve_for_run
from selmix.engine.memory import resolve_eval_batch_size
from selmix.engine.precision import configure_threads, to_channels_last
from selmix.engine.views import ModelView, PairPools, make_view
from selmix.finetune.head_init import initialise_head
from selmix.finetune.run_state import data_fingerprint
from selmix.models import ModelSplit, split_model

__all__ = ["RunParts", "build_run", "check_datasets", "resolve_hardware_settings", "run_generator"]


@dataclass(frozen=True)
class RunParts:
    """What a SelMix run is made of, prepared by :func:`build_run`.

    Attributes:
        model: the classifier, on :attr:`device` (changed in place by the run).
        split: its (features, head) split.
        config: the resolved settings: ``device``, ``precision``, ``channels_last``,
            ``eval_batch_size``, the head classes and the objective's parameters are
            concrete values, never ``"auto"`` (a resume compares them).
        objective: the resolved :class:`Objective`.
        train, val: the checked batch data sets; unlabelled: the unlabelled one, or None.
        collective: the run's processes.
        device: where this process computes.
        hardware: what ``"auto"`` precision and layout resolved to, and why.
        generator: the run's random stream (the sampler, the mixing weights, augmentation).
        sampler: the pair sampler over the training labels.
        val_counts: LongTensor[K], the validation samples per class.
        data: the data's fingerprint (:func:`data_fingerprint`).
        identity: what the run was made from beyond settings and data, or None.
        head_init: the report of the start head's choice (:func:`initialise_head`), or
            None when the model's head was kept as it is (or a resume brings its weights).
    """

    model: nn.Module
    split: ModelSplit
    config: FinetuneConfig
    objective: Objective
    train: Any
    val: Any
    unlabelled: Any
    collective: Collective
    device: torch.device
    hardware: HardwareChoice
    generator: torch.Generator
    sampler: PairSampler
    val_counts: torch.Tensor
    data: dict[str, Any]
    identity: dict[str, Any] | None
    head_init: dict[str, Any] | None

    @property
    def num_classes(self) -> int:
        """K, the outputs of the head."""
        return int(self.split.head.out_features)

    def view(self, frozen: bool) -> ModelView:
        """A view of the model for a phase: cached features when ``frozen``, else the
        full backbone (:func:`selmix.engine.views.make_view`)."""
        batch_size = self.config.eval_batch_size
        assert batch_size is not None  # build_run resolves it
        return make_view(
            frozen, self.split, self.device, self.collective, batch_size,
            PairPools(self.train, self.unlabelled), self.config.augment,
            precision=self.config.precision,
        )  # fmt: skip


def check_datasets(train: Any, val: Any, num_classes: int) -> None:
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


def resolve_hardware_settings(
    config: FinetuneConfig,
    model: nn.Module,
    split: ModelSplit,
    train: Any,
    collective: Collective,
    device: torch.device,
) -> tuple[FinetuneConfig, HardwareChoice]:
    """The settings with the device, precision, layout and evaluation batch size resolved.

    ``"auto"`` precision and layout are measured (:func:`resolve_for_run`); the resolved
    values are recorded, so ``"auto"`` resumes only where it resolves alike. The evaluation
    batch is sized from the memory unless set: batches that cannot fit fail here, in one
    line naming the setting, not in the kernel's OOM killer. Then the model takes the
    layout and, with ``compile``, its backbone is compiled (in place: the parameters and
    ``state_dict`` keys stay the model's).
    """
    local_batch = collective.local_batch_size(config.batch_size)
    hardware = resolve_for_run(
        model, train, device, config.precision, config.channels_last, batch_size=local_batch,
        train=not config.frozen_backbone, processes=collective.world_size,
        is_main=collective.is_main,
    )  # fmt: skip
    config = config.replace(
        device=str(device), precision=hardware.precision, channels_last=hardware.channels_last
    )
    eval_batch_size = resolve_eval_batch_size(
        split.features, train, device, config.precision, config.eval_batch_size,
        None if config.frozen_backbone else local_batch,
    )  # fmt: skip
    config = config.replace(eval_batch_size=eval_batch_size)
    if config.channels_last:
        to_channels_last(model)
    if config.compile:
        split.features.compile()
    return config, hardware


def run_generator(seed: int, rank: int) -> torch.Generator:
    """The run's random stream: distinct and reproducible per rank, and rank 0's is a
    single-process run's (``seed + 1_000_003 * rank``)."""
    return torch.Generator().manual_seed(seed + 1_000_003 * rank)


def build_run(
    model: nn.Module,
    train: Any,
    val: Any,
    objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str | None,
    config: FinetuneConfig,
    unlabelled: Any = None,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    distributed: Collective | None = None,
    identity: dict[str, Any] | None = None,
    initialise_head_weights: bool = True,
) -> RunParts:
    """Prepares a SelMix run (arguments as :class:`selmix.finetune.trainer.Trainer`).

    In order: the split; the data sets, checked against the head; the objective resolved
    (:func:`resolve_objective`; a warning when the validation set is small for it); the
    device and threads; the hardware settings (:func:`resolve_hardware_settings`); the
    generator and sampler; the data's fingerprint; the start head (``head_init``, unless
    ``initialise_head_weights`` is False: a resumed run has it in its weights).

    Returns:
        The :class:`RunParts`; ``model`` is moved to the run's device and may have its
        head replaced by the start head.
    """
    collective = distributed or SingleProcess()
    split = split_model(model, features=features, head=head)
    num_classes = split.head.out_features
    train = as_batch_dataset(train, "train")
    val = as_batch_dataset(val, "val")
    unlabelled = None if unlabelled is None else as_batch_dataset(unlabelled, "unlabelled")
    check_datasets(train, val, num_classes)
    labels = torch.as_tensor(train.labels).long().cpu()
    val_labels = torch.as_tensor(val.labels).long().cpu()
    config, resolved = resolve_objective(config, objective, labels, num_classes, val_labels)
    val_counts = torch.bincount(val_labels, minlength=num_classes)
    if collective.is_main:
        warn_if_small_validation(val_counts, resolved, config.shrinkage)
    device = collective.process_device(config.device)
    configure_threads(config.threads)
    model = model.to(device)
    config, hardware = resolve_hardware_settings(config, model, split, train, collective, device)
    generator = run_generator(config.seed, collective.rank)
    sampler = PairSampler(labels, None, num_classes, generator)
    data = data_fingerprint(train, val, unlabelled)
    head_init = None
    if initialise_head_weights and config.head_init != "none":
        head_init = initialise_head(config.head_init, model, split, train, val, resolved, config)
    return RunParts(
        model=model, split=split, config=config, objective=resolved, train=train, val=val,
        unlabelled=unlabelled, collective=collective, device=device, hardware=hardware,
        generator=generator, sampler=sampler, val_counts=val_counts, data=data,
        identity=None if identity is None else plain_data(dict(identity)), head_init=head_init,
    )  # fmt: skip
