"""Starting models from the files users keep: state dicts, safetensors, Lightning, Hugging Face.

:func:`load_start_model` turns what ``selmix finetune --checkpoint FILE [--model NAME]``
names into a model:

* a selmix model file (``model.pt`` of ``selmix pretrain``/``finetune``), rebuilt from the
  registry (:func:`selmix.load_model`);
* a state dict (``.pt``/``.pth`` read with ``weights_only=True``, or ``.safetensors``) with
  ``model=NAME``: a registry name, ``torchvision:NAME`` or ``timm:NAME``;
* a Lightning checkpoint (``.ckpt``) with ``model=NAME``: its ``state_dict``, whose keys
  carry the LightningModule's attribute (``model.``), found when only one prefix fits or
  given as ``ckpt_prefix``;
* ``hf:DIR``, a Hugging Face image classifier saved with ``save_pretrained``, read offline.

The class count comes from the caller's data (``num_classes``) and must agree with the
head's shape in the file; without ``num_classes`` it is read from that shape. Every error is
one line naming the file: the first key or shape that does not match, both shapes, a class
count that disagrees with the data, an optional package that is missing.

:class:`ModelSource` records where the weights came from (the key prefix and the file's
entries that are not the model's), so :mod:`selmix.models.export` writes the fine-tuned model back
in the same layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from selmix.models.checkpoint import load_checkpoint, load_model
from selmix.models.registry import create_model
from selmix.models.split import split_model

__all__ = [
    "HF_PREFIX",
    "LoadedModel",
    "ModelSource",
    "build_architecture",
    "checkpoint_digest",
    "check_finite_weights",
    "class_name_difference",
    "load_hf_classifier",
    "load_start_model",
    "load_state_dict_model",
    "match_state_dict",
    "read_state_dict",
    "strip_prefix",
]

HF_PREFIX = "hf:"
TORCHVISION_PREFIX = "torchvision:"
#: file suffixes read as safetensors; every other file is read with torch.load(weights_only)
SAFETENSORS_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ModelSource:
    """Where a starting model's weights came from.

    Attributes:
        kind: ``"selmix"`` (a selmix model file), ``"state_dict"`` (a state dict, safetensors
            or Lightning file loaded into ``architecture``) or ``"hf"`` (a Hugging Face
            ``save_pretrained`` folder).
        path: the file or folder.
        architecture: the ``model`` name the weights were loaded into (None for ``"hf"``).
        prefix: the prefix the file's keys carry before the model's own (``"model."`` for a
            LightningModule holding the network as ``self.model``; ``""`` for none).
        extra: the file's state-dict entries outside ``prefix`` (a LightningModule's loss
            weights...), written back unchanged on export.
    """

    kind: str
    path: str
    architecture: str | None = None
    prefix: str = ""
    extra: dict[str, Tensor] = field(default_factory=dict)


class LoadedModel(NamedTuple):
    """What :func:`load_start_model` returns; unpacks as ``model, meta, source``."""

    model: nn.Module
    meta: dict[str, Any]
    source: ModelSource


def _require(package: str, extra: str, what: str) -> Any:

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(
            f"{what} needs the optional package {package!r}: pip install 'selmix[{extra}]' "
            f"(or pip install {package})"
        ) from None


def _shape(tensor: Tensor) -> list[int]:
    return list(tensor.shape)


# -- reading a state dict -----------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of a weights file, and the selmix metadata it carries.

    ``.safetensors`` files are read with :func:`safetensors.torch.load_file`; every other
    file with ``torch.load(weights_only=True)`` (no code runs from the file). A torch file
    may hold the state dict itself, a selmix model file (its ``state_dict`` and ``meta``) or
    a dict with a ``state_dict`` entry (a Lightning ``.ckpt``).

    Args:
        path: the file.

    Returns:
        ``(state, meta)``: parameter name -> tensor, and the selmix model file's ``meta``
        (empty for other files).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is unreadable or holds no state dict (one line naming it).
    """

    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"`checkpoint` {str(path)!r} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), {}
        except (SafetensorError, OSError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"`checkpoint` {str(path)!r} is not a readable safetensors file: {first}"
            ) from None
    state = load_checkpoint(path)
    meta: dict[str, Any] = {}
    if state.get("format") == "selmix-model-v1" and isinstance(state.get("meta"), dict):
        meta = state["meta"]
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors or not state:
        shown = ", ".join(repr(key) for key in list(state)[:5])
        raise ValueError(
            f"`checkpoint` {str(path)!r} holds no state dict (parameter name -> tensor, or "
            f"a dict with a 'state_dict' entry); its keys: {shown or 'none'}"
        )
    return {str(key): value for key, value in state.items()}, meta


def strip_prefix(
    state: dict[str, Tensor],
    expected: list[str],
    ckpt_prefix: str | None = None,
    path: str | os.PathLike = "",
) -> tuple[dict[str, Tensor], str, dict[str, Tensor]]:
    """Removes the prefix the file's keys carry before the model's own.

    With ``ckpt_prefix`` given, the entries whose keys start with it are the model's. Without
    it, the prefix is found: ``""`` when the file's keys are the model's, else the one dotted
    prefix (``"model."``, ``"module."``, ``"net.backbone."``...) under which the keys are
    exactly the model's. When no prefix fits, ``""`` is returned and
    :func:`match_state_dict` reports the first mismatching key.

    Args:
        state: the file's state dict.
        expected: the model's state-dict keys.
        ckpt_prefix: the prefix, if known.
        path: the file, for messages.

    Returns:
        ``(model_state, prefix, extra)``: the entries under the prefix with it removed, the
        prefix, and the file's other entries.

    Raises:
        ValueError: ``ckpt_prefix`` matches no key, or several prefixes fit (the message
            names them and says to pass ``ckpt_prefix``).
    """
    if ckpt_prefix is not None:
        if not isinstance(ckpt_prefix, str):
            raise TypeError(f"`ckpt_prefix` must be a str, got {type(ckpt_prefix).__name__}")
        inside = {k[len(ckpt_prefix) :]: v for k, v in state.items() if k.startswith(ckpt_prefix)}
        if inside and not ckpt_prefix.endswith(".") and all(k.startswith(".") for k in inside):
            # 'model' for 'model.': the keys it leaves start with the dot
            raise ValueError(
                f"`ckpt_prefix` {ckpt_prefix!r} leaves keys that start with a dot (e.g. "
                f"{next(iter(inside))!r}) in `checkpoint` {str(path)!r}: the prefix ends with "
                f"its dot, --set ckpt_prefix={ckpt_prefix}."
            )
        if not inside:
            starts = sorted({key.split(".")[0] + "." for key in state})[:5]
            raise ValueError(
                f"`ckpt_prefix` {ckpt_prefix!r} matches no key of `checkpoint` {str(path)!r} "
                f"(its keys start with {', '.join(repr(s) for s in starts)})"
            )
        extra = {k: v for k, v in state.items() if not k.startswith(ckpt_prefix)}
        return inside, ckpt_prefix, extra
    wanted = set(expected)
    if set(state) == wanted:
        return dict(state), "", {}
    candidates = sorted(
        {".".join(key.split(".")[:depth]) + "." for key in state for depth in range(1, 4)}
    )
    fits = [
        prefix
        for prefix in candidates
        if {k[len(prefix) :] for k in state if k.startswith(prefix)} == wanted
    ]
    if len(fits) > 1:
        raise ValueError(
            f"`checkpoint` {str(path)!r} holds the model's weights under several prefixes "
            f"({', '.join(repr(p) for p in fits)}); choose one with `ckpt_prefix`, e.g. "
            f"--set ckpt_prefix={fits[0]}"
        )
    if not fits:
        return dict(state), "", {}
    prefix = fits[0]
    inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return inside, prefix, {k: v for k, v in state.items() if not k.startswith(prefix)}


def match_state_dict(
    model: nn.Module,
    state: dict[str, Tensor],
    name: str,
    path: str | os.PathLike = "",
    ckpt_prefix: str | None = None,
) -> None:
    """Checks that ``state`` has exactly the model's keys and shapes (``ckpt_prefix``: the
    prefix the user gave, named instead of the advice to give one).

    Raises:
        ValueError: one line naming the first key that is missing, extra or of another shape
            (with both shapes).
    """
    where = f"`checkpoint` {str(path)!r}"
    own = model.state_dict()
    # no key in common: the file's keys most likely carry a prefix the search did not find
    hint = "; if its keys carry a prefix, set `ckpt_prefix`" if not set(own) & set(state) else ""
    if hint and ckpt_prefix is not None:
        left = next(iter(state), None)
        hint = f"; `ckpt_prefix` {ckpt_prefix!r} leaves keys such as {left!r}: check it"
    for key, tensor in own.items():
        if key not in state:
            raise ValueError(
                f"{where} does not match model {name!r}: it lacks the key {key!r} (shape "
                f"{_shape(tensor)} in the model){hint}"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{where} does not match model {name!r}: {key!r} has shape "
                f"{_shape(state[key])} in the file but {_shape(tensor)} in the model"
            )
    for key in state:
        if key not in own:
            raise ValueError(
                f"{where} does not match model {name!r}: the file has the key {key!r} "
                f"(shape {_shape(state[key])}), which the model does not"
            )


# -- building the architecture ------------------------------------------------------------------
def build_architecture(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A randomly initialised model named as ``--model`` names it.

    Args:
        name: a registry name (:func:`selmix.list_models`), ``timm:NAME`` or
            ``torchvision:NAME`` (any ``torchvision.models.get_model`` name).
        num_classes: K.
        in_channels: channels of the data's images (torchvision models take 3).

    Returns:
        The model, carrying ``selmix_spec`` so that :func:`selmix.save_model` /
        :func:`selmix.load_model` round-trip it.
    """

    if not isinstance(name, str) or not name:
        raise ValueError(f"`model` must be a model name, got {name!r}")
    return create_model(name, num_classes, in_channels=in_channels)


def _head_key(model: nn.Module) -> str | None:
    """The state-dict key of the model's head weight (``fc.weight``), or None."""

    try:
        _, head = split_model(model)
    except (TypeError, ValueError):
        return None
    for module_name, module in model.named_modules():
        if module is head and module_name:
            return f"{module_name}.weight"
    return None


def _classes_in_file(
    name: str, state: dict[str, Tensor], in_channels: int, ckpt_prefix: str | None, path: Path
) -> int:
    """K read from the head's shape in the file, for a call without ``num_classes``."""
    probe = build_architecture(name, 2, in_channels)
    key = _head_key(probe)
    inside, _, _ = strip_prefix(state, list(probe.state_dict()), ckpt_prefix, path)
    if key is None or key not in inside:
        raise ValueError(
            f"the class count of `checkpoint` {str(path)!r} cannot be read from its head "
            f"(no key {key!r}); pass `num_classes`"
        )
    return int(inside[key].shape[0])


def load_state_dict_model(
    path: str | os.PathLike,
    name: str,
    num_classes: int | None = None,
    in_channels: int = 3,
    ckpt_prefix: str | None = None,
) -> LoadedModel:
    """Loads a state dict, safetensors or Lightning file into the architecture ``name``.

    Args:
        path: the weights file.
        name: the architecture (see :func:`build_architecture`).
        num_classes: K of the data; None: read from the head's shape in the file.
        in_channels: channels of the data's images.
        ckpt_prefix: the prefix of the model's keys in the file (None: found).

    Raises:
        ValueError: the head is for another class count, or the first mismatching key.
    """
    path = Path(path)
    state, meta = read_state_dict(path)
    if name.startswith(TORCHVISION_PREFIX) and in_channels != 3:
        raise ValueError(
            f"`model` {name!r} takes 3-channel images but the data has {in_channels} channel(s)"
        )
    if num_classes is None:
        num_classes = _classes_in_file(name, state, in_channels, ckpt_prefix, path)
    model = build_architecture(name, num_classes, in_channels)
    inside, prefix, extra = strip_prefix(state, list(model.state_dict()), ckpt_prefix, path)
    head_key = _head_key(model)
    if head_key is not None and head_key in inside:
        in_file = int(inside[head_key].shape[0])
        if in_file != num_classes:
            raise ValueError(
                f"`checkpoint` {str(path)!r} is for {in_file} classes (its head "
                f"{prefix + head_key!r} has shape {_shape(inside[head_key])}) but the data has "
                f"{num_classes}"
            )
    match_state_dict(model, inside, name, path, ckpt_prefix)
    model.load_state_dict(inside)
    source = ModelSource("state_dict", str(path), name, prefix, extra)
    return LoadedModel(model, dict(meta), source)


def load_hf_classifier(
    directory: str | os.PathLike, num_classes: int | None = None, in_channels: int | None = None
) -> LoadedModel:
    """A Hugging Face image classifier from a ``save_pretrained`` folder, read offline.

    Raises:
        ImportError: transformers is not installed (naming the extra).
        FileNotFoundError: no such folder.
        ValueError: the folder holds no image classifier, or one for another class count or
            channel count than the data's.
    """
    directory = Path(directory)
    where = f"`checkpoint` {HF_PREFIX}{directory}"
    if not directory.is_dir():
        raise FileNotFoundError(f"{where}: no such folder")
    transformers = _require("transformers", "transformers", f"{where}")
    if not (directory / "config.json").is_file():
        raise ValueError(f"{where} is not a save_pretrained folder (it has no config.json)")
    # the configuration first: a folder for another class count fails before its weights load
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{where} holds no readable config.json: {first}") from None
    _check_image_classifier(transformers, config, where)
    labels = int(config.num_labels)
    if num_classes is not None and labels != num_classes:
        raise ValueError(f"{where} is for {labels} classes but the data has {num_classes}")
    channels = getattr(config, "num_channels", None)
    if in_channels is not None and channels is not None and int(channels) != in_channels:
        raise ValueError(f"{where} is for {channels}-channel images but the data has {in_channels}")
    try:
        with quiet_transformers():
            model = transformers.AutoModelForImageClassification.from_pretrained(
                str(directory), config=config, local_files_only=True
            )
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{where} holds no loadable image classifier: {first}") from None
    # what selmix.save_model needs to rebuild it (registry entry hf_auto)
    spec = {
        "name": "hf_auto", "num_classes": labels,
        "in_channels": int(channels) if channels is not None else (in_channels or 3),
        "kwargs": {"config": config.to_dict()},
    }  # fmt: skip
    setattr(model, "selmix_spec", spec)  # noqa: B010 - nn.Module's setattr is typed for modules
    meta: dict[str, Any] = {}
    names = [str(config.id2label.get(k, "")) for k in range(labels)] if config.id2label else []
    if names and names != [f"LABEL_{k}" for k in range(labels)]:
        meta["classes"] = names
    model.eval()
    return LoadedModel(model, meta, ModelSource("hf", str(directory)))


def _check_image_classifier(transformers: Any, config: Any, where: str) -> None:
    """Refuses a folder whose model type has no image-classification class (a BertModel:
    its default two labels would otherwise read as "for 2 classes")."""
    names = getattr(
        getattr(getattr(transformers, "models", None), "auto", None), "modeling_auto", None
    )
    known = getattr(names, "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", None)
    if known is None or config.model_type in known:
        return
    saved = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
    raise ValueError(
        f"{where} holds a {saved} (model type {config.model_type!r}), which is not an image "
        "classifier; selmix fine-tunes image classifiers (e.g. ViTForImageClassification)"
    )


def check_finite_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Refuses starting weights holding NaN or inf, which would spoil every step silently.

    Raises:
        ValueError: one line naming the first such parameter or buffer.
    """
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"`checkpoint` {str(checkpoint)!r} has {bad} non-finite value(s) (NaN or inf) "
                f"in {name!r}: start from a model with finite weights"
            )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hides transformers' progress bars (loading, writing shards) inside the block: selmix
    reports its own progress, and a bar would break its one-line messages."""
    import transformers

    hf_logging = transformers.utils.logging
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_start_model(
    checkpoint: str | os.PathLike,
    model: str | None = None,
    *,
    num_classes: int | None = None,
    in_channels: int = 3,
    ckpt_prefix: str | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The model ``--checkpoint`` and ``--model`` name (module docstring).

    Args:
        checkpoint: a file, or ``hf:DIR``.
        model: the architecture for a state dict, safetensors or Lightning file; None for a
            selmix model file or ``hf:DIR``.
        num_classes: K of the data (checked against the file); None: from the file.
        in_channels: channels of the data's images.
        ckpt_prefix: the prefix of the model's keys in the file (None: found).
        device: where to put the model.

    Returns:
        ``LoadedModel(model, meta, source)``; ``meta`` holds the class names when the file
        has them.

    Raises:
        FileNotFoundError, ImportError, ValueError: one line each (module docstring).
    """

    text = str(checkpoint)
    if not text.startswith(HF_PREFIX) and Path(text).is_dir():
        if (Path(text) / "config.json").is_file():
            raise ValueError(
                f"`checkpoint` {text!r} is a folder; for a Hugging Face save_pretrained "
                f"folder write it as hf:{text}"
            )
        raise ValueError(f"`checkpoint` {text!r} is a folder, not a model file")
    loaded = _load_start_model(text, model, num_classes, in_channels, ckpt_prefix, device)
    check_finite_weights(loaded.model, text)
    return loaded


def _load_start_model(
    text: str,
    model: str | None,
    num_classes: int | None,
    in_channels: int,
    ckpt_prefix: str | None,
    device: str | torch.device,
) -> LoadedModel:

    if text.startswith(HF_PREFIX):
        if model is not None:
            raise ValueError(
                f"`model` must not be given with `checkpoint` {text!r}: the folder's "
                f"config.json names the architecture (got model {model!r})"
            )
        loaded = load_hf_classifier(text[len(HF_PREFIX) :], num_classes, in_channels)
        return LoadedModel(loaded.model.to(device), loaded.meta, loaded.source)
    if model is None:
        path = Path(text)
        if path.is_file() and path.suffix not in SAFETENSORS_SUFFIXES:
            state = load_checkpoint(path)
            if state.get("format") != "selmix-model-v1":
                raise ValueError(
                    f"`checkpoint` {text!r} is not a selmix model file (no format "
                    "'selmix-model-v1'); for a state dict, safetensors or Lightning file, name "
                    "its architecture with `model` (a registry name, torchvision:NAME or "
                    "timm:NAME); a resume checkpoint goes to `resume`"
                )
        elif path.suffix in SAFETENSORS_SUFFIXES:
            raise ValueError(
                f"`checkpoint` {text!r} is a safetensors file: name its architecture with "
                "`model` (a registry name, torchvision:NAME or timm:NAME)"
            )
        built, meta = load_model(text, device, num_classes=num_classes)
        return LoadedModel(built, meta, ModelSource("selmix", text))
    loaded = load_state_dict_model(text, model, num_classes, in_channels, ckpt_prefix)
    return LoadedModel(loaded.model.to(device), loaded.meta, loaded.source)


def class_name_difference(saved: Sequence[Any], data: Sequence[Any]) -> str:
    """The warning for a model whose class names are not the data's, naming those that differ.

    Args:
        saved: the class names the model file holds.
        data: the data's class names.
    """
    saved, data = [str(name) for name in saved], [str(name) for name in data]
    pairs = [
        f"{k}: {a!r} vs {b!r}" for k, (a, b) in enumerate(zip(saved, data, strict=False)) if a != b
    ]
    shown = "; ".join(pairs[:5]) + (f"; and {len(pairs) - 5} more" if len(pairs) > 5 else "")
    counts = f"{len(saved)} in the checkpoint, {len(data)} in the data"
    if not pairs:  # one list extends the other
        return f"the checkpoint's class names differ from the data's ({counts})"
    return (
        "the checkpoint's class names differ from the data's (class: checkpoint vs data) "
        f"at {shown}" + ("" if len(saved) == len(data) else f" ({counts})")
    )


def checkpoint_digest(checkpoint: str | os.PathLike) -> str:
    """The resolved path and a content digest of a file or ``hf:DIR`` (every file in it),
    so a resumed run can check that it starts from the same weights."""
    text = str(checkpoint)
    folder = text.startswith(HF_PREFIX)
    path = Path(text[len(HF_PREFIX) :] if folder else text).expanduser().resolve()
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if folder else [path]
    for file in files:
        if folder:
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    shown = f"{HF_PREFIX}{path}" if folder else str(path)
    return f"{shown} (sha256 {digest.hexdigest()[:16]})"
