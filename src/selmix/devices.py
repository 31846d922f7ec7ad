"""Where a run's tensors live, and the one place they leave the run's device.

The rule (checked by ``tests/test_structure.py``, which allows ``.cpu()`` only here and in
the few host-side places it names):

* **On the run's device**: the model, every batch of images, the features (cached or
  not), the logits, and the per-batch sums an evaluation is made of (confusion counts,
  feature sums, class counts, soft counts). Across processes the sums are all-reduced
  there (NCCL reduces CUDA tensors only).
* **Leaving it, through** :func:`to_host` **only**:

  - an evaluation's summed totals (:meth:`selmix.engine.evaluate.Evaluation.from_sums`): K x K
    counts and K x d class means. The feedback's maths on them (the estimate, the
    multipliers, the policy) is small, and the pair sampler it feeds draws from the run's
    CPU generator, so that one seed gives the same pairs on every device;
  - the gain matrix and the mixing distribution the feedback hands to that sampler and
    to the logs;
  - results, logs and checkpoints: weights, optimiser-free state, predictions.
* **On the host from the start**: a data set's labels and the indices drawn from them
  (the data layer reads from disk or host memory; an index that selects rows of a device
  tensor is moved with ``.to(device)`` where it is used).

A tensor that must change device anywhere else is a bug of this rule, not a local fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch

__all__ = ["HOST", "state_to_host", "to_host"]

#: The device results, logs and checkpoints are kept on.
HOST = torch.device("cpu")

T = TypeVar("T")


def to_host(value: T) -> T:
    """``value`` with every tensor in it detached and on the CPU (the result boundary).

    Args:
        value: a tensor, or a dict / list / tuple (nested) holding tensors and plain data.

    Returns:
        The same structure; tensors already on the CPU are returned detached, not copied
        (callers that keep a tensor which training will change clone it).
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to(HOST)  # type: ignore[return-value]
    if isinstance(value, Mapping):
        return type(value)((key, to_host(item)) for key, item in value.items())  # type: ignore[call-arg]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(to_host(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(item) for item in value)
    return value


def state_to_host(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module.state_dict()`` on the CPU that later training cannot change."""
    return {key: tensor.detach().to(HOST, copy=True) for key, tensor in module.state_dict().items()}
