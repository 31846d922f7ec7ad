"""Other mixups under the SelMix policy (selmix.core.mixing; issue 25): input mixup and CutMix.

The operations alone (what they mix, the box and its area, the lambda range, the loss
weights), then in a run: the head-first phase mixes features and the backbone phase the
chosen mix, the loss the Trainer takes is the one the rule defines, a frozen backbone
refuses an input-space mix, a seeded run repeats and resumes bit-exactly, the CLI records
the setting, 2 torchrun ranks stay in sync and streamed data gives the in-memory run.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

import selmix
from selmix.core.mixing import (
    CutMix,
    InputMixup,
    MixedBatch,
    box_mask,
    check_mixed_batch,
    cutmix_boxes,
    get_mixup,
    list_mixups,
    mixed_cross_entropy,
    register_mixup,
    second_labels,
)
from selmix.engine.distributed import init_from_env
from selmix.finetune import FinetuneConfig, Trainer, finetune
from selmix.models import create_model
from selmix.models.checkpoint import load_checkpoint, save_model
from test_distributed import (  # noqa: F401 - one_thread is an autouse fixture
    NUM_CLASSES,
    RUN,
    _finetune,
    _free_port,
    _make_data,
    _model,
    _weights,
    one_thread,
)

# the whole model after a 4-step head-first phase on cached features
# the model's own head: the tests count optimiser steps, and head_init="auto" takes some
BACKBONE = {
    "frozen_backbone": False, "head_first_steps": 4, "steps": 10, "feedback_every": 3,
    "batch_size": 16, "augment": True, "head_init": "none",
    "backbone_feedback_every": 2,  # feedback at 4, 6, 8, 10 in the backbone phase
}  # fmt: skip


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return _make_data()


@pytest.fixture(scope="module")
def start_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The briefly pre-trained start of tests/test_distributed.py, saved to a file."""
    from selmix.engine.pretrain import pretrain

    torch.manual_seed(0)
    model = create_model("small_cnn", NUM_CLASSES, in_channels=1)
    pretrain(model, _make_data()["train"], None, epochs=4, batch_size=32, lr=0.05,
             augment=False, progress=False)  # fmt: skip
    path = tmp_path_factory.mktemp("mixing") / "start.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def start(start_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(start_file, weights_only=True)


class Recorder:
    """A mixup operation that records its calls and delegates to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, first, second, lam, generator):
        mixed = self.inner(first, second, lam, generator)
        self.calls.append({"first": first, "second": second, "lam": lam.clone(), "out": mixed})
        return mixed

    def __repr__(self) -> str:
        return f"Recorder({self.inner!r})"


def _register(name: str, operation: Any) -> str:
    register_mixup(name, operation, replace=True)
    return name


# -- the operations alone ---------------------------------------------------------------------
def test_input_mixup_blends_the_images_with_lam():
    first, second = torch.zeros(5, 1, 4, 4), torch.ones(5, 1, 4, 4)
    lam = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.5])
    for labels in ("first", "mixed"):
        mixed = InputMixup(labels)(first, second, lam, torch.Generator())
        # x1 = 0, x2 = 1: every pixel is 1 - lam
        torch.testing.assert_close(mixed.inputs, (1 - lam)[:, None, None, None].expand(5, 1, 4, 4))
        if labels == "first":
            assert mixed.first_weight is None
        else:
            assert torch.equal(mixed.first_weight, lam)
    with pytest.raises(ValueError, match="`labels` must be one of"):
        InputMixup("area")


def test_cutmix_pastes_one_box_whose_share_is_the_first_weight():
    generator = torch.Generator().manual_seed(0)
    first = torch.zeros(200, 3, 28, 30)
    second = torch.ones(200, 3, 28, 30)
    lam = 0.6 + 0.4 * torch.rand(200, generator=generator)
    mixed = CutMix("mixed")(first, second, lam, generator)
    pasted = mixed.inputs.mean(dim=(1, 2, 3))  # the share of x2's pixels, counted
    torch.testing.assert_close(mixed.first_weight, 1 - pasted)
    # the box is one rectangle, the same in every channel
    for image in mixed.inputs[:20]:
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        rows, cols = image[0].nonzero(as_tuple=True)
        if rows.numel():
            height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert height * width == rows.numel()
    assert CutMix()(first, second, lam, generator).first_weight is None
    with pytest.raises(ValueError, match=r"Tensor\[B, C, H, W\]"):
        CutMix()(torch.zeros(2, 5), torch.zeros(2, 5), lam[:2], generator)


def test_cutmix_box_sides_follow_sqrt_of_one_minus_lam_before_clipping():
    generator = torch.Generator().manual_seed(1)
    lam = torch.tensor([0.96, 0.84, 0.75, 0.64, 0.6, 1.0]).repeat(300)
    boxes, share = cutmix_boxes(lam, 28, 32, generator)
    heights, widths = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    for value in lam.unique().tolist():
        rows = lam == value
        side_h, side_w = (
            math.floor(28 * math.sqrt(1 - value)),
            math.floor(32 * math.sqrt(1 - value)),
        )
        # clipping only shrinks; boxes away from the border have the full sides
        assert (heights[rows] <= side_h).all() and (widths[rows] <= side_w).all()
        assert ((heights[rows] == side_h) & (widths[rows] == side_w)).any()
    assert (share[lam == 1.0] == 1.0).all()  # lam = 1: an empty box
    torch.testing.assert_close(share, 1 - (heights * widths).float() / (28 * 32))
    mask = box_mask(boxes, 28, 32)
    torch.testing.assert_close(share, 1 - mask.float().mean(dim=(1, 2, 3)))


def test_cutmix_centres_are_uniform_and_boxes_are_clipped():
    # lam = 0.75: a 14 x 14 box from row c - 7 to c + 7 with c uniform in 0..27. It covers
    # pixel (0, 0) when c <= 7 in both axes, (8/28)^2; the centre pixel when
    # 8 <= c <= 21, (14/28)^2
    draws = 20000
    boxes, _ = cutmix_boxes(torch.full((draws,), 0.75), 28, 28, torch.Generator().manual_seed(2))
    mask = box_mask(boxes, 28, 28)[:, 0]
    for (row, col), expected in (
        ((0, 0), (8 / 28) ** 2),
        ((14, 14), 0.25),
        ((27, 27), (7 / 28) ** 2),
    ):
        observed = float(mask[:, row, col].float().mean())
        spread = math.sqrt(expected * (1 - expected) / draws)
        assert abs(observed - expected) < 5 * spread, (row, col, observed, expected)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] <= 28).all()


def test_mixed_cross_entropy_weights_the_two_labels():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=generator)
    label_i, label_j = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 2, 1, 0, 2, 3])
    assert torch.equal(
        mixed_cross_entropy(logits, label_i, label_j, None), F.cross_entropy(logits, label_i)
    )
    weight = torch.tensor([1.0, 0.0, 0.5, 0.7, 0.2, 0.9])
    per_pair = [
        -(w * torch.log_softmax(z, 0)[i] + (1 - w) * torch.log_softmax(z, 0)[j])
        for z, i, j, w in zip(logits, label_i, label_j, weight, strict=True)
    ]
    torch.testing.assert_close(
        mixed_cross_entropy(logits, label_i, lambda: label_j, weight), torch.stack(per_pair).mean()
    )
    # label j is only computed when the weights need it
    mixed_cross_entropy(logits, label_i, lambda: pytest.fail("label j asked for"), None)


def test_second_labels_read_the_pool_of_each_second_sample():
    train_labels = torch.tensor([0, 0, 1, 2, 3])
    pseudo = torch.tensor([3, 2, 1])
    second = torch.tensor([4, 2, 0, 1])
    from_unlabelled = torch.tensor([False, True, False, True])
    assert second_labels(train_labels, pseudo, second, from_unlabelled).tolist() == [3, 1, 0, 2]
    with pytest.raises(ValueError, match="pseudo_labels"):
        second_labels(train_labels, None, second, from_unlabelled)


def test_register_mixup_and_the_checks_of_an_operation():
    assert list_mixups()[:3] == ["feature", "input", "cutmix"]
    assert get_mixup("feature") is None
    with pytest.raises(ValueError, match="unknown `mixup` 'saliency'"):
        get_mixup("saliency")
    with pytest.raises(ValueError, match="built-in"):
        register_mixup("cutmix", CutMix())
    with pytest.raises(TypeError, match="callable"):
        register_mixup("not_callable_mix", 3)

    @register_mixup("test_decorated_mix", replace=True)
    def halves(first, second, lam, generator):
        return MixedBatch(torch.cat([first[: len(first) // 2], second[len(first) // 2 :]]))

    assert get_mixup("test_decorated_mix") is halves
    with pytest.raises(ValueError, match="already registered"):
        register_mixup("test_decorated_mix", halves)
    with pytest.raises(ValueError, match="unknown `mixup` 'puzzlemix'; expected one of 'feature'"):
        FinetuneConfig(mixup="puzzlemix", frozen_backbone=False)
    first = torch.zeros(4, 2)
    with pytest.raises(TypeError, match="MixedBatch"):
        check_mixed_batch(first, first, "op")
    with pytest.raises(ValueError, match="4 rows"):
        check_mixed_batch(MixedBatch(first[:3]), first, "op")
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        check_mixed_batch(MixedBatch(first, torch.full((4,), 1.5)), first, "op")


def test_a_frozen_backbone_refuses_an_input_space_mix():
    for mixup in ("input", "cutmix"):
        with pytest.raises(ValueError, match="`mixup` = .* `frozen_backbone` is true"):
            FinetuneConfig(mixup=mixup)
    FinetuneConfig(mixup="cutmix", frozen_backbone=False)
    FinetuneConfig.from_dict({"preset": "paper", "mixup": "input"})  # the paper's whole model
    assert FinetuneConfig().mixup == "feature" and "mixup" in FinetuneConfig.run_fields()


# -- in a run ---------------------------------------------------------------------------------
def test_head_phase_mixes_features_and_the_backbone_phase_the_inputs(data, start):
    recorder = Recorder(InputMixup())
    name = _register("test_recorded_input", recorder)
    config = FinetuneConfig(**{**RUN, **BACKBONE, "mixup": name, "lam_min": 0.7})
    trainer = Trainer(_model(start), data["train"], data["val"], None, config)
    drawn: list[tuple[torch.Tensor, ...]] = []
    sample = trainer.sampler.sample

    def spy(*args: Any) -> Any:
        drawn.append(sample(*args))
        return drawn[-1]

    trainer.sampler.sample = spy  # type: ignore[method-assign]
    trainer.run()
    assert len(recorder.calls) == config.steps - config.head_first == 6
    lam = torch.cat([call["lam"] for call in recorder.calls])
    assert lam.shape == (6 * 16,) and lam.min() >= 0.7 and lam.max() <= 1.0
    assert lam.std() > 0.05  # a draw per pair, not one per batch
    # the operation receives the images of the drawn pairs, x1 of class i and x2 of class j
    for call, (first, _, _, labels) in zip(recorder.calls, drawn[4:], strict=True):
        assert torch.equal(data["train"].labels[first], labels)
        assert call["first"].shape == (16, 1, 8, 8)
        assert not torch.equal(call["first"], call["second"])


def test_the_loss_of_a_step_is_the_rule_s_loss(data, start):
    # an operation that keeps only x2 with first_weight 0: the step's loss must be the
    # cross-entropy of x2's logits with label j, the class x2 was drawn from
    recorder = Recorder(lambda first, second, lam, generator: MixedBatch(second, lam * 0))
    name = _register("test_second_only", recorder)
    config = FinetuneConfig(**{**RUN, **BACKBONE, "mixup": name, "head_first_steps": 0})
    trainer = Trainer(_model(start), data["train"], data["val"], None, config)
    drawn: list[tuple[torch.Tensor, ...]] = []
    sample = trainer.sampler.sample
    trainer.sampler.sample = lambda *a: drawn.append(sample(*a)) or drawn[-1]  # type: ignore
    before = copy.deepcopy(trainer.model).eval()
    loss = trainer.train_step()
    _, second, _, _ = drawn[0]
    with torch.no_grad():
        expected = F.cross_entropy(
            before(recorder.calls[0]["second"]), data["train"].labels[second]
        )
    assert loss == pytest.approx(float(expected), rel=1e-6)
    assert not torch.equal(data["train"].labels[second], drawn[0][3])  # j differs from i


def test_a_bad_operation_is_named_in_the_error(data, start):
    name = _register("test_bad_rows", lambda first, second, lam, generator: MixedBatch(first[:2]))
    with pytest.raises(ValueError, match="test_bad_rows|16 rows"):
        finetune(_model(start), data["train"], data["val"], **{**RUN, **BACKBONE, "mixup": name})


@pytest.mark.parametrize("mixup", ["input", "cutmix"])
def test_seeded_run_repeats_and_resumes_bit_exactly(data, start, tmp_path, monkeypatch, mixup):
    settings = {**RUN, **BACKBONE, "mixup": mixup, "checkpoint_every": 3, "seed": 5}
    runs = []
    for name in ("a", "b"):
        model = _model(start)
        result = finetune(
            model, data["train"], data["val"], checkpoint_path=str(tmp_path / f"{name}.pt"),
            **settings,
        )  # fmt: skip
        runs.append((model, result))
    (model_a, result_a), (model_b, _) = runs
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    assert not torch.equal(
        model_a.features.block1[0].weight, _model(start).features.block1[0].weight
    )

    calls = {"n": 0}
    original_step = torch.optim.SGD.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # dies in step 8, after the checkpoint of step 6 (backbone phase)
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(_model(start), data["train"], data["val"],
                 checkpoint_path=str(tmp_path / "c.pt"), **settings)  # fmt: skip
    monkeypatch.setattr(torch.optim.SGD, "step", original_step)
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["step"] == 6 and state["config"]["mixup"] == mixup
    resumed = _model(start)
    result = finetune(
        resumed, data["train"], data["val"], checkpoint_path=str(tmp_path / "c.pt"),
        resume=tmp_path / "c.pt", **settings,
    )  # fmt: skip
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert result.history[-1]["metrics"] == result_a.history[-1]["metrics"]
    # another mix is another run
    other = "cutmix" if mixup == "input" else "input"
    with pytest.raises(ValueError, match=f"mixup: '{mixup}' -> '{other}'"):
        finetune(_model(start), data["train"], data["val"], resume=tmp_path / "c.pt",
                 **{**settings, "mixup": other})  # fmt: skip


def test_the_mix_changes_the_run_and_old_checkpoints_resume_as_feature(data, start, tmp_path):
    results = {}
    for mixup in ("feature", "input", "cutmix"):
        model = _model(start)
        finetune(model, data["train"], data["val"], mixup=mixup,
                 checkpoint_path=str(tmp_path / f"{mixup}.pt"), **{**RUN, **BACKBONE})  # fmt: skip
        results[mixup] = model.features.block1[0].weight.detach().clone()
    assert not torch.equal(results["feature"], results["input"])
    assert not torch.equal(results["input"], results["cutmix"])
    # a checkpoint written before the setting existed mixed features
    state = load_checkpoint(tmp_path / "feature.pt")
    del state["config"]["mixup"]
    selmix.finetune(_model(start), data["train"], data["val"], resume=state, **{**RUN, **BACKBONE})


def test_cli_fine_tunes_the_whole_model_with_each_mix_and_records_it(tmp_path, capsys):
    from selmix.cli import main
    from test_cli import COLOURS, QUIET, _write_tree

    tree = _write_tree(tmp_path / "images", COLOURS)
    torch.manual_seed(0)
    save_model(tmp_path / "start.pt", create_model("small_cnn", 3, in_channels=3))
    assert main(["finetune", "--help"]) == 0
    assert "--mixup NAME" in capsys.readouterr().out
    common = ["finetune", "--data", f"imagefolder:{tree}", "--val-per-class", "4",
              "--device", "cpu", "--checkpoint", str(tmp_path / "start.pt"), "--steps", "4",
              "--batch-size", "8", "--feedback-every", "2", *QUIET]  # fmt: skip
    backbone = ["--no-frozen-backbone", "--head-first-steps", "2"]
    for mixup in ("feature", "input", "cutmix"):
        out = tmp_path / mixup
        assert main([*common, *backbone, "--out", str(out), "--set", f"mixup={mixup}"]) == 0
        assert yaml.safe_load((out / "config.yaml").read_text())["mixup"] == mixup
    capsys.readouterr()
    # the default frozen backbone: one clear error
    assert main([*common, "--out", str(tmp_path / "x"), "--set", "mixup=cutmix"]) == 2
    err = capsys.readouterr().err
    assert "`mixup` = 'cutmix'" in err and "frozen_backbone" in err


# -- torchrun and streaming -------------------------------------------------------------------
def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """One rank of a CutMix run: gradients, sync and resume (as tests/test_distributed.py)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    out = Path(folder)
    context = init_from_env("cpu", timeout=120)
    try:
        start = torch.load(out / "start.pt", weights_only=True)
        data = _make_data()
        result: dict[str, Any] = {}
        # the whole-batch gradient of 32 CutMix inputs = the average of two half batches
        generator = torch.Generator().manual_seed(7)
        first, second = torch.randn(2, 32, 1, 8, 8, generator=generator)
        lam = 0.6 + 0.4 * torch.rand(32, generator=generator)
        mixed = CutMix()(first, second, lam, generator).inputs
        labels = torch.randint(0, NUM_CLASSES, (32,), generator=generator)
        reference = _model(start).eval()
        F.cross_entropy(reference(mixed), labels).backward()
        trainer = Trainer(_model(start), data["train"], data["val"], None,
                          FinetuneConfig(**{**RUN, **BACKBONE, "mixup": "cutmix",
                                            "head_first_steps": 0}),
                          distributed=context)  # fmt: skip
        part = slice(16 * rank, 16 * (rank + 1))
        trainer.model.eval()
        F.cross_entropy(trainer.view.train_module(mixed[part]), labels[part]).backward()
        result["gradient"] = max(
            float((a.grad - b.grad).abs().max())
            for a, b in zip(trainer.model.parameters(), reference.parameters(), strict=True)
        )
        checkpoint, keep = out / "state.pt", out / "step6.pt"

        def keep_step_6(trainer: Trainer) -> None:
            if trainer.step == 6 and context.is_main:
                keep.write_bytes(checkpoint.read_bytes())

        settings = {**BACKBONE, "mixup": "cutmix"}
        whole, snapshots = _finetune(
            context, start, data, after_feedback=keep_step_6, checkpoint_path=str(checkpoint),
            checkpoint_every=6, **settings,
        )  # fmt: skip
        result["snapshots"], result["weights"] = snapshots, _weights(whole)
        resumed, _ = _finetune(context, start, data, resume=keep, **settings)
        result["resumed"] = _weights(resumed)
        torch.save(result, out / f"mix_rank{rank}.pt")
    finally:
        context.destroy()


def test_cutmix_under_torchrun_with_two_processes(start_file: Path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this PyTorch build has no gloo backend")
    folder = start_file.parent
    processes = mp.start_processes(
        _worker, args=(2, _free_port(), str(folder)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not processes.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.terminate()
            pytest.fail("the 2 ranks did not finish within 240 s")
    ranks = [torch.load(folder / f"mix_rank{r}.pt", weights_only=False) for r in range(2)]
    assert max(rank["gradient"] for rank in ranks) < 1e-6
    first, second = ranks
    assert [s["step"] for s in first["snapshots"]] == [0, 3, 6, 8, 10]
    for a, b in zip(first["snapshots"], second["snapshots"], strict=True):
        for key in ("counts", "gain", "policy"):
            assert torch.equal(a[key], b[key]), (key, a["step"])
    for rank in ranks:
        for key, value in first["weights"].items():
            assert torch.equal(value, rank["weights"][key]), key  # in sync across ranks
            assert torch.equal(value, rank["resumed"][key]), key  # resumed = uninterrupted


def test_streamed_and_in_memory_cutmix_runs_agree(tmp_path):
    from selmix.data import load_data
    from test_streaming import SETTINGS, Recording, write_tree

    tree = write_tree(tmp_path / "tree", {"train": 16, "test": 4}, 16)
    torch.manual_seed(0)
    start = create_model("small_cnn", 3, in_channels=3)
    models, recorded = {}, {}
    for stream in (False, True):
        splits = load_data(
            f"imagefolder:{tree}", val_per_class=4, seed=1, stream=stream, num_workers=2
        )
        train = Recording(splits.train)
        models[stream] = copy.deepcopy(start)
        finetune(models[stream], train, splits.val, mixup="cutmix", head_first_steps=2,
                 **SETTINGS)  # fmt: skip
        recorded[stream] = train.calls
    assert len(recorded[True]) == len(recorded[False]) > 6
    for streamed, in_memory in zip(recorded[True], recorded[False], strict=True):
        assert torch.equal(streamed, in_memory)
    for key, value in models[False].state_dict().items():
        torch.testing.assert_close(models[True].state_dict()[key], value, msg=key)
    assert not torch.equal(models[True].features.block1[0].weight, start.features.block1[0].weight)
