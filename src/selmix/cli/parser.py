"""The command line: the commands and their options (:data:`_COMMANDS`), the argparse
parser with each command's help, and :func:`resolve_settings`, which merges defaults,
preset, ``--config``, flags and ``--set`` into one run's settings."""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from selmix.cli.baseline import _baseline_options
from selmix.cli.demo import _demo_options
from selmix.cli.evaluate import _evaluate_options
from selmix.cli.finetune import _finetune_options
from selmix.cli.options import _PATH_KEYS, EXIT_USAGE, PROG, Option, UsageError
from selmix.cli.pretrain import _pretrain_options

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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the epilog's line breaks."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


#: What each objective parameter means (``objective_params``); keys come from the objectives.
_OBJECTIVE_PARAM_HELP = {
    "rate": "w of the min-recall multipliers softmax(-w * recall)",
    "alpha": "the coverage target, a share of the fair coverage 1/K",
    "scale": "L, the ceiling of the coverage multipliers",
    "tau": "the temperature of the coverage multiplier update",
    "head_classes": "the head classes of the head/tail objectives",
}


def _epilog(command: str, options: list[Option]) -> str:
    import textwrap

    lines = [
        "settings (keys for --set KEY=VALUE and --config FILE.yaml, with defaults; those "
        "without a flag above with their help):"
    ]
    for option in sorted(options, key=lambda option: not option.required):
        default = "required" if option.required else _yaml_inline(option.default)
        lines.append(f"  {option.key} = {default}")
        if not option.flag:
            lines += textwrap.wrap(option.help, 76, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)  # fmt: skip
    if command == "pretrain":
        from selmix.models import list_models

        lines.append("models: " + ", ".join(list_models()))
    if command in ("finetune", "baseline"):
        from selmix.core.objectives import list_objectives

        lines.append("objectives: " + ", ".join(list_objectives()))
    if any(option.key == "objective_params" for option in options):
        lines += _objective_params_lines()
    if any(option.field == "preset" for option in options):
        from selmix.finetune import PRESETS

        for name, values in PRESETS.items():
            shown = ", ".join(f"{key}={_yaml_inline(value)}" for key, value in values.items())
            lines.append(f"preset {name}: {shown or 'the defaults above'}")
        lines.append("precedence: defaults < preset < --config < explicit flags < --set")
    else:
        lines.append("precedence: defaults < --config < explicit flags < --set")
    return "\n".join(lines)


def _objective_params_lines() -> list[str]:
    """The keys ``objective_params`` takes, per objective (read from the objectives'
    defaults), and what each means."""
    import textwrap

    from selmix.core.objectives import get_objective, list_objectives

    by_keys: dict[tuple[str, ...], list[str]] = {}
    for name in list_objectives():
        try:
            keys = tuple(get_objective(name).hyperparameters())
        except (TypeError, ValueError):  # an objective that needs parameters to be built
            continue
        by_keys.setdefault(keys, []).append(name)
    lines = ["objective_params keys (e.g. --set objective_params='{rate: 20}'):"]
    every = list(dict.fromkeys(key for keys in by_keys for key in keys))
    for key in every:
        lines.append(f"  {key}: {_OBJECTIVE_PARAM_HELP.get(key, 'see the objective')}")
    taken = "; ".join(
        f"{', '.join(names)}: {', '.join(keys) or 'none'}" for keys, names in by_keys.items()
    )
    lines += textwrap.wrap(f"taken by: {taken}", 78, initial_indent="  ",
                           subsequent_indent="    ")  # fmt: skip
    return lines


def _yaml_inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _build_parser(show_defaults: bool) -> _Parser:
    """The parser; without ``show_defaults`` only explicitly given options are set."""
    from selmix._version import __version__

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
