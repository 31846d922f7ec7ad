"""The optimiser steps of a training step: the closed-form frozen-head step
(:class:`_LinearHeadStep`, bit-identical to autograd) and the loss-scaled autograd step."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selmix.engine.collective import Collective
from selmix.engine.views import ModelView


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


def _closed_form_head_step(view: ModelView, collective: Collective) -> _LinearHeadStep | None:
    """The closed-form head step where it is exact: a view whose backbone does not train
    (its :meth:`ModelView.mixed_features` are constants) and a plain ``nn.Linear`` head (no
    subclass, no hooks, trainable weights)."""
    head = view.split.head
    if view.trains_backbone or type(head) is not nn.Linear:
        return None
    if head._forward_hooks or head._forward_pre_hooks or head._backward_hooks:
        return None
    if not all(param.requires_grad for param in head.parameters()):
        return None
    return _LinearHeadStep(head)


def _scaled_step(loss: torch.Tensor, optimizer: Any, scaler: Any) -> None:
    """Backward and optimiser step through the loss scaler (fp16; a pass-through otherwise)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
