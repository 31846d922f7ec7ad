"""Resume identity: what a checkpoint must agree on to continue a run (its settings,
world size, data fingerprint and identity; :func:`check_resume`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix.core.mixing import FEATURE
from selmix.engine.config import FinetuneConfig, plain_data
from selmix.models.checkpoint import (
    require_keys,
)


def _weights_are_finite(model: nn.Module) -> bool:
    return all(
        bool(torch.isfinite(value).all())
        for value in model.state_dict().values()
        if value.is_floating_point()
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
    older = {
        "precision": "fp32", "mixup": FEATURE,
        "backbone_feedback_every": saved_config.get("feedback_every"),
    }  # fmt: skip
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
            if plain_data(before) != plain_data(now):
                changed.append(f"{key} data: {_describe_set(before)} -> {_describe_set(now)}")
    if changed:
        # one line listing everything that differs, settings, data and start alike
        raise ValueError(f"`resume` checkpoint was made with other settings ({'; '.join(changed)})")


def _describe_set(entry: Any) -> str:
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return f"{entry[0]} samples, labels {entry[1]}"
    return repr(entry)
