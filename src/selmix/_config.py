"""Run configurations declared once: dataclass fields that carry their own metadata.

A setting is one dataclass field made with :func:`setting`, which records next to the
default:

* ``help``: the one-line description (CLI help, ``--help`` epilog, docs);
* ``check``: a constraint (:class:`Int`, :class:`Real`, :class:`Choice`, :class:`Flag`,
  :class:`Dict`, wrapped in :class:`Optional` when None is allowed) that
  :class:`ConfigMixin` applies to every field on construction (scikit-learn's
  ``_parameter_constraints`` is the model);
* ``run``: whether the field defines what a run computes, so that a resumed run must
  agree on it (:meth:`ConfigMixin.check_resumable`);
* ``flag``: whether the CLI gives it a ``--flag`` (every CLI setting is also a
  ``--set``/``--config`` key); ``cli=False`` keeps a field out of the CLI altogether;
  ``key``, ``cli_default``, ``choices`` and ``metavar`` adjust how the CLI shows it.

The CLI (:mod:`selmix.cli`) builds its options, ``--set`` keys, help and the copy into the
config from :func:`settings_of`; adding a setting is adding one field. Fields made with a
plain default still work: their help comes from the class docstring's ``Attributes:``
section and they are validated by the class's own ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from selmix._validation import (
    check_bool,
    check_choice,
    check_head_classes,
    check_in_range,
    check_int,
    check_positive,
    check_seed,
)

__all__ = [
    "Choice",
    "ClassIndices",
    "ConfigMixin",
    "Flag",
    "FlagOrAuto",
    "Int",
    "Dict",
    "Optional",
    "Real",
    "Seed",
    "Setting",
    "setting",
    "settings_of",
]

ConfigT = TypeVar("ConfigT", bound="ConfigMixin")
_KEY = "selmix"
_UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()


# -- constraints --------------------------------------------------------------------------
class Int:
    """An int (not a bool), at least ``minimum`` when given."""

    def __init__(self, minimum: int | None = None) -> None:
        self.minimum = minimum

    def __call__(self, name: str, value: Any) -> Any:
        return check_int(name, value, minimum=self.minimum)


class Seed:
    """A random seed: an int that ``torch.manual_seed`` accepts (``[-2**63, 2**64)``)."""

    def __call__(self, name: str, value: Any) -> Any:
        return check_seed(name, value)


class Real:
    """A finite number: ``> 0`` (``strict``) or ``>= 0``, or in ``[low, high]`` when ``high``
    is set (``inf`` and ``nan`` are always rejected)."""

    def __init__(self, strict: bool = True, low: float = 0.0, high: float | None = None) -> None:
        self.strict, self.low, self.high = strict, low, high

    def __call__(self, name: str, value: Any) -> Any:
        if self.high is not None:
            return check_in_range(name, value, self.low, self.high)
        check_positive(name, value, strict=self.strict)
        return value


class Choice:
    """One of ``choices`` (a sequence, or a function returning one for registries)."""

    def __init__(self, choices: Sequence[Any] | Callable[[], Sequence[Any]]) -> None:
        self._choices = choices

    @property
    def choices(self) -> Sequence[Any]:
        return self._choices() if callable(self._choices) else self._choices

    def __call__(self, name: str, value: Any) -> Any:
        return check_choice(name, value, self.choices)


class Flag:
    """True or False (not 0, 1, 2 or "maybe")."""

    def __call__(self, name: str, value: Any) -> Any:
        return check_bool(name, value)


class FlagOrAuto(Choice):
    """True, False or ``"auto"`` (a setting that is measured unless given)."""

    def __init__(self) -> None:
        super().__init__(("auto", True, False))

    def __call__(self, name: str, value: Any) -> Any:
        if value == "auto" and isinstance(value, str):
            return value
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True, False or 'auto', got {value!r}")
        return value


class ClassIndices:
    """A list of distinct class indices >= 0 (checked against K once the data is known)."""

    def __call__(self, name: str, value: Any) -> Any:
        check_head_classes(value, None, name)
        return value


class Dict:
    """A dict (e.g. an objective's hyper-parameters)."""

    def __call__(self, name: str, value: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"`{name}` must be a dict, got {type(value).__name__}")
        return value


class Optional:
    """None, or a value ``inner`` accepts."""

    def __init__(self, inner: Callable[[str, Any], Any]) -> None:
        self.inner = inner

    def __call__(self, name: str, value: Any) -> Any:
        return None if value is None else self.inner(name, value)


# -- field metadata -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a configuration class, as :func:`settings_of` describes it.

    Attributes:
        name: the field name (the Python API's keyword).
        key: the CLI's ``--set``/``--config`` key (the name unless renamed).
        default: the default (the API's; the CLI shows ``cli_default`` when set).
        type: the field's annotated type (``int``, ``float``, ``str``, ``bool`` or another).
        help: one line for the CLI and the docs.
        check: the constraint, or None.
        run: part of what a run computes (a resumed run must agree on it).
        flag: the CLI has a ``--flag`` for it.
        cli: the CLI exposes it (as a key at least).
        cli_default: the CLI's default when it differs from the API's.
        choices: the values the CLI accepts (default: those of a :class:`Choice` check).
        metavar: the CLI's placeholder for the value.
        extra: anything else a configuration class declares per field (e.g. which
            baselines use it).
    """

    name: str
    key: str
    default: Any
    type: Any
    help: str
    check: Callable[[str, Any], Any] | None = None
    run: bool = False
    flag: bool = False
    cli: bool = True
    cli_default: Any = _UNSET
    choices: Sequence[str] | None = None
    metavar: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shown_default(self) -> Any:
        """The default the CLI starts from."""
        return self.default if self.cli_default is _UNSET else self.cli_default


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,  # noqa: A002 - the word every CLI library uses
    check: Callable[[str, Any], Any] | None = None,
    run: bool = False,
    flag: bool = False,
    cli: bool = True,
    key: str | None = None,
    cli_default: Any = _UNSET,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    extra: dict[str, Any] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that declares a setting once (see the module docstring).

    Example::

        @dataclass
        class MyConfig(ConfigMixin):
            steps: int = setting(1000, help="SGD steps", check=Int(1), run=True, flag=True)
    """
    metadata = {
        _KEY: {
            "help": help, "check": check, "run": run, "flag": flag, "cli": cli, "key": key,
            "cli_default": cli_default, "choices": choices, "metavar": metavar,
            "extra": dict(extra or {}),
        }
    }  # fmt: skip
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_ATTRIBUTE = re.compile(r"^ {8}([a-z_][a-z0-9_, ]*):\s*(.*)$")


def _docstring_help(cls: type) -> dict[str, str]:
    """``{field: first sentence}`` from a Google-style ``Attributes:`` section."""
    helps: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    inside = False
    for line in lines:
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        match = _ATTRIBUTE.match(line)
        if match:
            names, text = match.groups()
            for name in names.split(","):
                helps[name.strip()] = text.strip()
        elif line.startswith(" " * 12) and helps:
            last = list(helps)[-1]
            helps[last] += " " + line.strip()
        elif line.strip() and not line.startswith(" " * 8):
            break
    plain = {name: text.replace("``", "").replace(":func:", "") for name, text in helps.items()}
    return {name: text.split(". ")[0].rstrip(".") for name, text in plain.items()}


def settings_of(cls: type) -> list[Setting]:
    """Every field of a configuration class as a :class:`Setting`, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = _docstring_help(cls)
    result = []
    for item in dataclasses.fields(cls):
        meta = dict(item.metadata.get(_KEY, {}))
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = None
        check = meta.pop("check", None)
        choices = meta.pop("choices", None)
        if choices is None and isinstance(check, Choice):
            choices = tuple(check.choices)
        result.append(
            Setting(
                name=item.name,
                key=meta.pop("key", None) or item.name,
                default=default,
                type=hints.get(item.name, Any),
                help=meta.pop("help", None) or docs.get(item.name, item.name.replace("_", " ")),
                check=check,
                choices=choices,
                **{k: v for k, v in meta.items()},
            )
        )
    return result


def scalar_type(annotation: Any) -> type | None:
    """``int``, ``float``, ``str`` or ``bool`` for an annotation of one (or of one or None);
    None for anything else (lists, dicts...)."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if len(options) == 1 and options[0] in (int, float, str, bool):
        return options[0]
    return None


# -- the mixin ------------------------------------------------------------------------------
def _implicit_checks(cls: type) -> list[tuple[str, Callable[[str, Any], Any]]]:
    """The checks every configuration gets from its fields' types and names alone: a
    ``bool`` field must hold True or False (:class:`Flag`), a field named ``seed`` a seed
    torch accepts (:class:`Seed`); fields with a declared ``check`` are left to it."""
    cached = cls.__dict__.get("_selmix_implicit_checks")
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    checks: list[tuple[str, Callable[[str, Any], Any]]] = []
    for item in dataclasses.fields(cls):
        if item.metadata.get(_KEY, {}).get("check") is not None:
            continue
        annotation = hints.get(item.name)
        if item.name == "seed" and scalar_type(annotation) is int:
            checks.append((item.name, Optional(Seed())))
        elif annotation is bool:
            checks.append((item.name, Flag()))
    cls._selmix_implicit_checks = checks  # type: ignore[attr-defined]
    return checks


def _run_checks(config: Any) -> None:
    """The declared checks of every field, then the implicit ones (:func:`_implicit_checks`)."""
    for item in dataclasses.fields(config):
        check = item.metadata.get(_KEY, {}).get("check")
        if check is not None:
            check(item.name, getattr(config, item.name))
    for name, check in _implicit_checks(type(config)):
        check(name, getattr(config, name))


class ConfigMixin:
    """Mixed into a configuration dataclass: validation, dict round trip, resume checks.

    Every field's constraint runs on construction, before the class's own
    ``__post_init__`` if it defines one (so a subclass that validates by hand still gets
    the constraints, and booleans and seeds are checked in every configuration).
    """

    # how the error for an unknown key names the settings, e.g. "fine-tuning"
    settings_name = "configuration"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_selmix_checked", False):
            return

        def __post_init__(self: Any) -> None:
            _run_checks(self)
            own(self)

        __post_init__._selmix_checked = True  # type: ignore[attr-defined]
        __post_init__.__doc__ = own.__doc__
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        _run_checks(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for YAML and checkpoints)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
        """Builds a config; an unknown key is an error that lists the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.settings_name} setting(s) {unknown}; valid settings: {sorted(known)}"
            )
        return cls(**values)

    @classmethod
    def resolve(
        cls: type[ConfigT], config: ConfigT | dict[str, Any] | None, overrides: dict[str, Any]
    ) -> ConfigT:
        """The config of a run: defaults, a dict or an instance, then keyword overrides."""
        if config is None:
            config = cls()
        elif isinstance(config, dict):
            config = cls.from_dict(config)
        elif not isinstance(config, cls):
            raise TypeError(
                f"`config` must be a {cls.__name__} or dict, got {type(config).__name__}"
            )
        return config.replace(**overrides) if overrides else config

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        """A copy with some fields changed (validated like the constructor)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def run_fields(cls) -> list[str]:
        """The fields a resumed run must agree on (declared with ``run=True``)."""
        return [s.name for s in settings_of(cls) if s.run]

    def resume_changes(self, saved: dict[str, Any]) -> list[str]:
        """``"key: old -> new"`` for every run field on which ``saved`` (a config dict of an
        earlier run) differs from this config."""
        current = self.to_dict()
        changed = [k for k in self.run_fields() if not _same(saved.get(k), current.get(k))]
        return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed]

    def check_resumable(self, saved: dict[str, Any]) -> None:
        """Raises ValueError naming every run field on which ``saved`` (a config dict of an
        earlier run) differs from this config."""
        changed = self.resume_changes(saved)
        if changed:
            raise ValueError(
                f"`resume` checkpoint was made with other settings ({', '.join(changed)})"
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
