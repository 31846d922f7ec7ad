"""The dictionary round trip shared by the run configurations (fine-tuning, pre-training,
FixMatch): plain data for YAML and checkpoints, and unknown keys named in the error."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT", bound="ConfigMixin")


class ConfigMixin:
    """Mixed into a dataclass whose ``__post_init__`` validates every field."""

    # how the error for an unknown key names the settings, e.g. "fine-tuning"
    settings_name = "configuration"

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
