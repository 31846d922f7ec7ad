"""Tests of selmix.models: the registry, the built-in backbones and split_model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from selmix.models import (
    FeatureClassifier,
    ModelSplit,
    create_model,
    headless_view,
    list_models,
    register_model,
    split_model,
)
from selmix.models import registry as registry_module

torch.set_num_threads(1)


@pytest.fixture
def clean_registry():
    """Removes whatever a test registers, so tests do not leak names into each other."""
    before = dict(registry_module._MODELS)
    yield
    registry_module._MODELS.clear()
    registry_module._MODELS.update(before)


def assert_split_matches(model: nn.Module, split: ModelSplit, x: torch.Tensor) -> None:
    model.eval()
    split.features.eval()
    with torch.no_grad():
        expected = model(x)
        got = split.head(split.features(x))
    assert isinstance(split.head, nn.Linear)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def assert_parameters_partitioned(model: nn.Module, split: ModelSplit) -> None:
    """Features and head share the model's parameters, each exactly once."""
    features = {id(p) for p in split.features.parameters()}
    head = {id(p) for p in split.head.parameters()}
    assert not features & head
    assert features | head == {id(p) for p in model.parameters()}


# --------------------------------------------------------------------------------------------
# Registry


def test_builtin_models_are_registered():
    assert {"resnet32", "wrn28_2", "small_cnn"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_create_model_rejects_unknown_names_and_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet33'.*'resnet32'.*'wrn28_2'"):
        create_model("resnet33", 10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 1}, ValueError, r"`num_classes` must be >= 2, got 1"),
        ({"num_classes": 2.5}, TypeError, r"`num_classes` must be an int, got float"),
        ({"num_classes": 10, "in_channels": 0}, ValueError, r"`in_channels` must be >= 1, got 0"),
    ],
)
def test_create_model_validates_sizes(kwargs, error, match):
    with pytest.raises(error, match=match):
        create_model("small_cnn", **kwargs)


def test_register_model_adds_a_constructor_and_refuses_duplicates(clean_registry):
    @register_model
    def tiny_test_net(num_classes: int, in_channels: int = 3, hidden: int = 4) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 4, hidden), nn.Linear(hidden, num_classes)
        )

    @register_model(name="tiny-test-net-2")
    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        return nn.Linear(in_channels, num_classes)

    assert {"tiny_test_net", "tiny-test-net-2"} <= set(list_models())
    model = create_model("tiny_test_net", 5, in_channels=1, hidden=7)
    assert model[1].out_features == 7 and model[2].out_features == 5
    assert create_model("tiny-test-net-2", 3, in_channels=2).weight.shape == (3, 2)
    with pytest.raises(ValueError, match="'tiny_test_net' is already registered"):
        register_model(tiny_test_net)


# --------------------------------------------------------------------------------------------
# Built-in architectures


@pytest.mark.parametrize(
    ("name", "in_channels", "size", "dim"),
    [
        ("resnet32", 3, 32, 64),
        ("wrn28_2", 3, 32, 128),
        ("small_cnn", 3, 32, 128),
        ("small_cnn", 1, 28, 128),
        ("resnet32", 1, 28, 64),
    ],
)
def test_builtin_models_have_features_and_head(name, in_channels, size, dim):
    model = create_model(name, num_classes=7, in_channels=in_channels).eval()
    x = torch.randn(3, in_channels, size, size)
    assert isinstance(model, FeatureClassifier)
    assert model.num_features == dim
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (dim, 7)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (3, dim)
        torch.testing.assert_close(model(x), model.head(features))


def test_resnet32_has_the_papers_layout_and_parameter_count():
    model = create_model("resnet32", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 1 stem conv + 3 stages x 5 blocks x 2 convs, no 1x1 projection with option A.
    assert len(convs) == 31
    assert [c.out_channels for c in convs[1::10]] == [16, 32, 64]
    conv = 3 * 16 * 9 + 10 * 16 * 16 * 9 + (16 * 32 + 9 * 32 * 32) * 9 + (32 * 64 + 9 * 64 * 64) * 9
    batch_norm = 2 * (16 + 10 * 16 + 10 * 32 + 10 * 64)
    linear = 64 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == conv + batch_norm + linear


def test_resnet32_option_a_shortcut_zero_pads_and_option_b_projects():
    model_a = create_model("resnet32", 10)
    block = model_a.features.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 32, 4, 4)
    torch.testing.assert_close(shortcut[:, 8:24], x[:, :, ::2, ::2])
    assert shortcut[:, :8].abs().sum() == 0 and shortcut[:, 24:].abs().sum() == 0

    model_b = create_model("resnet32", 10, shortcut="B")
    one_by_one = [
        m for m in model_b.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert len(one_by_one) == 2
    with pytest.raises(ValueError, match=r"unknown `shortcut` 'C'"):
        create_model("resnet32", 10, shortcut="C")


def test_wrn28_2_follows_fixmatch():
    model = create_model("wrn28_2", 10)
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(bn.momentum == 0.001 for bn in batch_norms)
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}
    assert [len(getattr(model.features, f"block{g}")) for g in (1, 2, 3)] == [4, 4, 4]
    assert model.features.block1[0].activate_before_residual
    assert not model.features.block2[0].activate_before_residual
    # WRN-28-2 has about 1.47M parameters.
    assert 1_400_000 < sum(p.numel() for p in model.parameters()) < 1_500_000


def test_small_cnn_is_small():
    model = create_model("small_cnn", 10, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) < 150_000


# --------------------------------------------------------------------------------------------
# split_model


class ToyTimm(nn.Module):
    """A timm-style model: forward_features, forward_head(pre_logits=...), get_classifier."""

    def __init__(self, nested: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU())
        self.norm = nn.LayerNorm(8)
        self.nested = nested
        if nested:  # like ConvNeXt: the Linear is head.fc
            self.head = nn.Sequential()
            self.head.add_module("drop", nn.Dropout(0.5))
            self.head.add_module("fc", nn.Linear(8, 5))
        else:
            self.head = nn.Linear(8, 5)

    def get_classifier(self) -> nn.Module:
        return self.head.fc if self.nested else self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ToyClassifierAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.scale * self.body(x).flatten(1))


def test_split_builtin_model_returns_its_own_modules():
    model = create_model("small_cnn", 4, in_channels=1)
    split = split_model(model)
    assert split.features is model.features and split.head is model.head
    features, head = split  # unpacks like a tuple
    assert head is model.head
    assert_split_matches(model, split, torch.randn(2, 1, 28, 28))


def test_split_torchvision_resnet_shares_parameters_without_changing_the_model():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    original_fc = model.fc
    split = split_model(model)
    assert model.fc is original_fc and isinstance(model.fc, nn.Linear)
    assert split.head is original_fc
    assert split.features(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert_split_matches(model, split, torch.randn(2, 3, 32, 32))
    assert_parameters_partitioned(model, split)
    expected_keys = {k for k in model.state_dict() if not k.startswith("fc.")}
    assert set(split.features.state_dict()) == expected_keys


def test_training_the_split_trains_the_users_model():
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    split = split_model(model)
    before = model.conv1.weight.detach().clone()
    head_before = model.fc.weight.detach().clone()
    optimiser = torch.optim.SGD(
        list(split.features.parameters()) + list(split.head.parameters()), lr=0.1
    )
    loss = split.head(split.features(torch.randn(4, 3, 32, 32))).square().mean()
    loss.backward()
    optimiser.step()
    assert not torch.equal(model.conv1.weight, before)
    assert not torch.equal(model.fc.weight, head_before)


def test_split_torchvision_mobilenet_splits_before_the_last_linear():
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=6)
    split = split_model(model)
    assert split.head is model.classifier[3]
    assert isinstance(model.classifier[3], nn.Linear)  # the user's model is intact
    assert split.features.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1024)
    assert_split_matches(model, split, torch.randn(2, 3, 64, 64))
    assert_parameters_partitioned(model, split)


@pytest.mark.parametrize("nested", [False, True])
def test_split_timm_style_model_uses_pre_logits(nested):
    model = ToyTimm(nested=nested)
    split = split_model(model)
    assert split.head is model.get_classifier()
    assert split.features(torch.randn(2, 3, 8, 8)).shape == (2, 8)
    assert_split_matches(model, split, torch.randn(2, 3, 8, 8))
    assert_parameters_partitioned(model, split)


def test_split_model_with_classifier_attribute_keeps_top_level_parameters():
    model = ToyClassifierAttribute()
    split = split_model(model)
    assert split.head is model.classifier
    assert any(p is model.scale for p in split.features.parameters())
    assert_split_matches(model, split, torch.randn(2, 3, 6, 6))
    assert_parameters_partitioned(model, split)


def test_split_sequential_ending_in_linear():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    split = split_model(model)
    assert split.head is model[3]
    assert_split_matches(model, split, torch.randn(5, 3, 2, 2))
    assert_parameters_partitioned(model, split)


def test_split_explicit_features_and_head():
    features = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.Tanh())
    head = nn.Linear(4, 2)
    model = nn.Sequential(features, head)
    split = split_model(model, features=features, head=head)
    assert split.features is features and split.head is head
    assert_split_matches(model, split, torch.randn(3, 8))
    assert split_model(None, features=features, head=head).head is head


def test_split_with_head_alone_cuts_the_model_before_it():
    model = ToyClassifierAttribute()
    split = split_model(model, head=model.classifier)
    assert_split_matches(model, split, torch.randn(2, 3, 6, 6))
    assert_parameters_partitioned(model, split)


def test_headless_view_has_no_hooks_and_keeps_the_mode():
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    view = headless_view(model, "fc")
    assert type(view) is type(model) and not view.training
    view(torch.randn(1, 3, 32, 32))
    assert calls == []
    model(torch.randn(1, 3, 32, 32))
    assert calls == [torch.Size([1, 4])]
    with pytest.raises(ValueError, match="`path` must name a sub-module"):
        headless_view(model, "nope")


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        (nn.Conv2d(3, 3, 1), {}, TypeError, r"cannot split a Conv2d.*features=.*head="),
        (nn.Sequential(nn.Linear(2, 2), nn.ReLU()), {}, TypeError, "must end in an nn.Linear"),
        (nn.Sequential(nn.Linear(2, 2)), {"features": nn.ReLU()}, ValueError, "without `head`"),
        (
            nn.Sequential(nn.Linear(2, 2)),
            {"head": nn.ReLU()},
            TypeError,
            "`head` must be an nn.Linear, got ReLU",
        ),
        (
            nn.Sequential(nn.ReLU(), nn.Linear(2, 2)),
            {"head": nn.Linear(2, 2)},
            ValueError,
            "sub-module of `model`",
        ),
        ("resnet", {}, TypeError, "`model` must be a torch.nn.Module, got str"),
        (None, {}, ValueError, "`model` is None"),
    ],
)
def test_split_model_errors(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        split_model(model, **kwargs)


def test_split_rejects_a_classifier_attribute_that_is_not_linear():
    model = ToyClassifierAttribute()
    model.classifier = nn.Conv2d(4, 3, 1)
    with pytest.raises(TypeError, match=r"its `classifier` is Conv2d, not an nn.Linear.*head="):
        split_model(model)


def test_split_rejects_a_timm_model_whose_classifier_is_not_linear():
    model = ToyTimm()
    model.head = nn.Identity()
    with pytest.raises(TypeError, match=r"get_classifier\(\) returns Identity"):
        split_model(model)


# --------------------------------------------------------------------------------------------
# Real timm and Hugging Face models (optional dependencies; the `dev` extra installs them)

# Small settings so that three fine-tuning steps take about a second on a CPU.
TIMM_MODELS = {
    "timm:resnet18": {},
    "timm:vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2},
}
HF_MODELS = {
    "hf_vit": {
        "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64,
    },
    "hf_convnext": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2},
}  # fmt: skip


def _external_model(name: str, num_classes: int = 4) -> nn.Module:
    pytest.importorskip("timm" if name.startswith("timm:") else "transformers")
    torch.manual_seed(0)
    return create_model(name, num_classes, **{**TIMM_MODELS, **HF_MODELS}[name])


def _tiny_images(num_classes: int = 4, per_class: int = 6):
    from selmix.data import ImageTensorDataset

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randint(0, 256, (labels.numel(), 3, 32, 32), dtype=torch.uint8,
                           generator=generator)  # fmt: skip
    return ImageTensorDataset(images, labels, 0.5, 0.25)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from selmix.models import output_tensor

    model.eval()
    with torch.no_grad():
        return output_tensor(model(x))


@pytest.mark.parametrize("name", [*TIMM_MODELS, *HF_MODELS])
def test_real_timm_and_hugging_face_models_split_into_tensor_features_and_linear_head(name):
    model = _external_model(name)
    split = split_model(model)
    x = _tiny_images().batch(range(3))[0]
    features = split.features.eval()(x)
    assert isinstance(features, torch.Tensor)  # not a Hugging Face output object
    assert features.shape == (3, split.head.in_features)
    assert split.head.out_features == 4
    torch.testing.assert_close(split.head(features), _logits(model, x), rtol=1e-5, atol=1e-5)
    assert_parameters_partitioned(model, split)


@pytest.mark.parametrize("name", [*TIMM_MODELS, *HF_MODELS])
def test_real_models_fine_tune_three_steps_and_round_trip_through_save_and_load(name, tmp_path):
    from selmix import finetune, load_model

    model = _external_model(name)
    data = _tiny_images()
    head_before = split_model(model).head.weight.detach().clone()
    result = finetune(model, data, data, "mean_recall", steps=3, batch_size=8,
                      feedback_every=2, progress=False, augment=False,
                      select="last")  # fmt: skip  # the trained weights, not the best step
    assert result.model is model
    assert not torch.equal(split_model(model).head.weight, head_before)  # it trained
    path = result.save(tmp_path / "model.pt")
    loaded, meta = load_model(path)
    assert loaded.selmix_spec["name"] == name
    assert "finetune_config" in meta
    x = data.batch(range(5))[0]
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x))


def test_hugging_face_model_built_directly_splits_and_reloads_from_its_state_dict(tmp_path):
    """The route for a model that did not come from the registry (e.g. pre-trained)."""
    transformers = pytest.importorskip("transformers")
    from selmix import load_model, save_model
    from selmix.models.checkpoint import load_checkpoint

    config = transformers.ConvNextConfig(num_labels=3, **HF_MODELS["hf_convnext"])
    model = transformers.ConvNextForImageClassification(config)
    split = split_model(model)
    x = _tiny_images().batch(range(2))[0]
    torch.testing.assert_close(split.head(split.features.eval()(x)), _logits(model, x))
    path = save_model(tmp_path / "model.pt", model)
    with pytest.raises(ValueError, match="not built by selmix.create_model"):
        load_model(path)
    fresh = transformers.ConvNextForImageClassification(config)
    fresh.load_state_dict(load_checkpoint(path)["state_dict"])
    torch.testing.assert_close(_logits(fresh, x), _logits(model, x))


def test_hugging_face_model_without_a_linear_classifier_gets_the_explicit_split_advice():
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(num_labels=0, **HF_MODELS["hf_convnext"])
    model = transformers.ConvNextForImageClassification(config)  # classifier = Identity
    with pytest.raises(TypeError, match=r"`classifier` is Identity.*features=.*head="):
        split_model(model)


def test_timm_names_are_validated_before_timm_is_asked():
    with pytest.raises(ValueError, match="needs an architecture"):
        create_model("timm:", 3)
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        create_model("timm:no_such_net", 3)
    with pytest.raises(ValueError, match="`pretrained` must not be passed"):
        create_model("timm:resnet18", 3, pretrained=True)


def test_linear_model_is_a_head_on_feature_vectors():
    model = create_model("linear", 5, in_channels=12)
    features, head = split_model(model)
    assert isinstance(features, nn.Identity)
    assert (head.in_features, head.out_features) == (12, 5)
    x = torch.randn(7, 12)
    torch.testing.assert_close(model(x), head(x))


@pytest.mark.parametrize(
    ("name", "package"), [("timm:resnet18", "timm"), ("hf_vit", "transformers")]
)
def test_external_models_without_their_package_name_the_extra(monkeypatch, name, package):
    import sys

    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=rf"pip install 'selmix\[{package}\]'"):
        create_model(name, 3)


@pytest.mark.parametrize(
    "name, parts",
    [("resnet32", (None, None)), ("timm:resnet18", ("resnet18", None)),
     ("torchvision:resnet50", (None, "resnet50"))],
)  # fmt: skip
def test_check_model_name_splits_the_prefixes_without_building(name, parts):
    assert registry_module.check_model_name(name) == parts


@pytest.mark.parametrize("name", ["resnet9000", "timm:", "torchvision:"])
def test_check_model_name_refuses_what_create_model_refuses(name):
    with pytest.raises(ValueError) as checked:
        registry_module.check_model_name(name)
    with pytest.raises(ValueError) as created:
        create_model(name, 10)
    assert str(checked.value) == str(created.value)
