"""Checkpoints: atomic writes, ``weights_only`` loads, RNG state capture, model files.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it
loads with ``torch.load(weights_only=True)`` and never executes code from the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "capture_rng_state",
    "load_checkpoint",
    "load_model",
    "restore_rng_state",
    "save_checkpoint",
    "save_model",
]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Writes ``state`` atomically: to a temporary file in the same folder, then a rename.

    A run killed while writing leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint (truncated, corrupt, or not a
            dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`checkpoint` {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to unpickle means a bad file
        # torch.load raises many types on arbitrary bytes (RuntimeError, UnpicklingError,
        # EOFError, BadZipFile, IndexError...); all mean the same thing to the caller
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ValueError(
            f"`checkpoint` {str(path)!r} is corrupt or not a checkpoint: {first_line}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"`checkpoint` {str(path)!r} must hold a dict, got {type(state).__name__}")
    return state


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The global torch RNG states (CPU and CUDA) and, if given, a generator's state."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restores what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Saves a model with what is needed to rebuild it from the registry.

    Models made by :func:`selmix.create_model` carry their registry name and arguments
    (``model.selmix_spec``); other models are saved as a bare ``state_dict`` and need the
    user's own constructor to load.

    Args:
        path: the output file.
        model: the model.
        meta: extra plain data (class names, normalisation, metrics, the command...).
    """
    spec = getattr(model, "selmix_spec", None)
    state = {
        "format": "selmix-model-v1",
        "spec": dict(spec) if spec else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_checkpoint(path, state)


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds a registry model saved by :func:`save_model`.

    Args:
        path: the model file.
        device: where to put the model.
        num_classes: if given, the number of classes the caller's data has; a model for
            another number of classes is an error.

    Returns:
        ``(model, meta)``.
    """
    from selmix.models import create_model

    state = load_checkpoint(path)
    if state.get("format") != "selmix-model-v1" or "state_dict" not in state:
        raise ValueError(f"`checkpoint` {str(path)!r} is not a selmix model file")
    spec = state.get("spec")
    if not spec:
        raise ValueError(
            f"`checkpoint` {str(path)!r} holds a model that was not built by "
            "selmix.create_model; load its state_dict into your own model instead"
        )
    if num_classes is not None and spec["num_classes"] != num_classes:
        raise ValueError(
            f"`checkpoint` {str(path)!r} is for {spec['num_classes']} classes but the data "
            f"has {num_classes}"
        )
    model = create_model(
        spec["name"], spec["num_classes"], in_channels=spec["in_channels"], **spec["kwargs"]
    )
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"`checkpoint` {str(path)!r} does not match model {spec['name']!r}: "
            f"{str(error).splitlines()[0]}"
        ) from None
    return model.to(device), state.get("meta", {})
