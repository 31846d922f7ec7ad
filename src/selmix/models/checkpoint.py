"""Checkpoints: atomic writes, ``weights_only`` loads, RNG state capture, model files.

The atomic writers of :mod:`selmix._io` are re-exported here: use :func:`write_json` and
:func:`write_yaml` for ``metrics.json`` and ``config.yaml``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it
loads with ``torch.load(weights_only=True)`` and never executes code from the file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix._io import atomic_write_bytes, atomic_write_text, write_json, write_yaml
from selmix.devices import to_host
from selmix.models import create_model

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "load_checkpoint",
    "load_model",
    "require_keys",
    "restore_rng_state",
    "save_checkpoint",
    "save_model",
    "write_json",
    "write_yaml",
]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Writes ``state`` atomically: to a temporary file in the same folder, then a rename.

    A run killed while writing leaves the previous checkpoint intact; the temporary file it
    leaves behind is removed by the next save to the same path. The file gets the user's
    umask, like any file the user writes.

    Raises:
        OSError: the file could not be written (disk full, no permission); one line naming
            the path. The previous checkpoint is unchanged.
    """
    # serialise in memory first: torch's zip writer reports a full disk as an opaque
    # RuntimeError ("enforce fail at inline_container.cc"), our own write as an OSError
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint (empty, truncated, corrupt, or
            not a dict); one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`checkpoint` {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"`checkpoint` {str(path)!r} is empty (0 bytes): not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to unpickle means a bad file
        # torch.load raises many types on arbitrary bytes (RuntimeError, UnpicklingError,
        # EOFError, BadZipFile, IndexError...); all mean the same thing to the caller
        raise ValueError(
            f"`checkpoint` {str(path)!r} is corrupt or not a checkpoint: {_load_error(error)}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"`checkpoint` {str(path)!r} must hold a dict, got {type(state).__name__}")
    return state


def _load_error(error: BaseException) -> str:
    """One line on why torch.load failed, without torch's advice to retry unsafely."""
    text = str(error).strip()
    if "weights_only" in text or "Weights only" in text:
        # torch suggests weights_only=False, which would run code from an untrusted file
        # and cannot repair a corrupt one: name what the file holds instead
        return (
            "it holds Python objects other than tensors and plain data (refused: loading "
            "them could run code), or its bytes are damaged"
        )
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def require_keys(
    state: dict[str, Any], keys: Sequence[str], path: str | os.PathLike, what: str = "checkpoint"
) -> None:
    """Checks that a loaded checkpoint has ``keys``; the error names the file and the keys.

    Args:
        state: what :func:`load_checkpoint` returned.
        keys: the keys the caller reads.
        path: the file, for the message.
        what: what the file should be, e.g. ``"resume checkpoint"``.

    Raises:
        ValueError: one line such as "`checkpoint` 'run/state.pt' is not a complete resume
            checkpoint: it lacks the key(s) 'step', 'optimizer'".
    """
    missing = [key for key in keys if key not in state]
    if missing:
        names = ", ".join(repr(key) for key in missing)
        raise ValueError(
            f"`checkpoint` {str(path)!r} is not a complete {what}: it lacks the key(s) {names}"
        )


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
        "state_dict": to_host(model.state_dict()),
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

    state = load_checkpoint(path)
    if state.get("format") != "selmix-model-v1":
        raise ValueError(
            f"`checkpoint` {str(path)!r} is not a selmix model file (no format "
            "'selmix-model-v1'; a resume checkpoint goes to `resume`, not `checkpoint`)"
        )
    require_keys(state, ["state_dict"], path, "selmix model file")
    spec = state.get("spec")
    if not spec:
        raise ValueError(
            f"`checkpoint` {str(path)!r} holds a model that was not built by "
            "selmix.create_model; load its state_dict into your own model instead"
        )
    if not isinstance(spec, dict) or not isinstance(state["state_dict"], dict):
        raise ValueError(f"`checkpoint` {str(path)!r} is a damaged selmix model file")
    missing = [key for key in ("name", "num_classes", "in_channels", "kwargs") if key not in spec]
    if missing:
        raise ValueError(
            f"`checkpoint` {str(path)!r} is a damaged selmix model file: its model spec lacks "
            f"the key(s) {', '.join(repr(key) for key in missing)}"
        )
    if num_classes is not None and spec["num_classes"] != num_classes:
        raise ValueError(
            f"`checkpoint` {str(path)!r} is for {spec['num_classes']} classes but the data "
            f"has {num_classes}"
        )
    try:
        model = create_model(
            spec["name"], spec["num_classes"], in_channels=spec["in_channels"], **spec["kwargs"]
        )
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(
            f"`checkpoint` {str(path)!r} describes a model selmix cannot build: "
            f"{' '.join(str(error).split())}"
        ) from None
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"`checkpoint` {str(path)!r} does not match model {spec['name']!r}: "
            f"{str(error).splitlines()[0]}"
        ) from None
    return model.to(device), state.get("meta", {})
