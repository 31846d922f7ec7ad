"""Splitting a classifier into a feature extractor g and a linear head W.

SelMix mixes in feature space: the loss is ``CE(W (lam g(x1) + (1 - lam) g(x2)) + b, i)``,
so every model it fine-tunes must be seen as ``model(x) == head(features(x))`` with ``head``
an ``nn.Linear``. :func:`split_model` finds that split for the common kinds of models.

Design: the split never copies weights and never changes the user's model. Where the model
has no stand-alone feature module (a torchvision ResNet ends its ``forward`` with
``self.fc(x)``), ``features`` is a *headless view*: a new module object of the model's own
class that shares every sub-module, parameter and buffer with the model, except that the
head is replaced by ``nn.Identity``. Running the view therefore runs the model's own
``forward`` up to, but not through, the head; training the view trains the user's model; the
head's parameters are not among the view's, so ``features.parameters()`` and
``head.parameters()`` are disjoint and can go into separate optimiser groups.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from torch import Tensor, nn

from selmix._validation import check_int

# Direct attributes that hold the classifier in torchvision and most hand-written models,
# in the order they are tried.
_HEAD_ATTRIBUTES = ("fc", "classifier", "head", "heads")
_TIMM_METHODS = ("forward_features", "forward_head", "get_classifier")


class ModelSplit(NamedTuple):
    """A model seen as ``head(features(x))``; unpacks as ``features, head = split``.

    Attributes:
        features: maps images [N, ...] to features [N, d].
        head: the linear classifier, ``nn.Linear(d, K)``.
    """

    features: nn.Module
    head: nn.Linear


class FeatureClassifier(nn.Module):
    """Base class of the built-in models: ``forward(x) = head(features(x))``.

    Args:
        features: maps images [N, C, H, W] to features [N, num_features].
        num_features: d, the feature dimension.
        num_classes: K, the number of logits.

    Attributes:
        features: the feature extractor g.
        head: ``nn.Linear(num_features, num_classes)``.
        num_features: d.
        num_classes: K.
    """

    def __init__(self, features: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        check_int("num_features", num_features, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        self.num_features = num_features
        self.num_classes = num_classes
        self.features = features
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Maps images [N, C, H, W] to logits [N, K]."""
        return self.head(self.features(x))

    def _init_conv_and_norm(self, nonlinearity: Literal["relu", "leaky_relu"]) -> None:
        """He (fan-out) initialisation of every convolution for ``nonlinearity``; every
        batch norm starts as the identity (weight 1, bias 0)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity=nonlinearity)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


class _FirstTensor(nn.Module):
    """Runs a module whose output is an object (Hugging Face ``ModelOutput``) and returns a tensor.

    The headless view of a Hugging Face classifier returns an output object whose ``logits``
    field holds what its head would have received, i.e. the features [N, d].
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return output_tensor(self.body(x))


def output_tensor(output: Any) -> Tensor:
    """The tensor in a model's output: itself, its ``logits`` field, or its first element.

    Hugging Face models return a ``ModelOutput`` (``output.logits``) or, with
    ``return_dict=False``, a tuple whose first element is the logits.

    Raises:
        TypeError: if no tensor is found (the message names the output's type).
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"the model returned a {type(output).__name__}, not a tensor or an object with a "
        "`logits` tensor; pass features= and head= to split_model"
    )


def _is_hugging_face(model: nn.Module) -> bool:
    # duck-typed: transformers need not be importable to split a plain torch model
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


class _PreLogits(nn.Module):
    """Features of a timm-style model: ``forward_head(forward_features(x), pre_logits=True)``.

    ``body`` is a headless view of the model, so its classifier's parameters are not ours.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        # a timm model: forward_features and forward_head are duck-typed, not nn.Module's
        self.body: Any = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body.forward_head(self.body.forward_features(x), pre_logits=True)


def split_model(
    model: nn.Module | None,
    features: nn.Module | None = None,
    head: nn.Linear | None = None,
) -> ModelSplit:
    """Splits a classifier into ``(features, head)`` with ``model(x) == head(features(x))``.

    Supported, in the order they are tried:

    1. ``features=`` and ``head=`` given: used as they are (``model`` may then be None).
       ``head=`` alone: the head must be a sub-module of ``model`` whose call is the last step
       of ``model.forward``; ``features`` is then the model's headless view (module docstring).
    2. ``nn.Sequential`` ending in ``nn.Linear``: ``features = model[:-1]`` (shares layers).
    3. Built-in models (:class:`FeatureClassifier`): ``(model.features, model.head)``.
    4. timm-style models with ``forward_features``, ``forward_head`` and ``get_classifier()``
       returning an ``nn.Linear``: ``features(x) = forward_head(forward_features(x),
       pre_logits=True)`` on the headless view, i.e. timm's own pooling and pre-logits.
    5. Models whose last step is a direct attribute ``fc``, ``classifier``, ``head`` or
       ``heads`` that is an ``nn.Linear`` or an ``nn.Sequential`` ending in one (torchvision
       ResNet, MobileNet, EfficientNet, VGG, DenseNet, ConvNeXt, Swin, ViT, ...): the head is
       that linear layer and ``features`` is the headless view, so for
       ``classifier = Sequential(Linear, Hardswish, Dropout, Linear)`` the features include
       the hidden layer and the head is the final ``Linear``. This covers Hugging Face
       ``*ForImageClassification`` models (``classifier``); their output object is
       unwrapped, so ``features(x)`` is a tensor [N, d] (``output.logits`` of the view).

    In every case the modules share parameters with ``model``: fine-tuning the split
    fine-tunes the model, and the model itself is not modified. Dropout and batch norm
    follow each module's own ``train()``/``eval()`` mode, so set the mode on the split's
    modules (or on the model before splitting).

    Args:
        model: the classifier, mapping inputs [N, ...] to logits [N, K].
        features: optional explicit feature extractor, inputs -> [N, d].
        head: optional explicit head, ``nn.Linear(d, K)``.

    Returns:
        ``ModelSplit(features, head)``.

    Raises:
        TypeError: if the model is not one of the supported kinds (the message says how to
            pass ``features=`` and ``head=``), or the head is not an ``nn.Linear``.
        ValueError: if only ``features=`` is given, or ``head=`` is not part of ``model``.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if features is not None and not isinstance(features, nn.Module):
        raise TypeError(f"`features` must be a torch.nn.Module, got {type(features).__name__}")
    if head is not None:
        _check_linear("head", head)

    if features is not None and head is not None:
        return ModelSplit(features, head)
    if features is not None:
        raise ValueError(
            "`features` was given without `head`; pass both, or `head=` alone to split "
            "`model` just before that layer"
        )
    if model is None:
        raise ValueError("`model` is None; pass a model, or both `features=` and `head=`")
    if head is not None:
        view = headless_view(model, _path_of(model, head))
        return ModelSplit(_FirstTensor(view) if _is_hugging_face(model) else view, head)

    if isinstance(model, nn.Sequential):
        if len(model) >= 2 and isinstance(model[-1], nn.Linear):
            return ModelSplit(model[:-1], model[-1])
        raise TypeError(_unsupported(model, "an nn.Sequential must end in an nn.Linear"))

    if isinstance(model, FeatureClassifier):
        return ModelSplit(model.features, model.head)

    if all(callable(getattr(model, a, None)) for a in _TIMM_METHODS):
        timm_like: Any = model  # get_classifier is duck-typed (checked just above)
        classifier = timm_like.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise TypeError(
                _unsupported(
                    model,
                    f"its get_classifier() returns {type(classifier).__name__}, not an nn.Linear",
                )
            )
        body = headless_view(model, _path_of(model, classifier))
        return ModelSplit(_PreLogits(body), classifier)

    for attribute in _HEAD_ATTRIBUTES:
        candidate = model._modules.get(attribute)
        if candidate is None:
            continue
        path = [attribute]
        # An MLP classifier (torchvision MobileNet, VGG, ViT's heads): split before its last
        # Linear, so the hidden layers count as features.
        while isinstance(candidate, nn.Sequential) and len(candidate) > 0:
            last_name = list(candidate._modules)[-1]
            path.append(last_name)
            candidate = candidate._modules[last_name]
        if isinstance(candidate, nn.Linear):
            view = headless_view(model, path)
            return ModelSplit(_FirstTensor(view) if _is_hugging_face(model) else view, candidate)
        raise TypeError(
            _unsupported(
                model,
                f"its `{'.'.join(path)}` is {type(candidate).__name__}, not an nn.Linear",
            )
        )
    raise TypeError(_unsupported(model, "no known classifier attribute was found"))


def headless_view(model: nn.Module, path: list[str] | str) -> nn.Module:
    """A view of ``model`` with the sub-module at ``path`` replaced by ``nn.Identity``.

    The view is a new object of the model's class that shares every other sub-module,
    parameter and buffer with ``model`` (nothing is copied and ``model`` is not changed).
    Modules along ``path`` are viewed the same way, so ``"classifier.3"`` leaves
    ``model.classifier`` intact and gives the view a classifier whose last layer is
    ``Identity``. The view starts without hooks and with the model's train/eval mode.

    Args:
        model: any module.
        path: dotted name of the sub-module to drop, e.g. ``"fc"`` or ``["head", "fc"]``.

    Returns:
        The view, a module of the same class as ``model``.
    """
    if isinstance(path, str):
        path = path.split(".")
    if not path or path[0] not in model._modules:
        raise ValueError(f"`path` must name a sub-module of `model`, got {'.'.join(path)!r}")
    view = type(model).__new__(type(model))
    state = dict(model.__dict__)
    for key, value in state.items():
        # Hooks registered on the model act on its logits; they do not belong to the view.
        if "hook" in key and isinstance(value, dict):
            state[key] = type(value)()
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in state:
            state[key] = type(state[key])(state[key])
    view.__dict__.update(state)
    child = model._modules[path[0]]
    if child is None:  # registered as None: there is no sub-module to drop
        raise ValueError(f"`path` must name a sub-module of `model`, got {'.'.join(path)!r}")
    view._modules[path[0]] = nn.Identity() if len(path) == 1 else headless_view(child, path[1:])
    return view


def _check_linear(name: str, module: Any) -> None:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"`{name}` must be an nn.Linear, got {type(module).__name__}")


def _path_of(model: nn.Module, target: nn.Module) -> list[str]:
    for name, module in model.named_modules():
        if module is target and name:
            return name.split(".")
    raise ValueError(
        "`head` must be a sub-module of `model` (it is used to split the model), "
        f"got a {type(target).__name__} that is not part of {type(model).__name__}"
    )


def _unsupported(model: nn.Module, reason: str) -> str:
    return (
        f"cannot split a {type(model).__name__} into features and head: {reason}. "
        "Pass the split explicitly: split_model(model, features=<module mapping x to "
        "[N, d] features>, head=<nn.Linear(d, K)>), or head=<its final nn.Linear> alone "
        "if calling that layer is the last step of model.forward"
    )
