"""The gain matrix of SelMix (Theorem 4.1, docs/maths.md section 3), for any objective.

``G[i, j]`` is the first-order change of the objective per unit SGD step on one (i, j)
feature mixup with label i. The objective's derivative comes from autograd, so one function
serves every objective, including a user's own. The contraction over prototypes and
classes is written as a handful of K x K matrix products: O(K^3 + K^2 d) time and O(K^2 + K d)
memory, where the authors' code builds a K^4 tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from selmix._validation import check_all_classes_present, check_confusion, check_in_range
from selmix.core.objectives import Objective, as_objective

__all__ = ["confusion_gradient", "gain_matrix"]


def confusion_gradient(
    objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str,
    confusion: torch.Tensor,
    soft_confusion: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the objective with respect to the row-softmax parameters of C.

    With ``C[q, :] = pi_q softmax(A[q, :])`` and ``h = d psi / d C``,
    ``g[q, m] = C[q, m] * (h[q, m] - sum_l (C[q, l] / pi_q) h[q, l])``.

    The factor ``C[q, m]`` is the derivative of the softmax parametrisation. Measured with
    hard (argmax) counts it is 0 for a class that no validation image reaches, so such a
    class gets no gain however large ``h`` is. ``soft_confusion`` (per true class the
    summed softmax probabilities of the model, never 0) replaces C in that factor only:
    h is still evaluated at ``confusion``. It is the matrix the softmax parametrisation
    describes, so the first-order expansion holds for it (docs/maths.md section 3).

    Args:
        objective: the objective (its multipliers are used as they are).
        confusion: Tensor[K, K], normalised to a total of 1 inside.
        soft_confusion: optional Tensor[K, K] of soft counts (normalised inside).

    Returns:
        Tensor[K, K] float64, ``d psi / d A``.
    """
    confusion = check_confusion(confusion)
    if soft_confusion is not None:
        soft_confusion = _check_soft(soft_confusion, confusion)
    return _confusion_gradient(as_objective(objective), confusion, soft_confusion)


def _check_soft(soft_confusion: torch.Tensor, confusion: torch.Tensor) -> torch.Tensor:
    soft_confusion = check_confusion(soft_confusion, "soft_confusion")
    if soft_confusion.shape != confusion.shape:
        raise ValueError(
            f"`soft_confusion` must have the shape of `confusion` {tuple(confusion.shape)}, "
            f"got {tuple(soft_confusion.shape)}"
        )
    return soft_confusion


def _confusion_gradient(
    objective: Objective, confusion: torch.Tensor, soft_confusion: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`confusion_gradient` for already validated matrices."""
    confusion = confusion.detach().double()
    confusion = confusion / confusion.sum()
    variable = confusion.clone().requires_grad_(True)
    with torch.enable_grad():
        value = objective(variable)
        if not value.requires_grad:
            raise ValueError(
                f"objective {getattr(objective, 'name', objective)!r} returned a value that "
                "does not depend on the confusion matrix"
            )
        (h,) = torch.autograd.grad(value, variable)
    if soft_confusion is not None:
        factor = soft_confusion.detach().to(confusion)
        confusion = factor / factor.sum()
    rows = confusion / confusion.sum(dim=1, keepdim=True)
    return confusion * (h - (rows * h).sum(dim=1, keepdim=True))


def _check_shapes(confusion: torch.Tensor, prototypes: torch.Tensor, head: nn.Module) -> None:
    if not isinstance(head, nn.Linear):
        raise TypeError(f"`head` must be a torch.nn.Linear, got {type(head).__name__}")
    if not isinstance(prototypes, torch.Tensor) or prototypes.dim() != 2:
        shape = tuple(prototypes.shape) if isinstance(prototypes, torch.Tensor) else None
        raise ValueError(f"`prototypes` must be a K x d tensor, got shape {shape}")
    num_classes = confusion.shape[0]
    if prototypes.shape[0] != num_classes:
        raise ValueError(
            f"`prototypes` has {prototypes.shape[0]} rows but `confusion` is "
            f"{num_classes} x {num_classes}"
        )
    if head.out_features != num_classes:
        raise ValueError(
            f"`head` has {head.out_features} outputs but `confusion` is "
            f"{num_classes} x {num_classes}"
        )
    if head.in_features != prototypes.shape[1]:
        raise ValueError(
            f"`head` takes {head.in_features} features but `prototypes` has "
            f"{prototypes.shape[1]} columns"
        )
    if not torch.isfinite(prototypes).all():
        raise ValueError("`prototypes` must be finite, got NaN or infinite entries")


def _mixed_softmax_contraction(
    logits: torch.Tensor, weights: torch.Tensor, mix: float
) -> torch.Tensor:
    """``T[i, j] = sum_l softmax(m a_i + (1-m) a_j)[l] * (m H[i, l] + (1-m) H[j, l])``.

    The softmax of a sum of logits factorises into ``u[i, l] v[j, l]`` (exp turns sums into
    products), so T is three matrix products. A pair whose normaliser underflows (logit gaps
    in the hundreds) is recomputed directly with a max-shifted softmax.
    """
    shifted = logits - logits.max(dim=1, keepdim=True).values
    u = torch.exp(mix * shifted)
    v = torch.exp((1 - mix) * shifted)
    normaliser = u @ v.T
    numerator = mix * ((u * weights) @ v.T) + (1 - mix) * (u @ (v * weights).T)
    # below this the products that make up the normaliser may have lost their precision
    threshold = torch.finfo(logits.dtype).tiny ** 0.5
    unsafe = normaliser < threshold
    contraction = numerator / normaliser.clamp_min(torch.finfo(logits.dtype).tiny)
    if unsafe.any():
        rows, cols = unsafe.nonzero(as_tuple=True)
        for start in range(0, rows.numel(), 4096):
            i, j = rows[start : start + 4096], cols[start : start + 4096]
            probs = torch.softmax(mix * logits[i] + (1 - mix) * logits[j], dim=1)
            mixed_weights = mix * weights[i] + (1 - mix) * weights[j]
            contraction[i, j] = (probs * mixed_weights).sum(dim=1)
    return contraction


def gain_matrix(
    objective: Objective | Callable[[torch.Tensor], torch.Tensor] | str,
    confusion: torch.Tensor,
    prototypes: torch.Tensor,
    head: nn.Linear,
    mix: float = 0.8,
    soft_confusion: torch.Tensor | None = None,
) -> torch.Tensor:
    """The K x K gain matrix of SelMix.

    ``G[i, j] = sum_{q, l} g[q, l] (delta_{l i} - p_ij[l]) (z_ij . mu_q + beta)`` with
    ``z_ij = m mu_i + (1 - m) mu_j``, ``p_ij = softmax(W z_ij + b)``, ``g = d psi / d A``
    (:func:`confusion_gradient`) and ``beta = 1`` when the head has a bias.

    Args:
        objective: an :class:`~selmix.Objective` (with its multipliers already updated),
            a registered name, or any differentiable callable of C.
        confusion: Tensor[K, K], the validation confusion matrix (counts or fractions).
        prototypes: Tensor[K, d], the class means of the validation features.
        head: the linear classifier, ``nn.Linear(d, K)``.
        mix: m, the expected weight of the class-i feature, ``(1 + lam_min) / 2``.
        soft_confusion: optional Tensor[K, K], the soft confusion matrix (per true class,
            the summed validation softmax probabilities) used in the derivative factor of
            g (see :func:`confusion_gradient`), so that a class at 0 recall or 0 coverage
            still gets a gain.

    Returns:
        Tensor[K, K] on the prototypes' device, in the prototypes' floating dtype; rows are
        the label class i, columns the mixing partner j.
    """
    confusion = check_confusion(confusion)
    check_all_classes_present(confusion)
    _check_shapes(confusion, prototypes, head)
    mix = check_in_range("mix", mix, 0.0, 1.0)
    if soft_confusion is not None:
        soft_confusion = _check_soft(soft_confusion, confusion).to(device=prototypes.device)

    device = prototypes.device
    dtype = prototypes.dtype if prototypes.is_floating_point() else torch.float32
    grad_a = _confusion_gradient(as_objective(objective), confusion.to(device), soft_confusion)
    grad_a = grad_a.to(dtype)
    features = prototypes.detach().to(dtype)
    weight = head.weight.detach().to(device=device, dtype=dtype)
    has_bias = head.bias is not None
    logits = features @ weight.T
    if has_bias:
        logits = logits + head.bias.detach().to(device=device, dtype=dtype)

    # weights[i, l] = sum_q (mu_i . mu_q + beta) g[q, l]; pick the cheaper association
    num_classes, dim = features.shape
    if dim >= num_classes:
        weights = (features @ features.T) @ grad_a
    else:
        weights = features @ (features.T @ grad_a)
    if has_bias:
        weights = weights + grad_a.sum(dim=0, keepdim=True)

    diagonal = weights.diagonal()
    own_term = mix * diagonal[:, None] + (1 - mix) * weights.T
    return own_term - _mixed_softmax_contraction(logits, weights, mix)
