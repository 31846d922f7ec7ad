"""The settings of the commands: :class:`Option` (one key, its default, help and flag),
the options generated from a configuration class's fields, and the options that several
commands share (the data source, the seed and the device)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PROG = "selmix"


EXIT_USAGE = 2


#: Keys whose values name files or folders (never coerced to numbers).
_PATH_KEYS = {
    "data", "out", "checkpoint", "resume", "cache_dir", "config", "tensorboard", "ckpt_prefix",
}  # fmt: skip


class UsageError(ValueError):
    """A mistake in the command line or configuration (reported as one line, exit 2)."""


@dataclass(frozen=True)
class Option:
    """One setting of a command: its key, default, help and (optional) flag.

    Settings without a flag are reachable through ``--set`` and ``--config`` only.
    """

    key: str
    default: Any
    help: str
    flag: bool = True
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    required: bool = False
    field: str | None = None  # the config field it fills (None: a command-level setting)


def _config_options(config_class: type, **adjust: dict[str, Any]) -> list[Option]:
    """The options of a configuration class, generated from its fields' metadata
    (:func:`selmix._config.settings_of`); ``adjust`` changes a field's metadata by name
    (for classes whose fields carry none)."""
    import dataclasses

    from selmix._config import scalar_type, settings_of

    options = []
    for item in settings_of(config_class):
        if item.name in adjust:
            item = dataclasses.replace(item, **adjust[item.name])
        if not item.cli:
            continue
        kind = scalar_type(item.type)
        options.append(
            Option(
                item.key, copy.deepcopy(item.shown_default), item.help, flag=item.flag,
                type=kind if kind in (int, float) else None, choices=item.choices,
                metavar=item.metavar, field=item.name,
            )
        )  # fmt: skip
    return options


def _config_from(config_class: Any, settings: dict[str, Any], options: list[Option]) -> Any:
    """The configuration the settings give (validated by the class)."""
    return config_class.from_dict(
        {option.field: settings[option.key] for option in options if option.field}
    )


_STREAM_CHOICES = ("auto", "memory", "disk")


_STREAM_ARGUMENT = {"auto": None, "memory": False, "disk": True}


def _data_options(required: bool = True) -> list[Option]:
    options = [
        Option(
            "data", None, "data source: fashion-mnist:DIR, cifar10:DIR, cifar100:DIR, "
            "stl10:DIR, imagenet-lt:DIR, imagefolder:DIR, features:FILE or demo "
            "(imagefolder: DIR/train/<class>/..., optional DIR/val/, and DIR/test/; "
            "features: pre-computed embeddings with their labels)",
            metavar="SPEC", required=required,
        ),
    ] if required else []  # fmt: skip
    return options + [
        Option(
            "imbalance", None, "make the training split long-tailed with this ratio rho "
            "(largest / smallest class); unset: keep the source's class counts",
            type=float, metavar="RHO",
        ),
        Option(
            "max_per_class", None, "training images of the largest class (N_1) when "
            "--imbalance is set; unset: as many as the source has",
            type=int, metavar="N",
        ),
        Option(
            "val_per_class", None, "size per class of the balanced validation split carved "
            "from the training images; unset: the data source's default (500 for "
            "fashion-mnist and cifar10; for an image folder, features file or ImageNet-LT "
            "list without a validation split, half the smallest class, at most 50, refused "
            "below 5)",
            type=int, metavar="N",
        ),
        Option(
            "cache_dir", None, "folder for decoded-data caches (e.g. the CIFAR-10 archive); "
            "unset: the data source's default", metavar="DIR",
        ),
        Option(
            "stream", "auto", "imagefolder trees: decode every image into memory ('memory'), "
            "decode each batch from disk in worker processes ('disk'), or choose by the "
            "estimated decoded size against available memory ('auto')",
            choices=_STREAM_CHOICES, metavar="auto|memory|disk",
        ),
        Option(
            "num_workers", None, "worker processes that decode streamed images; 0: the main "
            "process; unset: min(4, cores - 1)", type=int, metavar="N",
        ),
        Option(
            "image_size", None, "imagefolder trees: resize every image to N x N (trees of "
            "mixed sizes need it; in a YAML config also [H, W]); unset: the images' own "
            "size, or for finetune the starting model's input size when it records one",
            type=int, metavar="N",
        ),
    ]  # fmt: skip


def _start_model_options() -> list[Option]:
    """--model and ckpt_prefix: a starting model from a state dict, safetensors, Lightning
    or Hugging Face file (selmix.models.loading), and whose preprocessing the data get."""
    from selmix.models.preprocessing import PREPROCESSING_CHOICES

    return [
        Option("model", None, "architecture of a --checkpoint state dict (.pt/.pth), "
               ".safetensors or Lightning .ckpt: a registry name, torchvision:NAME or "
               "timm:NAME; unset: --checkpoint is a selmix model file or hf:DIR",
               metavar="NAME"),
        Option("ckpt_prefix", None, "prefix of the model's keys in --checkpoint (e.g. "
               "'model.' for a LightningModule's self.model); unset: found when only one fits",
               flag=False),
        Option("preprocessing", "auto", "input size and normalisation: 'model' (the starting "
               "model's: a timm config.json with pretrained_cfg beside the weights, a Hugging "
               "Face preprocessor_config.json, torchvision weights by their download name, a "
               "model.pt of finetune, else timm's or torchvision's defaults for --model), "
               "'data' (the training images' mean and std), 'auto' (the model's when its "
               "files record it, else the data's)", choices=PREPROCESSING_CHOICES,
               metavar="auto|model|data"),
    ]  # fmt: skip


def _common_options(device: str = "auto") -> list[Option]:
    from selmix.engine.evaluate import DEVICE_HELP

    return [
        Option("seed", 0, "random seed (model initialisation, data split, sampling)", type=int),
        Option("device", device, f"where to run: {DEVICE_HELP}", metavar="DEVICE"),
    ]


def _overwrite_option(what: str = "run") -> Option:
    """``--overwrite``: the one switch that lets a command replace an earlier run in --out."""
    return Option(
        "overwrite", False, f"replace an earlier run in --out (when this {what} ends; until "
        "then the earlier run stays as it was)",
    )  # fmt: skip


def _settings_to_save(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a run's config.yaml records: all but ``overwrite``, which says how the
    run was written, not what it is (a rerun of the saved config must not replace it)."""
    return {key: value for key, value in settings.items() if key != "overwrite"}


def _one_line(error: BaseException | str) -> str:
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())
