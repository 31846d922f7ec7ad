"""``selmix pretrain``: train a registry model on a data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selmix.cli.options import Option, UsageError, _config_from, _config_options, _data_options
from selmix.cli.run import (
    _check_early,
    _check_out,
    _head_classes,
    _in_channels,
    _Interrupted,
    _load_data,
    _model_meta,
    _note_resolved,
    _num_classes,
    _out_dir,
    _start_run,
    _write_json,
)


def _pretrain_options() -> list[Option]:
    from selmix.pretrain import PretrainConfig

    return _data_options() + [
        Option("model", None, "registry model name (see the list below), timm:NAME for any "
               "timm architecture (extra selmix[timm]) or torchvision:NAME for a "
               "torchvision.models classifier", metavar="NAME", required=True),
        Option("out", None, "output folder (model.pt, metrics.json, config.yaml, "
               "pretrain_state.pt)", metavar="DIR", required=True),
        Option("resume", None, "resume from a pretrain_state.pt of an interrupted run with "
               "the same settings and data", metavar="FILE"),
        Option("model_kwargs", {}, "extra constructor arguments of the model", flag=False),
        Option("head_classes", None, "head classes for head/tail metrics; unset: the 90% "
               "most frequent training classes", flag=False),
    ] + _config_options(PretrainConfig)  # fmt: skip


def _cmd_pretrain(settings: dict[str, Any]) -> int:
    import torch

    from selmix.checkpoint import save_model
    from selmix.evaluate import evaluate
    from selmix.models import create_model
    from selmix.models.registry import check_model_name
    from selmix.pretrain import PretrainConfig, pretrain
    from selmix.report import format_metrics_table

    try:  # the names `selmix finetune --model` takes, checked before the data loads
        check_model_name(settings["model"])
    except (TypeError, ValueError) as error:
        raise UsageError(f"`model`: {error}") from None
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
