"""Writing a fine-tuned model back in the family it came from.

``selmix finetune --export safetensors,state_dict,hf`` writes, next to selmix's own
``model.pt``:

* ``model.safetensors`` and ``model_state_dict.pt``: the weights under the original
  module's keys, so ``torchvision``/``timm`` models load them with ``load_state_dict`` and a
  LightningModule loads them whole (the prefix it held the network under, ``model.``, is put
  back, and the file's other entries are written unchanged);
* ``hf/``: ``save_pretrained`` of a Hugging Face classifier (with the starting folder's
  image-processor settings), which ``from_pretrained`` loads.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selmix._io import atomic_write_bytes
from selmix.models.loading import ModelSource, quiet_transformers

__all__ = [
    "EXPORT_FILES",
    "EXPORT_FORMATS",
    "check_export_formats",
    "export_model",
    "original_state_dict",
]

#: what each format writes into the output folder
EXPORT_FILES = {"safetensors": "model.safetensors", "state_dict": "model_state_dict.pt", "hf": "hf"}
EXPORT_FORMATS = tuple(EXPORT_FILES)
# files of a save_pretrained folder that describe the inputs, copied to OUT/hf as they are
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def check_export_formats(value: Any, source_kind: str | None = None) -> list[str]:
    """The formats ``export`` names: None, one name, a comma-separated string or a list.

    Args:
        value: the setting.
        source_kind: the starting model's :attr:`ModelSource.kind` (``"hf"`` for a Hugging
            Face folder), or None when not known yet.

    Raises:
        ValueError: an unknown format, or ``hf`` for a model that is not a Hugging Face one.
    """
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"`export` must be a comma-separated list of formats, got {value!r}")
    formats = [item.strip() for item in items if item.strip()]
    unknown = [item for item in formats if item not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(
            f"unknown `export` format {unknown[0]!r}; expected {', '.join(EXPORT_FORMATS)} "
            "(comma-separated)"
        )
    if "hf" in formats and source_kind not in (None, "hf"):
        raise ValueError(
            "`export` hf needs a Hugging Face starting model (`checkpoint` hf:DIR), got a "
            f"{source_kind} checkpoint"
        )
    return list(dict.fromkeys(formats))


def original_state_dict(model: nn.Module, source: ModelSource | None = None) -> dict[str, Tensor]:
    """The model's weights under the keys of the file it was loaded from.

    The model's own keys, with the source's prefix put back and its other entries added (a
    LightningModule's loss weights...). Tensors are detached, contiguous CPU copies, so that
    tied weights do not share memory (safetensors refuses shared tensors).
    """
    prefix = source.prefix if source is not None else ""
    state = {
        prefix + key: value.detach().to("cpu", copy=True).contiguous()
        for key, value in model.state_dict().items()
    }
    if source is not None:
        for key, value in source.extra.items():
            state.setdefault(key, value.detach().to("cpu", copy=True).contiguous())
    return state


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    formats: Sequence[str],
    source: ModelSource | None = None,
) -> list[Path]:
    """Writes ``model`` into ``out`` in each of ``formats`` (module docstring).

    Args:
        model: the fine-tuned model (the starting model's class and keys).
        out: the output folder (created if missing).
        formats: names from :data:`EXPORT_FORMATS`.
        source: where the starting weights came from (for the key layout and, for ``hf``,
            the processor settings); None: the model's own keys.

    Returns:
        The paths written, in the order of ``formats``.
    """
    formats = check_export_formats(list(formats), source.kind if source is not None else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "safetensors" in formats or "state_dict" in formats:
        state = original_state_dict(model, source)
    for name in formats:
        path = out / EXPORT_FILES[name]
        if name == "safetensors":
            from safetensors.torch import save

            metadata = {"format": "pt", "written_by": "selmix"}
            if source is not None and source.architecture:
                metadata["selmix_model"] = source.architecture
            atomic_write_bytes(path, save(state, metadata=metadata))
        elif name == "state_dict":
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_write_bytes(path, buffer.getbuffer())
        else:
            _save_pretrained(model, path, source)
        written.append(path)
    return written


def _save_pretrained(model: nn.Module, folder: Path, source: ModelSource | None) -> None:
    save_pretrained = getattr(model, "save_pretrained", None)
    if not callable(save_pretrained):
        raise TypeError(
            f"`export` hf needs a Hugging Face model, got a {type(model).__name__} (it has no "
            "save_pretrained)"
        )
    # written next to the target and renamed, so a failure leaves no half folder behind
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with quiet_transformers():
        save_pretrained(str(partial))
    if source is not None and source.kind == "hf":
        for name in _PROCESSOR_FILES:
            original = Path(source.path) / name
            if original.is_file():
                shutil.copyfile(original, partial / name)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
