"""Fine-tuning and evaluation across processes and machines with ``torch.distributed``.

selmix runs under ``torchrun``: every process holds a full copy of the model on its own
device, the backbone and head are wrapped in PyTorch's
:class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged across ranks), and
the SelMix feedback step is made identical on every rank by summing the confusion counts,
the per-class feature sums and the class counts of each rank's shard of the validation
set. The backend follows the device: NCCL for CUDA, gloo for CPU.

A typical entry point::

    context = init_from_env("auto")            # None when not launched by torchrun
    try:
        result = finetune(model, train, val, config, distributed=context)
    finally:
        if context is not None:
            context.destroy()

What each rank does (docs/maths.md section 5, issue 7):

* feedback: evaluate ``shard(val)``; :meth:`DistributedContext.all_reduce` sums the counts,
  so every rank computes the same C, prototypes, multipliers, gain matrix and policy;
* training: each rank draws ``batch_size / world_size`` pairs from its own generator
  (seeded from the run seed and the rank); DDP averages the gradients;
* frozen backbone: the trainer does not use DDP (it trains the head on cached features),
  so the model is broadcast from rank 0 once and the head's gradients are averaged by an
  optimizer pre-step hook; the feature caches are extracted shard by shard and gathered
  (:meth:`DistributedContext.gather`);
* pseudo-labels (semi-supervised): predicted on the rank's shard and gathered in the
  original order (:meth:`DistributedContext.gather` again);
* rank 0 alone writes logs and checkpoints; a checkpoint stores every rank's generator
  state, so a run resumes (on the same number of processes) exactly where it stopped.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from selmix._validation import check_int
from selmix.engine.collective import evaluate_across
from selmix.engine.evaluate import Evaluation, resolve_device
from selmix.models.checkpoint import capture_rng_state

__all__ = [
    "DatasetShard",
    "DistributedContext",
    "init_from_env",
    "run_on_main",
    "shard_bounds",
]

# Environment variables torchrun sets for every worker.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def shard_bounds(length: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``length`` samples.

    Shards differ in size by at most one sample and, concatenated in rank order, give back
    ``range(length)``.

    Args:
        length: number of samples.
        rank: the process's rank, ``0 <= rank < world_size``.
        world_size: number of processes.

    Returns:
        ``(start, stop)``.
    """
    check_int("length", length, minimum=0)
    check_int("world_size", world_size, minimum=1)
    check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"`rank` must be < world_size ({world_size}), got {rank}")
    return rank * length // world_size, (rank + 1) * length // world_size


class DatasetShard:
    """A view of some samples of a selmix data set (no copy of the images).

    It has the interface the engine reads (``labels``, ``num_classes``, ``classes``,
    ``batch`` and ``subset``), so it can be passed wherever a data set is expected.

    Args:
        dataset: an object with ``.labels`` and ``.batch(indices, augment, generator,
            device)`` (an :class:`~selmix.data.ImageTensorDataset`, a
            :class:`~selmix.data.DatasetAdapter`, another shard...).
        indices: LongTensor of the samples of ``dataset`` in the view.
    """

    def __init__(self, dataset: Any, indices: torch.Tensor) -> None:
        if not hasattr(dataset, "batch") or not hasattr(dataset, "labels"):
            raise TypeError(
                "`dataset` must have `.labels` and `.batch(...)` (a selmix data set), "
                f"got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.indices = torch.as_tensor(indices).long().cpu()
        labels = torch.as_tensor(dataset.labels)
        self.labels = labels[self.indices.to(labels.device)]
        self.num_classes = getattr(dataset, "num_classes", None)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return self.indices.numel()

    def __repr__(self) -> str:
        return f"DatasetShard({len(self)} of {len(self.dataset.labels)} samples)"

    def _positions(self, indices: Any) -> torch.Tensor:
        index = torch.as_tensor(indices).long().cpu().reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(
                f"`indices` must lie in [0, {len(self)}), got values in "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        return self.indices[index]

    def batch(
        self,
        indices: Any,
        augment: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the underlying data set for these positions of the shard."""
        return self.dataset.batch(
            self._positions(indices), augment=augment, generator=generator, device=device
        )

    def subset(self, indices: Any) -> DatasetShard:
        """A view of some samples of this view."""
        return DatasetShard(self.dataset, self._positions(indices))


class DistributedContext:
    """One process of a ``torch.distributed`` job: the :class:`selmix.engine.collective.Collective`
    of a run under ``torchrun``.

    Build it with :func:`init_from_env` under ``torchrun``; the constructor is for a process
    group that is already initialised.

    Args:
        rank: global rank of this process.
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU).
        device: this process's compute device (``cuda:LOCAL_RANK`` or ``cpu``).
        backend: the process group's backend (``"nccl"`` or ``"gloo"``).
        owns_group: :meth:`destroy` tears the process group down only when True.

    Attributes:
        rank, world_size, local_rank, device, backend: as above.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device | str,
        backend: str,
        owns_group: bool = False,
    ) -> None:
        self.world_size = check_int("world_size", world_size, minimum=1)
        self.rank = check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"`rank` must be < world_size ({world_size}), got {rank}")
        self.local_rank = check_int("local_rank", local_rank, minimum=0)
        self.device = torch.device(device)
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"unknown `backend` {backend!r}; expected 'nccl' or 'gloo'")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"`backend` 'nccl' needs a CUDA `device`, got {str(self.device)!r}")
        self.backend = backend
        self._owns_group = owns_group

    def __repr__(self) -> str:
        return (
            f"DistributedContext(rank={self.rank}, world_size={self.world_size}, "
            f"local_rank={self.local_rank}, device={str(self.device)!r}, "
            f"backend={self.backend!r})"
        )

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes logs, checkpoints and reports."""
        return self.rank == 0

    # -- communication ------------------------------------------------------------------
    @property
    def _comm_device(self) -> torch.device:
        # gloo reduces CPU tensors, NCCL CUDA tensors
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _for_comm(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself if the backend can use it, else a contiguous copy it can."""
        return tensor.to(self._comm_device).contiguous()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over all ranks, in place (any device; copied for the backend).

        Args:
            tensor: the local tensor; it holds the sum over ranks on return.

        Returns:
            ``tensor``.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`tensor` must be a torch.Tensor, got {type(tensor).__name__}")
        comm = self._for_comm(tensor)
        dist.all_reduce(comm, op=dist.ReduceOp.SUM)
        if comm is not tensor:
            with torch.no_grad():
                tensor.copy_(comm)
        return tensor

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Overwrites each tensor in place with rank ``src``'s copy."""
        with torch.no_grad():
            for tensor in tensors:
                comm = self._for_comm(tensor)
                dist.broadcast(comm, src=src)
                if comm is not tensor:
                    tensor.copy_(comm)

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Gives every rank rank ``src``'s parameters and buffers of ``module``."""
        self.broadcast_tensors([*module.parameters(), *module.buffers()], src=src)

    def all_gather_shards(self, local: torch.Tensor, length: int) -> torch.Tensor:
        """Concatenates the ranks' shards (see :func:`shard_bounds`) in rank order.

        Args:
            local: Tensor[n_r, ...], this rank's rows of a length-``length`` whole.
            length: total number of rows.

        Returns:
            Tensor[length, ...] on ``local``'s device, identical on every rank.
        """
        bounds = [shard_bounds(length, r, self.world_size) for r in range(self.world_size)]
        sizes = [stop - start for start, stop in bounds]
        if local.shape[0] != sizes[self.rank]:
            raise ValueError(
                f"`local` must have {sizes[self.rank]} rows (rank {self.rank}'s shard of "
                f"{length}), got {local.shape[0]}"
            )
        padded = local.new_zeros((max(sizes), *local.shape[1:]), device=self._comm_device)
        padded[: local.shape[0]] = local.to(self._comm_device)
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        whole = torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)])
        return whole.to(local.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        """Waits until every rank gets here."""
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def destroy(self) -> None:
        """Tears down the process group (only if :func:`init_from_env` created it)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    # -- data ---------------------------------------------------------------------------
    def shard_indices(self, length: int) -> torch.Tensor:
        """The sample indices of this rank's contiguous shard of ``length`` samples."""
        start, stop = shard_bounds(length, self.rank, self.world_size)
        return torch.arange(start, stop)

    def shard(self, dataset: Any) -> DatasetShard:
        """This rank's contiguous shard of a selmix data set (a view, no copy).

        Args:
            dataset: an object with ``.labels`` and ``.batch(...)``.

        Returns:
            A :class:`DatasetShard`; the shards of all ranks, in rank order, cover the
            data set once.
        """
        length = len(torch.as_tensor(dataset.labels))
        if length < self.world_size:
            raise ValueError(
                f"`dataset` has {length} samples, fewer than the {self.world_size} processes "
                "(world size): some ranks would get no sample"
            )
        return DatasetShard(dataset, self.shard_indices(length))

    def local_batch_size(self, global_batch: int) -> int:
        """Pairs this rank draws per step: ``batch_size / world_size``.

        Raises:
            ValueError: ``batch_size`` is not divisible by the world size.
        """
        check_int("batch_size", global_batch, minimum=1)
        if global_batch % self.world_size:
            raise ValueError(
                f"`batch_size` ({global_batch}) must be divisible by the number of "
                f"processes (world size {self.world_size}); use e.g. "
                f"{max(1, global_batch // self.world_size) * self.world_size}"
            )
        return global_batch // self.world_size

    # -- model --------------------------------------------------------------------------
    def wrap(self, module: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
        """Wraps ``module`` (already on :attr:`device`) in DistributedDataParallel.

        The wrapper broadcasts rank 0's parameters and buffers once and averages the
        gradients in every backward pass. Buffers are not re-broadcast at each forward:
        SelMix keeps batch norm in eval mode, so they never change.

        Args:
            module: the training module (the trainer's mixup forward, taking
                ``(first_images, second_images, lam)``).
            **ddp_kwargs: passed on to ``DistributedDataParallel`` (e.g.
                ``find_unused_parameters=True`` for a model with unused parameters).
        """
        kwargs: dict[str, Any] = {}
        if self.device.type == "cuda":
            kwargs.update(device_ids=[self.device.index], output_device=self.device.index)
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            kwargs["forward_sync_buffers"] = False
        else:  # torch < 2.13: the flag also leaves buffers out of the initial broadcast
            kwargs["broadcast_buffers"] = False
            self.broadcast_tensors(list(module.buffers()))
        kwargs.update(ddp_kwargs)
        return DistributedDataParallel(module, **kwargs)

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> Any:
        """Averages the gradients of ``optimizer``'s parameters over ranks before each step.

        For training outside DDP (the frozen-backbone mode trains the head on cached
        features): one all-reduce per step and dtype. A missing gradient counts as zeros,
        so ranks never disagree on what they reduce.

        Returns:
            The hook's handle (``.remove()`` detaches it).
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def hook(*_: Any) -> None:
            by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
            for param in params:
                if param.requires_grad:
                    by_dtype.setdefault(param.dtype, []).append(param)
            for group in by_dtype.values():
                grads = []
                for param in group:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    grads.append(param.grad)
                flat = torch.cat([grad.reshape(-1) for grad in grads])
                self.all_reduce(flat).div_(self.world_size)
                offset = 0
                for grad in grads:
                    size = grad.numel()
                    grad.copy_(flat[offset : offset + size].view_as(grad))
                    offset += size

        return optimizer.register_step_pre_hook(hook)

    # -- engine hooks (the :class:`selmix.engine.collective.Collective` interface) ---------------
    def process_device(self, requested: str | torch.device | None) -> torch.device:
        """This process's own device (``cuda:LOCAL_RANK`` or the CPU), whatever the
        configuration asks for: every rank computes on its own device."""
        return self.device

    @torch.no_grad()
    def gather(self, function: Callable[[Any], torch.Tensor], dataset: Any) -> torch.Tensor:
        """``function`` of every sample of ``dataset``: each rank applies it to its
        :meth:`shard`, then all ranks gather the rows, in the data set's order.

        Args:
            function: maps a data set (the shard) to Tensor[n, ...], one row per sample
                in the shard's order (e.g. its features, or its predicted labels).
            dataset: a selmix data set.

        Returns:
            Tensor[N, ...] on the device ``function`` returned, identical on every rank.
        """
        local = function(self.shard(dataset))
        return self.all_gather_shards(local, len(torch.as_tensor(dataset.labels)))

    def evaluate(
        self,
        model: nn.Module,
        dataset: Any,
        batch_size: int = 512,
        features: nn.Module | None = None,
        head: nn.Linear | None = None,
    ) -> Evaluation:
        """:func:`selmix.evaluate` of ``dataset`` split across ranks (every rank gets the
        whole result: summed counts, prototypes of the summed feature sums)."""
        return evaluate_across(self, model, dataset, self.device, batch_size, features, head)

    def gather_rng_states(self, generator: torch.Generator) -> list[dict[str, Any]]:
        """Every rank's :func:`selmix.models.checkpoint.capture_rng_state`, in rank order."""
        return self.all_gather_object(capture_rng_state(generator))


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"environment variable {name} must be an integer (torchrun sets it), got {value!r}"
        ) from None


def _process_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` (or the CPU without CUDA); else as given."""
    if device is None or str(device) in ("auto", "cuda"):
        if str(device) == "cuda" or torch.cuda.is_available():
            resolve_device("cuda")  # clear error when CUDA was asked for and is missing
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ValueError(
                    f"LOCAL_RANK {local_rank} has no GPU: this machine has {count}; "
                    "start at most that many processes per node (--nproc_per_node)"
                )
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    return resolve_device(device)


def init_from_env(
    device: str | torch.device | None = "auto",
    backend: str | None = None,
    timeout: float | None = None,
) -> DistributedContext | None:
    """Joins the process group that ``torchrun`` set up, or returns None outside torchrun.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The
    device is ``cuda:LOCAL_RANK`` for ``"auto"`` (with CUDA) and ``"cuda"``, the CPU for
    ``"cpu"`` (or ``"auto"`` without CUDA); the backend is NCCL on CUDA and gloo on the CPU.
    If a process group already exists (initialised by the caller), it is used as it is.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        backend: overrides the backend chosen from the device.
        timeout: seconds a collective may wait before the job fails (torch's default when
            None).

    Returns:
        A :class:`DistributedContext`, or None when ``RANK``/``WORLD_SIZE`` are not set.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        resolved = _process_device(device, local_rank)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        existing = str(dist.get_backend())
        if existing not in ("nccl", "gloo"):  # e.g. "cpu:gloo,cuda:nccl": pick by device
            existing = "nccl" if resolved.type == "cuda" else "gloo"
        return DistributedContext(
            rank, world_size, local_rank, resolved, existing, owns_group=False
        )
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed support")
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ValueError(
            f"environment variable(s) {missing} are not set: launch with torchrun, which sets "
            f"{', '.join(_TORCHRUN_VARS)}"
        )
    rank, world_size, local_rank = (_env_int(n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    resolved = _process_device(device, local_rank)
    if backend is None:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
    elif backend not in ("nccl", "gloo"):
        raise ValueError(f"unknown `backend` {backend!r}; expected 'nccl' or 'gloo'")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    options: dict[str, Any] = {}
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"`timeout` must be > 0 seconds, got {timeout}")
        options["timeout"] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world_size, **options
    )
    return DistributedContext(rank, world_size, local_rank, resolved, backend, owns_group=True)


def run_on_main(context: DistributedContext | None, function: Callable[[], Any]) -> Any:
    """Calls ``function`` on rank 0 only (or always without a context), then waits for it.

    For side effects that must happen once (writing a report, a model file); the other
    ranks return None.
    """
    result = function() if context is None or context.is_main else None
    if context is not None:
        context.barrier()
    return result
