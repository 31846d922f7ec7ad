"""The mixup sampling policy (docs/maths.md section 4, paper Eq. 6) and its diagnostics."""

from __future__ import annotations

import warnings

import torch

from selmix._validation import check_choice, check_in_range, check_positive

__all__ = [
    "POLICIES",
    "StationaryPointWarning",
    "effective_pairs",
    "min_recall_uniform_mix",
    "mixup_distribution",
    "policy_entropy",
]

POLICIES = ("selmix", "uniform", "greedy")

#: The most of the pairs drawn uniformly for the min-recall objectives when ``uniform_mix``
#: is unset (issue 38, docs/RESULTS.md): half the pairs class-balanced, as cRT, keep the
#: other classes' recall while the policy lifts the worst.
MIN_RECALL_UNIFORM_MIX = 0.5

#: The recall standard error from which on :data:`MIN_RECALL_UNIFORM_MIX` is used:
#: 0.5 / sqrt(100), a recall measured on 100 samples.
FULL_MIX_SPREAD = 0.05


class StationaryPointWarning(UserWarning):
    """No mixup pair has a positive gain: the objective is at a first-order stationary point."""


def mixup_distribution(
    gain: torch.Tensor,
    scale: float = 10.0,
    policy: str = "selmix",
    normalize_gain: bool = False,
    uniform_mix: float = 0.0,
) -> torch.Tensor:
    """Distribution over (i, j) mixup pairs.

    ``selmix``: ``P[i, j] ∝ exp(s * G[i, j])`` on pairs with ``G[i, j] > 0``, 0 elsewhere;
    with ``normalize_gain=True`` the gain is divided by ``max |G|`` first, which makes s
    mean the same sharpness for every model and objective (the gain's size grows with the
    squared feature norm and the multipliers). ``uniform``: all K^2 pairs alike.
    ``greedy``: all mass on the pair with the largest gain.

    ``uniform_mix`` = eps returns ``(1 - eps) P + eps / K^2``: every pair keeps at least
    eps / K^2 of the mass, so no class's images stop being seen between feedback steps
    (the sharp min-recall policy otherwise spends every step on the current worst class,
    and the head forgets the others until the next feedback notices).

    Args:
        gain: Tensor[K, K] from :func:`selmix.core.gain_matrix`.
        scale: s, the inverse temperature (> 0).
        policy: ``"selmix"``, ``"uniform"`` or ``"greedy"``.
        normalize_gain: use the scale-free form of the policy.
        uniform_mix: eps in [0, 1], the share of the uniform distribution mixed in.

    Returns:
        Tensor[K, K] of probabilities summing to 1.
    """
    check_choice("policy", policy, POLICIES)
    scale = check_positive("scale", scale)
    uniform_mix = check_in_range("uniform_mix", uniform_mix, 0.0, 1.0)
    if not isinstance(gain, torch.Tensor) or gain.dim() != 2 or gain.shape[0] != gain.shape[1]:
        shape = tuple(gain.shape) if isinstance(gain, torch.Tensor) else type(gain).__name__
        raise ValueError(f"`gain` must be a square K x K tensor, got {shape}")
    if not torch.isfinite(gain).all():
        raise ValueError("`gain` must be finite, got NaN or infinite entries")
    gain = gain.detach()
    if not gain.is_floating_point():
        gain = gain.double()

    distribution = _policy(gain, scale, policy, normalize_gain)
    if uniform_mix > 0:
        distribution = (1 - uniform_mix) * distribution + uniform_mix / gain.numel()
    return distribution


def min_recall_uniform_mix(spread: float | None) -> float:
    """The share eps of uniformly drawn pairs for a min-recall objective whose recalls are
    known to the standard error ``spread``: ``eps = 0.5 min(1, (spread / 0.05)^2)``.

    The multipliers steer the pairs towards the class measured worst; the noisier that
    measurement, the more of the steering follows noise, and class-balanced pairs keep the
    other classes' recall instead. With ``spread = 0.5 / sqrt(n)`` (n validation samples of
    the smallest class, :meth:`selmix.core.objectives.MinRecall.recall_spread`) this is
    half the pairs up to n = 100, 0.1 at n = 500 and 0.05 at n = 1000: the share falls with
    the variance of the measured recalls. The rule is fitted to measurements, not derived:
    half the pairs won mean recall at equal min recall on the issue-22 suite (n <= 100),
    and cost 2.8 points of min recall on CIFAR-10-LT at n = 500, where 0.1 kept it
    (docs/RESULTS.md, "Issue 38").

    Args:
        spread: the recalls' standard error (> 0), or None when unknown (no validation
            counts): then :data:`MIN_RECALL_UNIFORM_MIX`.

    Returns:
        eps in [0, 0.5].
    """
    if spread is None:
        return MIN_RECALL_UNIFORM_MIX
    spread = check_positive("spread", spread)
    return MIN_RECALL_UNIFORM_MIX * min(1.0, (spread / FULL_MIX_SPREAD) ** 2)


def _policy(gain: torch.Tensor, scale: float, policy: str, normalize_gain: bool) -> torch.Tensor:
    if policy == "uniform":
        return torch.full_like(gain, 1.0 / gain.numel())
    if policy == "greedy":
        # a fresh contiguous tensor: zeros_like would copy the strides of a transposed gain
        distribution = torch.zeros(gain.shape, dtype=gain.dtype, device=gain.device)
        distribution.view(-1)[gain.reshape(-1).argmax()] = 1.0
        return distribution

    positive = gain > 0
    if not positive.any():
        warnings.warn(
            "no mixup pair has a positive gain (the objective is at a first-order stationary "
            "point); falling back to the uniform policy",
            StationaryPointWarning,
            stacklevel=3,
        )
        return torch.full_like(gain, 1.0 / gain.numel())
    if normalize_gain:
        gain = gain / gain.abs().max()
    logits = torch.where(positive, scale * gain, torch.full_like(gain, float("-inf")))
    return torch.softmax(logits.flatten(), dim=0).reshape(gain.shape)


def policy_entropy(distribution: torch.Tensor) -> float:
    """Shannon entropy (nats) of a pair distribution."""
    probs = distribution.flatten().double()
    probs = probs[probs > 0]
    return float(-(probs * probs.log()).sum())


def effective_pairs(distribution: torch.Tensor) -> float:
    """``exp(entropy)``: how many pairs the policy effectively spreads its mass over."""
    return float(torch.tensor(policy_entropy(distribution), dtype=torch.float64).exp())
