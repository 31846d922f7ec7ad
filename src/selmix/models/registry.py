"""A name -> constructor registry for models, in the style of timm's ``create_model``.

Built-in architectures register themselves when :mod:`selmix.models` is imported; users add
their own with the :func:`register_model` decorator and build any of them by name with
:func:`create_model`, which is what the command line and the benchmarks use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from torch import nn

from selmix._validation import check_int
from selmix.models._optional import create_timm_model, create_torchvision_model

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_MODELS: dict[str, ModelFactory] = {}


@overload
def register_model(fn: F) -> F: ...
@overload
def register_model(fn: None = None, *, name: str | None = None) -> Callable[[F], F]: ...


def register_model(fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Registers a model constructor under a name (the function's name by default).

    The constructor is called as ``fn(num_classes=K, in_channels=C, **kwargs)`` by
    :func:`create_model`, so it must accept those two keyword arguments.

    Use it bare or with a name::

        @register_model
        def my_net(num_classes: int, in_channels: int = 3) -> nn.Module: ...

        @register_model(name="my-net-v2")
        def build(num_classes: int, in_channels: int = 3) -> nn.Module: ...

    Args:
        fn: the constructor (when used bare).
        name: the registry name; defaults to ``fn.__name__``.

    Returns:
        The constructor itself, unchanged, so it can still be called directly.

    Raises:
        ValueError: if the name is already registered.
    """

    def decorator(factory: F) -> F:
        if not callable(factory):
            raise TypeError(f"`fn` must be callable, got {type(factory).__name__}")
        key = name if name is not None else factory.__name__
        if not isinstance(key, str) or not key:
            raise ValueError(f"`name` must be a non-empty string, got {key!r}")
        if key in _MODELS:
            raise ValueError(f"a model named {key!r} is already registered")
        _MODELS[key] = factory
        return factory

    if fn is not None:
        return decorator(fn)
    return decorator


def list_models() -> list[str]:
    """Returns the names of all registered models, sorted."""
    return sorted(_MODELS)


def check_model_name(name: Any) -> tuple[str | None, str | None]:
    """Checks a name :func:`create_model` builds, without building it.

    Returns:
        ``(timm architecture, torchvision architecture)``: the part after ``timm:`` or
        ``torchvision:`` (None for a name without that prefix).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: an unknown name (the message lists the known ones), or a prefix
            without an architecture.
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {type(name).__name__}")
    timm_name = name[len("timm:") :] if name.startswith("timm:") else None
    torchvision_name = name[len("torchvision:") :] if name.startswith("torchvision:") else None
    if timm_name is None and torchvision_name is None and name not in _MODELS:
        known = ", ".join(repr(n) for n in list_models())
        raise ValueError(
            f"unknown model {name!r}; expected one of {known}, 'timm:NAME' or 'torchvision:NAME'"
        )
    if timm_name == "" or torchvision_name == "":
        raise ValueError(f"`name` {name!r} needs an architecture, e.g. '{name}resnet18'")
    return timm_name, torchvision_name


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Builds a registered model by name.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet32"``, ``"wrn28_2"``,
            ``"small_cnn"``, ``"linear"``, ``"hf_vit"``; or ``"timm:<architecture>"`` for
            any timm model with random weights (needs the ``timm`` extra); or
            ``"torchvision:<architecture>"`` for a ``torchvision.models`` classifier.
        num_classes: K, the number of output logits (>= 2).
        in_channels: channels of the input images (3 for colour, 1 for grey).
        **kwargs: passed on to the model's constructor (e.g. ``shortcut="B"`` for resnet32).

    Returns:
        The model, randomly initialised. Built-in models map images [N, C, H, W] to logits
        [N, K] and expose ``.features``, ``.head`` and ``.num_features``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones) or bad sizes.
    """
    timm_name, torchvision_name = check_model_name(name)
    check_int("num_classes", num_classes, minimum=2)
    check_int("in_channels", in_channels, minimum=1)
    model: nn.Module
    if timm_name is not None:
        model = create_timm_model(timm_name, num_classes, in_channels, **kwargs)
    elif torchvision_name is not None:
        model = create_torchvision_model(torchvision_name, num_classes, in_channels, **kwargs)
    else:
        model = _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    # what selmix.save_model needs to rebuild the model from a checkpoint
    spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "kwargs": kwargs}
    # setattr: nn.Module's __setattr__ is typed for tensors and modules only
    setattr(model, "selmix_spec", spec)  # noqa: B010
    return model
