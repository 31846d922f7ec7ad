"""The ``selmix`` command: ``pretrain``, ``finetune``, ``baseline``, ``evaluate`` and ``demo``.

A thin layer over the library: argparse and a YAML configuration in, library calls, files
and a metrics table out. Every setting of a command has one key (``steps``, ``lr_head``...)
that can come from four places, later ones winning::

    built-in defaults  <  --config FILE.yaml  <  explicit flags  <  --set key=value

User errors (a missing folder, an unknown model, objective or policy, a checkpoint for
another class count, a bad setting, a corrupt file, a batch too large for the memory) end
with one line on stderr and exit status 2, never a traceback. Set ``SELMIX_DEBUG=1`` to see
the traceback instead.

The output folder (``--out``) holds one run. Everything is checked first (the settings,
the data, the starting model and, with ``--resume``, that the checkpoint continues this
very run); a command that fails there leaves ``--out`` as it was, byte for byte. Only then
does a fresh run of ``pretrain``, ``finetune`` or ``baseline`` remove the previous run's
files from ``--out`` (``model.pt``, ``metrics.json``, ``config.yaml``, ``log.jsonl``,
``finetune_state.pt``, ``details.json``, ``timings.json``) and write its ``config.yaml``,
so a run that fails later leaves its own files only (a resumable ``finetune_state.pt``
and ``log.jsonl``), never a mix of two runs. ``model.pt`` and ``metrics.json`` are written
at the end; every file is written atomically (:mod:`selmix._io`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["main"]

PROG = "selmix"
EXIT_USAGE = 2

#: Keys whose values name files or folders (never coerced to numbers).
_PATH_KEYS = {"data", "out", "checkpoint", "resume", "cache_dir", "config", "tensorboard"}


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


def _config_from(config_class: type, settings: dict[str, Any], options: list[Option]) -> Any:
    """The configuration the settings give (validated by the class)."""
    return config_class.from_dict(
        {option.field: settings[option.key] for option in options if option.field}
    )


# -- the settings of each command ---------------------------------------------------------------
# --stream values and what selmix.data.load_data's `stream` takes for each
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
            "from the training images; unset: the data source's default",
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
    ]  # fmt: skip


def _common_options(device: str = "auto") -> list[Option]:
    from selmix.evaluate import DEVICE_HELP

    return [
        Option("seed", 0, "random seed (model initialisation, data split, sampling)", type=int),
        Option("device", device, f"where to run: {DEVICE_HELP}", metavar="DEVICE"),
    ]


def _pretrain_options() -> list[Option]:
    from selmix.pretrain import PretrainConfig

    return _data_options() + [
        Option("model", None, "registry model name (see the list below) or timm:NAME for any "
               "timm architecture (extra selmix[timm])", metavar="NAME", required=True),
        Option("out", None, "output folder (model.pt, metrics.json, config.yaml, "
               "pretrain_state.pt)", metavar="DIR", required=True),
        Option("resume", None, "resume from a pretrain_state.pt of an interrupted run with "
               "the same settings and data", metavar="FILE"),
        Option("model_kwargs", {}, "extra constructor arguments of the model", flag=False),
        Option("head_classes", None, "head classes for head/tail metrics; unset: the 90% "
               "most frequent training classes", flag=False),
    ] + _config_options(PretrainConfig)  # fmt: skip


def _finetune_options() -> list[Option]:
    from selmix.finetune import FinetuneConfig

    return _data_options() + [
        Option("checkpoint", None, "model file to start from (model.pt of `selmix pretrain`)",
               metavar="FILE", required=True),
        Option("out", None, "output folder (model.pt, log.jsonl, metrics.json, config.yaml)",
               metavar="DIR", required=True),
        Option("resume", None, "resume from a finetune_state.pt of an interrupted run with "
               "the same settings, data and starting checkpoint", metavar="FILE"),
    ] + _config_options(FinetuneConfig)  # fmt: skip


def _baseline_methods() -> list[str]:
    from selmix.baselines import list_baselines

    return [name for name in list_baselines() if name != "start"]


def _baseline_options() -> list[Option]:
    from selmix.baselines import BaselineConfig

    return _data_options() + [
        Option("checkpoint", None, "model file to start from (model.pt of `selmix pretrain`)",
               metavar="FILE", required=True),
        Option("out", None, "output folder (model.pt, metrics.json, config.yaml and, for "
               "posthoc_la, crt and mislas_stage2, details.json)", metavar="DIR",
               required=True),
        Option("method", None, "the baseline: posthoc_la (post-hoc logit adjustment, tau tuned "
               "on the validation set for --objective), crt (classifier re-training on the "
               "frozen backbone), mislas_stage2 (the model's head fine-tuned on the frozen "
               "backbone like crt, with label-aware smoothing) or la_finetune (fine-tuning "
               "with the logit-adjusted loss); the settings of the other methods are ignored "
               "(with a warning)",
               choices=_baseline_methods(), required=True),
    ] + _config_options(BaselineConfig)  # fmt: skip


def _evaluate_options() -> list[Option]:
    return _data_options() + [
        Option("checkpoint", None, "model file to evaluate", metavar="FILE", required=True),
        Option("out", None, "if set, write OUT/metrics.json (key `test`)", metavar="DIR"),
        Option("batch_size", 512, "evaluation batch size", type=int),
        Option("head_classes", None, "head classes for head/tail metrics; unset: the 90% "
               "most frequent training classes", flag=False),
    ] + _common_options()  # fmt: skip


def _demo_options() -> list[Option]:
    return (
        [
            Option("out", "selmix-demo", "output folder (report, metrics.json)", metavar="DIR"),
            Option("fast", False, "a smaller, quicker run (used by the tests)"),
            Option("progress", True, "show progress (plain lines when not a terminal)"),
            Option(
                "threads",
                None,
                "torch CPU threads; unset: OMP_NUM_THREADS if set, else the physical cores "
                "this process may use (1 is the fastest on a small, busy machine)",
                type=int,
                metavar="N",
            ),
        ]
        + _data_options(required=False)
        + _common_options(device="cpu")
    )


_COMMANDS: dict[str, tuple[str, Callable[[], list[Option]]]] = {
    "pretrain": ("pre-train a registry model on a data set", _pretrain_options),
    "finetune": ("fine-tune a model with SelMix for an objective", _finetune_options),
    "baseline": (
        "run a baseline SelMix is compared with (post-hoc logit adjustment, cRT, "
        "logit-adjusted fine-tuning) on a model",
        _baseline_options,
    ),
    "evaluate": ("print (and save) the test metrics of a model", _evaluate_options),
    "demo": ("pre-train and fine-tune on the packaged Fashion-MNIST-LT subset", _demo_options),
}


# -- argument parsing ---------------------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the epilog's line breaks."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _epilog(command: str, options: list[Option]) -> str:
    lines = ["settings (keys for --set KEY=VALUE and --config FILE.yaml, with defaults):"]
    for option in sorted(options, key=lambda option: not option.required):
        default = "required" if option.required else _yaml_inline(option.default)
        lines.append(f"  {option.key} = {default}")
    if command == "pretrain":
        from selmix.models import list_models

        lines.append("models: " + ", ".join(list_models()))
    if command in ("finetune", "baseline"):
        from selmix.objectives import list_objectives

        lines.append("objectives: " + ", ".join(list_objectives()))
    if any(option.field == "preset" for option in options):
        from selmix.finetune import PRESETS

        for name, values in PRESETS.items():
            shown = ", ".join(f"{key}={_yaml_inline(value)}" for key, value in values.items())
            lines.append(f"preset {name}: {shown or 'the defaults above'}")
        lines.append("precedence: defaults < preset < --config < explicit flags < --set")
    else:
        lines.append("precedence: defaults < --config < explicit flags < --set")
    return "\n".join(lines)


def _yaml_inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _build_parser(show_defaults: bool) -> _Parser:
    """The parser; without ``show_defaults`` only explicitly given options are set."""
    from selmix import __version__

    parser = _Parser(
        prog=PROG,
        description="SelMix: fine-tune a trained classifier for the metric you care about "
        "(min recall, G-mean, mean recall under coverage constraints...) on long-tailed data.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"selmix {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, (summary, make_options) in _COMMANDS.items():
        options = sorted(make_options(), key=lambda option: not option.required)
        sub = commands.add_parser(
            command, help=summary, description=summary, formatter_class=_Formatter,
            epilog=_epilog(command, options),
        )  # fmt: skip
        for option in options:
            if not option.flag:
                continue
            flag = "--" + option.key.replace("_", "-")
            kwargs: dict[str, Any] = {"dest": option.key, "help": option.help}
            if option.required:
                kwargs["help"] += " (required)"
            if option.required or not show_defaults:
                kwargs["default"] = argparse.SUPPRESS
            else:
                kwargs["default"] = option.default
            # a flag, or a flag that is measured unless given ("auto": channels_last)
            if isinstance(option.default, bool) or option.choices == ("auto", True, False):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = option.type
                kwargs["choices"] = option.choices
                kwargs["metavar"] = option.metavar
            sub.add_argument(flag, **kwargs)
        sub.add_argument(
            "--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
            help="YAML file of settings (a mapping of the keys below; a run's config.yaml works)",
        )  # fmt: skip
        sub.add_argument(
            "--set", dest="overrides", action="append", default=argparse.SUPPRESS,
            metavar="KEY=VALUE",
            help="override one setting (repeatable); VALUE is read as YAML, e.g. "
            "--set steps=500 --set objective_params='{rate: 20}'",
        )  # fmt: skip
    return parser


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Light YAML fix-ups: ``3e-3`` (a string in YAML 1.1) and ints where floats are due."""
    if isinstance(value, str) and key not in _PATH_KEYS and _FLOAT.match(value.strip()):
        if default is None or (isinstance(default, float) and not isinstance(default, bool)):
            return float(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_keys(keys: Sequence[str], options: dict[str, Option], where: str) -> None:
    for key in keys:
        if key not in options:
            valid = ", ".join(options)
            raise UsageError(f"unknown setting {key!r} in {where}; valid settings: {valid}")


def _load_config_file(path: str, options: dict[str, Option]) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"`--config` file {path!r} does not exist")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        first = str(error).strip().splitlines()[0]
        raise UsageError(f"`--config` file {path!r} is not valid YAML: {first}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(
            f"`--config` file {path!r} must hold a mapping of settings, got {type(values).__name__}"
        )
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    _check_keys(list(values), options, f"--config {path}")
    return values


def _parse_overrides(items: Sequence[str], options: dict[str, Option]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"`--set` expects KEY=VALUE, got {item!r}")
        _check_keys([key], options, "--set")
        try:
            values[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UsageError(f"`--set {key}` value {text!r} is not valid YAML") from None
    return values


def resolve_settings(command: str, argv: Sequence[str]) -> dict[str, Any]:
    """Parses ``argv`` for one command into its resolved settings (also used by tests).

    Args:
        command: the sub-command (already known from ``argv``).
        argv: the full argument list.

    Returns:
        Every setting of the command, with defaults < --config < flags < --set applied.
    """
    options = {option.key: option for option in _COMMANDS[command][1]()}
    explicit = vars(_build_parser(show_defaults=False).parse_args(argv))
    explicit.pop("command", None)
    config_path = explicit.pop("config", None)
    overrides = explicit.pop("overrides", None) or []

    given: dict[str, Any] = {}
    if config_path is not None:
        given.update(_load_config_file(config_path, options))
    given.update(explicit)
    given.update(_parse_overrides(overrides, options))
    values = {key: copy.deepcopy(option.default) for key, option in options.items()}
    values.update(_preset_values(options, given))  # under everything the user gave
    values.update(given)
    values = {key: _coerce(key, value, options[key].default) for key, value in values.items()}
    for key, option in options.items():
        if option.required and values.get(key) in (None, ""):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"missing {flag} (or `{key}:` in --config, or --set {key}=...)")
        if option.choices is not None and values[key] not in option.choices:
            known = ", ".join(option.choices)
            raise UsageError(f"unknown `{key}` {values[key]!r}; expected one of {known}")
    return values


def _preset_values(options: dict[str, Option], given: dict[str, Any]) -> dict[str, Any]:
    """The settings of the preset named in ``given`` (``--preset``, ``preset:`` in
    --config or ``--set preset=...``), by option key; empty for a command without presets
    or an unknown name (reported by the choices check)."""
    preset_key = next((k for k, o in options.items() if o.field == "preset"), None)
    if preset_key is None or preset_key not in given:
        return {}
    from selmix.finetune import PRESETS

    name = given[preset_key]
    if not isinstance(name, str) or name not in PRESETS:
        return {}
    by_field = {option.field: key for key, option in options.items() if option.field}
    return {by_field[field]: value for field, value in PRESETS[name].items() if field in by_field}


# -- shared helpers -----------------------------------------------------------------------------
def _load_data(settings: dict[str, Any]) -> Any:
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
    from selmix.metrics import infer_head_classes

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


def _load_start_model(settings: dict[str, Any], splits: Any) -> tuple[Any, dict[str, Any]]:
    from selmix.checkpoint import load_model
    from selmix.evaluate import resolve_device

    device = resolve_device(settings["device"])
    model, meta = load_model(settings["checkpoint"], device, num_classes=_num_classes(splits))
    spec = getattr(model, "selmix_spec", None) or {}
    channels = _in_channels(splits.train)
    if spec.get("in_channels") not in (None, channels):
        raise UsageError(
            f"`checkpoint` {settings['checkpoint']!r} is for {spec['in_channels']}-channel "
            f"images but the data has {channels} channels"
        )
    saved = meta.get("classes") if isinstance(meta, dict) else None
    if saved and splits.classes is not None and list(saved) != list(splits.classes):
        print(
            f"{PROG}: warning: the checkpoint's class names {list(saved)} differ from the "
            f"data's {list(splits.classes)}",
            file=sys.stderr,
        )
    return model, meta


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


#: The files a run writes to ``--out``; a fresh run removes them all (module docstring).
RUN_FILES = (
    "model.pt", "metrics.json", "config.yaml", "log.jsonl", "finetune_state.pt", "details.json",
    "timings.json", "pretrain_state.pt",
)  # fmt: skip


def _check_out(settings: dict[str, Any]) -> Path:
    """The output folder, checked but not touched."""
    out = Path(settings["out"])
    if out.exists() and not out.is_dir():
        raise UsageError(f"`out` {str(out)!r} exists and is not a folder")
    return out


def _out_dir(settings: dict[str, Any]) -> Path:
    out = _check_out(settings)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, f"cannot create `out` {str(out)!r}: {error.strerror}") from None
    return out


def _start_run(settings: dict[str, Any], keep: Sequence[str] = ()) -> Path:
    """Makes ``--out`` hold this run only: removes the previous run's files (see the module
    docstring) except ``keep`` (the starting model when it lives there), then writes this
    run's ``config.yaml``. Called once everything has been checked; rank 0 only."""
    out = _out_dir(settings)
    if os.environ.get("RANK", "0") == "0":
        kept = {Path(path).resolve() for path in keep}
        for name in RUN_FILES:
            if (out / name).resolve() not in kept:
                (out / name).unlink(missing_ok=True)
        _write_yaml(out / "config.yaml", settings)
    return out


def _file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _run_identity(settings: dict[str, Any], splits: Any = None) -> dict[str, Any]:
    """What a fine-tuning run is made from beyond its settings: the data source (its kind
    and resolved path), how the splits are cut and the starting model file (path and
    content digest). A resumed run must agree on all of them."""
    kind, sep, location = str(settings["data"]).partition(":")
    data = f"{kind}:{Path(location).expanduser().resolve()}" if sep and location else kind
    checkpoint = Path(settings["checkpoint"]).expanduser().resolve()
    return {
        "data": data,
        "imbalance": settings["imbalance"],
        "max_per_class": settings["max_per_class"],
        "val_per_class": settings["val_per_class"],
        "checkpoint": f"{checkpoint} (sha256 {_file_digest(checkpoint)})",
        # streamed trees get other transforms, and --stream auto can choose differently
        # when the free memory changes between a run and its resume
        "storage": _storage(splits),
    }


def _storage(splits: Any) -> str:
    from selmix.data import StreamingImageDataset

    streamed = splits is not None and isinstance(splits.train, StreamingImageDataset)
    return "disk" if streamed else "memory"


# -- commands -----------------------------------------------------------------------------------
def _cmd_pretrain(settings: dict[str, Any]) -> int:
    import torch

    from selmix.checkpoint import save_model
    from selmix.evaluate import evaluate
    from selmix.models import create_model, list_models
    from selmix.models.external import TIMM_PREFIX
    from selmix.pretrain import PretrainConfig, pretrain
    from selmix.report import format_metrics_table

    name = settings["model"]
    if not isinstance(name, str) or (
        name not in list_models() and not (name.startswith(TIMM_PREFIX) and len(name) > 5)
    ):
        known = ", ".join(list_models())
        raise UsageError(f"unknown `model` {name!r}; expected one of {known} or timm:NAME")
    config = _config_from(PretrainConfig, settings, _pretrain_options())
    if not isinstance(settings["model_kwargs"], dict):
        raise UsageError("`model_kwargs` must be a mapping, e.g. --set model_kwargs='{width: 2}'")
    _check_early(settings)
    resume = settings["resume"]
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"`resume` file {resume!r} does not exist")
    _check_out(settings)
    splits = _load_data(settings)
    settings["head_classes"] = _head_classes(settings, splits)

    torch.manual_seed(settings["seed"])  # the model's initial weights
    model = create_model(
        settings["model"], _num_classes(splits), in_channels=_in_channels(splits.train),
        **settings["model_kwargs"],
    )  # fmt: skip
    # a resumed run keeps --out as it is (its pretrain_state.pt is the checkpoint)
    out = _out_dir(settings) if resume is not None else _start_run(settings)
    state_path = out / "pretrain_state.pt"
    config = config.replace(checkpoint_path=str(state_path))
    try:
        result = pretrain(model, splits.train, splits.val, config, resume=resume)
    except KeyboardInterrupt:
        hint = (
            f"interrupted; continue with --resume {state_path}"
            if state_path.is_file()
            else "interrupted before the first checkpoint: nothing to resume from"
        )
        raise _Interrupted(hint) from None
    metrics = {
        "test": evaluate(result.model, splits.test, config.device, config.eval_batch_size)
        .metrics(settings["head_classes"]),
        "val": evaluate(result.model, splits.val, config.device, config.eval_batch_size)
        .metrics(settings["head_classes"]),
    }  # fmt: skip
    save_model(out / "model.pt", result.model, _model_meta(splits, settings, "pretrain"))
    _write_json(out / "metrics.json", metrics)
    _note_resolved(out / "config.yaml", result.config)
    print(format_metrics_table({"val": metrics["val"], "test": metrics["test"]}, change=False))
    print(f"wrote {out / 'model.pt'}, {out / 'metrics.json'}, {out / 'config.yaml'}")
    return 0


def _check_tensorboard(directory: str | None) -> None:
    import importlib.util

    if directory and importlib.util.find_spec("tensorboard") is None:
        raise UsageError(
            "`tensorboard` needs the optional package 'tensorboard': pip install "
            "'selmix[tensorboard]' (or pip install tensorboard)"
        )


def _cmd_finetune(settings: dict[str, Any]) -> int:
    from selmix.checkpoint import load_checkpoint, save_model
    from selmix.collective import SingleProcess, evaluate_across
    from selmix.distributed import init_from_env
    from selmix.finetune import (
        FinetuneConfig,
        check_resume,
        data_fingerprint,
        finetune,
        resolve_objective,
    )
    from selmix.objectives import get_objective
    from selmix.report import format_metrics_table

    # fail fast, before any data is read: every setting, the objective, the files
    config = _config_from(FinetuneConfig, settings, _finetune_options())
    get_objective(config.objective, **config.objective_params)
    _check_tensorboard(config.tensorboard_dir)
    if settings["resume"] is not None and not Path(settings["resume"]).is_file():
        raise FileNotFoundError(f"`resume` file {settings['resume']!r} does not exist")
    _check_out(settings)

    splits = _load_data(settings)
    model, _ = _load_start_model(settings, splits)
    # the library resolves the run (head classes, objective parameters) as the API does
    config, _ = resolve_objective(config, None, splits.train.labels, _num_classes(splits))
    settings["head_classes"] = config.head_classes
    identity = _run_identity(settings, splits)
    unlabelled = getattr(splits, "unlabelled", None)
    resume_state = None
    if settings["resume"] is not None:
        # checked here, before --out is touched, as the library will check it again
        resume_state = load_checkpoint(settings["resume"])
        check_resume(
            resume_state, config, world_size=int(os.environ.get("WORLD_SIZE", "1")),
            data=data_fingerprint(splits.train, splits.val, unlabelled), identity=identity,
            path=settings["resume"],
        )  # fmt: skip
        out = _out_dir(settings)
    else:
        out = _start_run(settings, keep=[settings["checkpoint"]])
    state_path = out / "finetune_state.pt"
    config = config.replace(log_path=str(out / "log.jsonl"), checkpoint_path=str(state_path))

    # under torchrun every process runs this; rank 0 alone writes files and prints
    context = init_from_env(settings["device"])
    collective = context or SingleProcess()
    try:
        collective.local_batch_size(config.batch_size)  # fail fast on an uneven split
        device = collective.process_device(config.device)

        def test_metrics(trained: Any) -> dict[str, Any]:
            evaluation = evaluate_across(
                collective, trained, splits.test, device, config.eval_batch_size
            )
            return evaluation.metrics(config.head_classes)

        before = test_metrics(model)
        try:
            result = finetune(
                model, splits.train, splits.val, config=config, unlabelled=unlabelled,
                resume=settings["resume"], distributed=context, identity=identity,
            )  # fmt: skip
        except KeyboardInterrupt:
            raise _Interrupted(_resume_hint(settings, state_path)) from None
        after = test_metrics(result.model)
        metrics = {
            "before": before,
            "after": after,
            "select": config.select,
            "selected_step": result.selected_step,
            "best_step": result.best_step,
            "last_step": result.last_step,
        }
        for which, step in (("best", result.best_step), ("last", result.last_step)):
            same = step == result.selected_step
            metrics[which] = after if same else test_metrics(result.model_at(which))
        if collective.is_main:
            meta = _model_meta(splits, settings, "finetune")
            save_model(out / "model.pt", result.model, meta)
            _write_json(out / "metrics.json", metrics)
            # wall time of training and feedback per phase, and what `auto` resolved to
            _write_json(out / "timings.json", {**result.timings, "hardware": result.hardware})
            _write_yaml(out / "config.yaml", settings)
            _note_resolved(out / "config.yaml", result.config)
        # all ranks leave together: gloo aborts a process whose peer hung up first
        collective.barrier()
    finally:
        if context is not None:
            context.destroy()
    if not collective.is_main:
        return 0
    print(f"objective: {config.objective} ({config.steps} steps, policy {config.policy})")
    print(
        f"selected step {result.selected_step} ({config.select}; best {result.best_step}, "
        f"last {result.last_step})"
    )
    print(format_metrics_table({"before": before, "after": after}))
    written = ", ".join(str(out / name) for name in ("model.pt", "log.jsonl", "metrics.json"))
    print(f"wrote {written}, {out / 'config.yaml'}")
    return 0


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what to do next (the message :func:`main` prints)."""


def _resume_hint(settings: dict[str, Any], state_path: Path) -> str:
    """Where the checkpoint is and the command that continues the run; or, before the
    first checkpoint, that there is nothing to resume from."""
    if not state_path.is_file():
        every = settings.get("checkpoint_every")
        when = f"every {every} steps" if every else "at the end"
        return (
            f"interrupted before the first checkpoint (written {when} to {str(state_path)!r}): "
            "nothing to resume from"
        )
    argv = list(_ARGV)
    # drop an earlier --resume (both spellings) and name this checkpoint
    kept: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--resume":
            skip = True
            continue
        if item.startswith("--resume="):
            continue
        kept.append(item)
    command = shlex.join([PROG, *kept, "--resume", str(state_path)])
    return f"interrupted; the checkpoint is {str(state_path)!r}; to continue: {command}"


# the arguments of the command being run (for the resume hint)
_ARGV: list[str] = []


def _warn_ignored_settings(settings: dict[str, Any], options: list[Option]) -> None:
    """One warning naming the other methods' settings that differ from their defaults."""
    from selmix.baselines import BaselineConfig

    method = settings["method"]
    used = set(BaselineConfig.used_by(method))
    ignored = sorted(
        option.key
        for option in options
        if option.field
        and option.field not in used
        and option.field != "progress"  # a display setting, not a method's
        and settings[option.key] != option.default
    )
    if ignored:
        warnings.warn(f"method {method} ignores the setting(s) {', '.join(ignored)}", stacklevel=2)


def _cmd_baseline(settings: dict[str, Any]) -> int:
    from selmix.baselines import BaselineConfig, baseline
    from selmix.checkpoint import save_model
    from selmix.evaluate import evaluate
    from selmix.finetune import resolve_objective
    from selmix.objectives import get_objective
    from selmix.report import format_metrics_table

    method = settings["method"]
    options = _baseline_options()
    # fail fast, before any data is read
    config = _config_from(BaselineConfig, settings, options)
    if method == "posthoc_la":
        get_objective(config.objective, **config.objective_params)
    _warn_ignored_settings(settings, options)
    _check_out(settings)

    splits = _load_data(settings)
    model, _ = _load_start_model(settings, splits)
    # the library resolves the run (head classes, objective parameters) as the API does
    config, _ = resolve_objective(config, None, splits.train.labels, _num_classes(splits))
    settings["head_classes"] = config.head_classes
    out = _start_run(settings, keep=[settings["checkpoint"]])

    def test_metrics(trained: Any) -> dict[str, Any]:
        evaluation = evaluate(trained, splits.test, config.device, config.eval_batch_size)
        return evaluation.metrics(config.head_classes)

    before = test_metrics(model)
    result = baseline(method, model, splits.train, splits.val, config)
    after = test_metrics(result.model)
    save_model(out / "model.pt", result.model, _model_meta(splits, settings, "baseline"))
    _write_json(out / "metrics.json", {"before": before, "after": after})
    written = [out / "model.pt", out / "metrics.json", out / "config.yaml"]
    if result.details:  # posthoc_la: the tau search; crt, mislas_stage2: per-epoch history
        _write_json(out / "details.json", result.details)
        written.append(out / "details.json")

    if method == "posthoc_la":
        print(
            f"method: posthoc_la, tau = {result.details['tau']} (the best of "
            f"{len(result.details['taus'])} taus on the validation set for "
            f"{settings['objective']})"
        )
    elif method == "crt":
        print(f"method: crt ({config.epochs} epochs, lr {config.lr:g})")
    elif method == "mislas_stage2":
        print(
            f"method: mislas_stage2 ({config.epochs} epochs, lr {config.lr:g}, label-aware "
            f"smoothing {config.smooth_head:g} (head) to {config.smooth_tail:g} (tail))"
        )
    else:
        part = "head only" if config.frozen_backbone else "full backbone"
        print(f"method: la_finetune ({config.steps} steps, tau {config.la_tau:g}, {part})")
    print(format_metrics_table({"before": before, "after": after}))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _cmd_evaluate(settings: dict[str, Any]) -> int:
    from selmix.evaluate import evaluate
    from selmix.report import format_metrics_table, format_per_class_table

    _check_early(settings)
    if settings["out"] is not None:
        _check_out(settings)
    splits = _load_data(settings)
    model, _ = _load_start_model(settings, splits)
    head_classes = _head_classes(settings, splits)
    settings["head_classes"] = head_classes
    metrics = evaluate(model, splits.test, settings["device"], settings["batch_size"]).metrics(
        head_classes
    )
    print(format_metrics_table({"test": metrics}))
    print()
    print(format_per_class_table({"test": metrics}, classes=splits.classes))
    if settings["out"] is not None:
        out = _out_dir(settings)
        _write_json(out / "metrics.json", {"test": metrics})
        print(f"wrote {out / 'metrics.json'}")
    return 0


def _cmd_demo(settings: dict[str, Any]) -> int:
    from selmix._validation import check_seed
    from selmix.demo import run_demo

    check_seed("seed", settings["seed"])
    _flag(settings, "fast")

    data_options = {
        key: settings[key]
        for key in ("imbalance", "max_per_class", "val_per_class", "cache_dir")
        if settings[key] is not None
    }
    run_demo(
        out_dir=settings["out"], device=settings["device"], seed=settings["seed"],
        fast=settings["fast"], data_options=data_options or None,
        threads=settings["threads"] or None, progress=_flag(settings, "progress"),
    )  # fmt: skip
    return 0


_RUNNERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "pretrain": _cmd_pretrain,
    "finetune": _cmd_finetune,
    "baseline": _cmd_baseline,
    "evaluate": _cmd_evaluate,
    "demo": _cmd_demo,
}


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "out of memory" in text or "DefaultCPUAllocator" in text


def _one_line(error: BaseException | str) -> str:
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``selmix`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a usage error, 1 for a failed run, 130 when
        interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    try:
        args = _build_parser(show_defaults=True).parse_args(argv)
    except SystemExit as exit_request:  # --help, --version or an argparse error
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    command = args.command
    started = time.perf_counter()

    def show_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
        print(f"{PROG} {command}: warning: {_one_line(message)}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning  # one line, no source excerpt
            settings = resolve_settings(command, argv)
            status = _RUNNERS[command](settings)
    except KeyboardInterrupt as interrupt:
        text = str(interrupt) if isinstance(interrupt, _Interrupted) else "interrupted"
        print(f"{PROG} {command}: {text}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError, ImportError, MemoryError) as error:
        if os.environ.get("SELMIX_DEBUG"):
            raise
        print(f"{PROG} {command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (FloatingPointError, RuntimeError) as error:
        if os.environ.get("SELMIX_DEBUG"):
            raise
        if _is_out_of_memory(error):
            # a batch too large for the memory, outside the fine-tuning loop's own check
            print(
                f"{PROG} {command}: error: out of memory ({_one_line(error)[:200]}); lower "
                "`batch_size` (or `eval_batch_size`)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        print(f"{PROG} {command}: failed: {_one_line(error)}", file=sys.stderr)
        return 1
    # under torchrun only rank 0 reports
    if command != "demo" and os.environ.get("RANK", "0") == "0":
        print(f"done in {time.perf_counter() - started:.1f} s")
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
