"""What the fine-tuning engine needs from the processes it runs on, as one typed interface.

:class:`Collective` is the interface; :class:`SingleProcess` passes everything through (one
process, the whole data set, no communication) and
:class:`selmix.engine.distributed.DistributedContext` implements it over ``torch.distributed``.
The :class:`selmix.Trainer` and the model views (:mod:`selmix.engine.views`) always hold one, so
they never test whether they run distributed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from selmix._validation import check_int
from selmix.engine.evaluate import Evaluation, evaluate, resolve_device
from selmix.models.checkpoint import capture_rng_state

__all__ = ["Collective", "SingleProcess", "evaluate_across"]


@runtime_checkable
class Collective(Protocol):
    """The processes a run spans: who this one is, how they share data and results.

    Attributes:
        rank: this process's rank, in ``[0, world_size)``.
        world_size: the number of processes.
        is_main: True on the process that writes logs, checkpoints and reports (rank 0).
    """

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def process_device(self, requested: str | torch.device | None) -> torch.device:
        """The device this process computes on, given the configured one."""
        ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the processes, in place; returns it."""
        ...

    def shard(self, dataset: Any) -> Any:
        """This process's part of ``dataset`` (the parts of all processes cover it once)."""
        ...

    def gather(self, function: Callable[[Any], torch.Tensor], dataset: Any) -> torch.Tensor:
        """``function(dataset)`` computed shard by shard: each process applies
        ``function`` to its :meth:`shard` (rows in the shard's order) and every process
        gets all rows, in the data set's order."""
        ...

    def barrier(self) -> None:
        """Waits until every process gets here."""
        ...

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to train with (DistributedDataParallel across processes)."""
        ...

    def broadcast_module(self, module: nn.Module) -> None:
        """Gives every process rank 0's parameters and buffers of ``module``."""
        ...

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> Any:
        """Averages ``optimizer``'s gradients over the processes before each step (for
        training outside :meth:`wrap`)."""
        ...

    def gather_rng_states(self, generator: torch.Generator) -> list[dict[str, Any]]:
        """Every process's RNG state (:func:`selmix.models.checkpoint.capture_rng_state`)."""
        ...

    def local_batch_size(self, global_batch: int) -> int:
        """The share of a global batch this process draws."""
        ...


class SingleProcess:
    """The :class:`Collective` of a run in one process: everything passes through."""

    rank = 0
    world_size = 1

    def __repr__(self) -> str:
        return "SingleProcess()"

    @property
    def is_main(self) -> bool:
        return True

    def process_device(self, requested: str | torch.device | None) -> torch.device:
        return resolve_device(requested)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def shard(self, dataset: Any) -> Any:
        return dataset

    def gather(self, function: Callable[[Any], torch.Tensor], dataset: Any) -> torch.Tensor:
        return function(dataset)

    def barrier(self) -> None:
        return None

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def broadcast_module(self, module: nn.Module) -> None:
        return None

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> Any:
        return None

    def gather_rng_states(self, generator: torch.Generator) -> list[dict[str, Any]]:
        return [capture_rng_state(generator)]

    def local_batch_size(self, global_batch: int) -> int:
        return check_int("batch_size", global_batch, minimum=1)


def evaluate_across(
    collective: Collective,
    model: nn.Module,
    dataset: Any,
    device: str | torch.device,
    batch_size: int | None = None,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
    precision: str = "fp32",
) -> Evaluation:
    """:func:`selmix.evaluate` of ``dataset``, each process evaluating its shard; every
    process gets the whole result (summed counts, prototypes of the summed sums)."""
    return evaluate(
        model, collective.shard(dataset), device, batch_size, features=features, head=head,
        reduce=collective.all_reduce, precision=precision,
    )  # fmt: skip
