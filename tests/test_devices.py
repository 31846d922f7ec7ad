"""The device rule of :mod:`selmix.devices`: tensors leave the run's device through
``to_host`` only, and the test mode that runs the suite on another device."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from selmix.devices import HOST, state_to_host, to_host
from selmix.engine.evaluate import Evaluation, summarize

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "selmix"

#: Where ``.cpu()`` may still be called, by module and function, and why: each of these
#: tensors is host data from the start (labels, indices, a user's counts), so the call
#: only normalises an input that a caller may have put on a GPU. Everything that leaves
#: the run's device goes through ``selmix.devices.to_host``.
HOST_DATA = {
    "selmix/_validation.py": {"check_labels": "labels"},
    "selmix/core/metrics.py": {"infer_head_classes": "training labels"},
    "selmix/core/mixing.py": {"second_labels": "labels and the pairs' indices"},
    "selmix/core/sampler.py": {"__init__": "training labels"},
    "selmix/engine/feedback.py": {"__init__": "training labels"},
    "selmix/finetune/build.py": {"build_run": "training and validation labels"},
    "selmix/finetune/head_init.py": {"_candidate_heads": "training labels"},
    "selmix/finetune/run_state.py": {"_labels_digest": "labels (their fingerprint)"},
    "selmix/engine/distributed.py": {"__init__": "shard indices", "_positions": "indices"},
    "selmix/baselines/crt.py": {"label_aware_smoothing": "a user's class counts"},
    "selmix/baselines/posthoc.py": {"class_log_prior": "a user's prior"},
}


def _cpu_calls(path: Path) -> list[tuple[str, int]]:
    """``(enclosing function, line)`` of every ``x.cpu()`` call in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "cpu"
        ):
            found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_tensors_leave_the_device_through_to_host_only():
    stray = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if relative == "selmix/devices.py" or relative.startswith("selmix/data/"):
            continue  # the boundary itself; the data layer is host-side by design
        allowed = HOST_DATA.get(relative, {})
        stray += [
            f"{relative}:{line} in {function}()"
            for function, line in _cpu_calls(path)
            if function not in allowed
        ]
    assert not stray, (
        "tensors moved to the CPU outside selmix.devices.to_host (see that module's rule): "
        + ", ".join(stray)
    )


def test_the_allow_list_names_only_places_that_still_call_cpu():
    # an entry whose call went away must go too, or the list stops saying anything
    for relative, functions in HOST_DATA.items():
        calls = {function for function, _ in _cpu_calls(PACKAGE.parent / relative)}
        assert set(functions) <= calls, f"{relative}: {set(functions) - calls} call no .cpu()"


def test_to_host_detaches_every_tensor_of_a_nested_structure(device):
    weight = torch.ones(2, 3, device=device, requires_grad=True)
    value = {"a": [weight * 2, (weight.sum(), 5)], "b": "text", "c": None}
    moved = to_host(value)
    assert moved["a"][0].device == HOST and not moved["a"][0].requires_grad
    assert moved["a"][1][0].device == HOST and moved["a"][1][1] == 5
    assert isinstance(moved["a"][1], tuple) and moved["b"] == "text" and moved["c"] is None
    assert torch.equal(moved["a"][0], torch.full((2, 3), 2.0))


def test_state_to_host_is_a_copy_that_training_does_not_change(device):
    layer = nn.Linear(3, 2).to(device)
    saved = state_to_host(layer)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert all(tensor.device == HOST for tensor in saved.values())
    assert torch.allclose(saved["weight"] + 1.0, layer.weight.detach().cpu())


def test_an_evaluation_of_device_sums_is_on_the_host(device):
    # the sums of a batch on the run's device (class counts on another device, as the
    # frozen view once had them) make one host evaluation with the right class means
    features = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]], device=device)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], device=device)
    labels = torch.tensor([0, 0, 1], device=device)
    counts, feature_sums, class_counts, soft = summarize(features, logits, labels, 2)
    evaluation = Evaluation.from_sums((counts, feature_sums, class_counts.cpu(), soft))
    for tensor in (evaluation.counts, evaluation.prototypes, evaluation.class_counts):
        assert tensor.device == HOST
    assert evaluation.counts.tolist() == [[1, 1], [0, 1]]
    assert torch.allclose(evaluation.prototypes, torch.tensor([[2.0, 1.0], [0.0, 4.0]]))


def test_the_device_option_names_a_device_of_this_machine(device, pytestconfig):
    assert torch.device(device).type == torch.device(pytestconfig.getoption("--device")).type
    assert torch.zeros(1, device=device).device.type == torch.device(device).type


@pytest.mark.gpu
def test_gpu_tests_run_only_in_the_gpu_mode(device):
    assert torch.device(device).type == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("first, second", [("cpu", "cuda"), ("cuda", "cpu")])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "whole-model"])
def test_a_run_checkpointed_on_one_device_resumes_on_the_other(
    first, second, frozen, tmp_path, monkeypatch
):
    import copy

    from selmix.data import load_demo
    from selmix.finetune import finetune
    from selmix.models import create_model
    from selmix.models.checkpoint import load_checkpoint

    demo = load_demo()
    train = demo.train.subset(torch.arange(0, len(demo.train.labels), 8))
    torch.manual_seed(0)
    start = create_model("small_cnn", 10, in_channels=1)
    settings = dict(
        objective="min_recall", steps=12, batch_size=32, feedback_every=5, checkpoint_every=4,
        progress=False, frozen_backbone=frozen, checkpoint_path=str(tmp_path / "run.pt"),
        **({} if frozen else {"head_first_steps": 6}),
    )  # fmt: skip
    original_step, calls = torch.optim.SGD.step, {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # during step 10, after the checkpoint of step 8
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(copy.deepcopy(start), train, demo.val, device=first, **settings)
    monkeypatch.setattr(torch.optim.SGD, "step", original_step)
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 8
    resumed = finetune(
        copy.deepcopy(start), train, demo.val, device=second, resume=tmp_path / "run.pt",
        **settings,
    )  # fmt: skip
    assert resumed.last_step == 12 and [r["step"] for r in resumed.history][:2] == [0, 5]
    assert next(resumed.model.parameters()).device.type == torch.device(second).type
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
