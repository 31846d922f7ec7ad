"""What the commands' runs share: loading the data and the starting model, the head
classes, the files a run writes (into a staging folder moved into ``--out`` when the run is
complete: :mod:`selmix.cli.staging`), and the interruption that names what to do next."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selmix.cli.options import _STREAM_ARGUMENT, PROG, UsageError, _one_line

if TYPE_CHECKING:
    from selmix.models.loading import LoadedModel


def _load_data(settings: dict[str, Any], preprocessing: Any = None) -> Any:
    """The data splits; ``preprocessing`` (:class:`selmix.models.preprocessing.Preprocessing`), when
    given, sets the image size and the normalisation instead of ``image_size`` and the
    data's statistics."""
    from selmix.data import load_data

    spec = settings.get("data")
    if not isinstance(spec, str) or not spec:
        raise UsageError(
            f"`data` must be a data source string such as imagefolder:DIR, got {spec!r}"
        )
    kwargs = {"seed": settings["seed"]}
    for key in ("imbalance", "max_per_class", "val_per_class", "cache_dir", "num_workers"):
        if settings.get(key) is not None:
            kwargs[key] = settings[key]
    stream = _STREAM_ARGUMENT[settings.get("stream") or "auto"]
    if stream is not None:
        kwargs["stream"] = stream
    size = settings.get("image_size")
    if preprocessing is not None:
        size = preprocessing.image_size
        if preprocessing.from_model:
            kwargs["normalization"] = (preprocessing.mean, preprocessing.std)
    if size is not None:
        kwargs["image_size"] = tuple(size) if isinstance(size, list) else size
        if preprocessing is not None and preprocessing.resize != "bilinear":
            kwargs["interpolation"] = preprocessing.resize
    return load_data(spec, **kwargs)


def _num_classes(splits: Any) -> int:
    return int(getattr(splits.train, "num_classes", None) or len(splits.classes))


def _in_channels(dataset: Any) -> int:
    images = getattr(dataset, "images", None)
    if images is not None:
        return int(images.shape[1])
    return int(dataset[0][0].shape[0])


def _flag(settings: dict[str, Any], key: str) -> bool:
    from selmix._validation import check_bool

    return check_bool(key, settings[key])


def _check_early(settings: dict[str, Any]) -> None:
    """The checks of command-level settings that need no data (seed, head classes)."""
    from selmix._validation import check_head_classes, check_seed

    check_seed("seed", settings["seed"])
    if settings.get("head_classes") is not None:
        check_head_classes(settings["head_classes"], None)


def _head_classes(settings: dict[str, Any], splits: Any) -> list[int] | None:
    """The configured head classes (checked against the data's K), or the 90% most
    frequent training classes."""
    from selmix._validation import check_head_classes
    from selmix.core.metrics import infer_head_classes

    num_classes = _num_classes(splits)
    if settings.get("head_classes") is not None:
        return check_head_classes(settings["head_classes"], num_classes)
    if num_classes < 2:
        return None
    return infer_head_classes(splits.train.labels, num_classes)


def _model_meta(splits: Any, settings: dict[str, Any], command: str) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        return list(value) if isinstance(value, tuple) else value

    return {
        "classes": list(splits.classes) if splits.classes is not None else None,
        "mean": plain(getattr(splits.train, "mean", None)),
        "std": plain(getattr(splits.train, "std", None)),
        "command": command,
        "settings": {k: v for k, v in settings.items() if k != "progress"},
    }


def _load_start_model(settings: dict[str, Any], splits: Any) -> LoadedModel:
    """The starting model, its meta and where it came from."""
    from selmix.engine.evaluate import resolve_device
    from selmix.models.loading import class_name_difference, load_start_model

    device = resolve_device(settings["device"])
    loaded = load_start_model(
        settings["checkpoint"], settings.get("model"), num_classes=_num_classes(splits),
        in_channels=_in_channels(splits.train), ckpt_prefix=settings.get("ckpt_prefix"),
        device=device,
    )  # fmt: skip
    spec = getattr(loaded.model, "selmix_spec", None) or {}
    channels = _in_channels(splits.train)
    if spec.get("in_channels") not in (None, channels):
        raise UsageError(
            f"`checkpoint` {settings['checkpoint']!r} is for {spec['in_channels']}-channel "
            f"images but the data has {channels} channels"
        )
    meta = loaded.meta
    saved = meta.get("classes") if isinstance(meta, dict) else None
    if saved and splits.classes is not None and list(saved) != list(splits.classes):
        print(f"{PROG}: warning: {class_name_difference(saved, splits.classes)}", file=sys.stderr)
    return loaded


def _check_split_labels(splits: Any) -> None:
    """The training and validation labels against the data's K, a class missing from the
    validation set named by its name and with what to change (``val/`` or ``val_per_class``)."""
    import torch

    from selmix._validation import check_labels
    from selmix.devices import to_host

    num_classes = _num_classes(splits)
    check_labels("train", splits.train.labels, num_classes)
    check_labels("val", splits.val.labels, num_classes)
    for name, dataset, fix in (
        ("train", splits.train, "`val_per_class` (--val-per-class) took all of their "
         "images; lower it"),
        ("val", splits.val, "add images of them to the val/ folder, or remove val/ and carve "
         "the validation set from train/ with --val-per-class"),
    ):  # fmt: skip
        present = torch.bincount(to_host(torch.as_tensor(dataset.labels)).long(),
                                 minlength=num_classes)  # fmt: skip
        missing = (present == 0).nonzero().flatten().tolist()
        if missing:
            names = [repr(splits.classes[k]) for k in missing] if splits.classes else missing
            raise ValueError(
                f"`{name}` has no samples of class(es) {missing} (named "
                f"{', '.join(map(str, names))}): {fix}"
            )


def _check_model_takes_data(model: Any, dataset: Any, checkpoint: str) -> None:
    """Runs the starting model on two training images, so that a model built for other
    inputs (a Hugging Face ViT for 64x64 images given 32x32 ones) is one line naming both
    sizes before ``--out`` is touched, not the library's error in the middle of the run."""
    import torch


    inputs, _ = dataset.batch(list(range(min(2, len(dataset)))))
    parameter = next(iter(model.parameters()), None)
    if parameter is not None:
        inputs = inputs.to(parameter.device)
    training = model.training
    model.eval()  # batch norm takes the two images without changing its statistics
    try:
        with torch.no_grad():
            model(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        shape = "x".join(str(size) for size in inputs.shape[1:])
        built = getattr(getattr(model, "config", None), "image_size", None)
        made_for = (
            f"; it is built for {built}x{built} images (--image-size {built} resizes them)"
            if isinstance(built, int) else ""
        )  # fmt: skip
        raise UsageError(
            f"`checkpoint` {checkpoint!r} cannot take the data's {shape} inputs{made_for}: "
            f"{_one_line(error)[:200]}"
        ) from None
    finally:
        model.train(training)


def _write_json(path: Path, data: Any) -> None:
    from selmix._io import write_json

    write_json(path, data)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    from selmix._io import write_yaml

    write_yaml(path, data)


def _note_resolved(path: Path, config: Any) -> None:
    """Appends to a run's config.yaml, as comments, what its unset or ``auto`` hardware
    settings resolved to (comments: the file stays a valid ``--config`` for another
    machine, where ``auto`` measures again)."""
    from selmix._io import atomic_write_text

    lines = [f"# resolved on this machine: {key}: {getattr(config, key)!r}"
             for key in ("precision", "channels_last", "eval_batch_size")]  # fmt: skip
    atomic_write_text(path, path.read_text() + "\n".join(lines) + "\n")


#: The files a run writes to ``--out``; a finished run replaces them all
#: (:mod:`selmix.cli.staging`).
RUN_FILES = (
    "model.pt", "metrics.json", "config.yaml", "log.jsonl", "finetune_state.pt", "details.json",
    "timings.json", "pretrain_state.pt", "model.safetensors", "model_state_dict.pt",
)  # fmt: skip


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what to do next (the message :func:`main` prints)."""


# the arguments of the command being run (for the resume hint)
_ARGV: list[str] = []
