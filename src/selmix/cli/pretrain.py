"""``selmix pretrain``: train a registry model on a data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selmix.cli.options import (
    Option,
    UsageError,
    _config_from,
    _config_options,
    _data_options,
    _overwrite_option,
    _settings_to_save,
)
from selmix.cli.run import (
    _check_early,
    _flag,
    _head_classes,
    _in_channels,
    _Interrupted,
    _load_data,
    _model_meta,
    _note_resolved,
    _num_classes,
    _write_json,
    _write_yaml,
)
from selmix.cli.staging import Staging, check_out


def _pretrain_options() -> list[Option]:
    from selmix.engine.pretrain import PretrainConfig

    return _data_options() + [
        Option("model", None, "registry model name (see the list below), timm:NAME for any "
               "timm architecture (extra selmix[timm]) or torchvision:NAME for a "
               "torchvision.models classifier", metavar="NAME", required=True),
        Option("out", None, "output folder (model.pt, metrics.json, config.yaml, "
               "pretrain_state.pt)", metavar="DIR", required=True),
        Option("resume", None, "resume from a pretrain_state.pt of an interrupted run with "
               "the same settings and data (an interrupted run's is in OUT.partial/)",
               metavar="FILE"),
        _overwrite_option(),
        Option("model_kwargs", {}, "extra constructor arguments of the model", flag=False),
        Option("head_classes", None, "head classes for head/tail metrics; unset: the 90% "
               "most frequent training classes", flag=False),
    ] + _config_options(PretrainConfig)  # fmt: skip


def _cmd_pretrain(settings: dict[str, Any]) -> int:
    import torch

    from selmix.engine.evaluate import evaluate
    from selmix.engine.pretrain import PretrainConfig, pretrain
    from selmix.models import create_model
    from selmix.models.checkpoint import save_model
    from selmix.models.registry import check_model_name
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
    check_out(settings["out"], overwrite=_flag(settings, "overwrite"), resume=resume)
    splits = _load_data(settings)
    settings["head_classes"] = _head_classes(settings, splits)

    torch.manual_seed(settings["seed"])  # the model's initial weights
    model = create_model(
        settings["model"], _num_classes(splits), in_channels=_in_channels(splits.train),
        **settings["model_kwargs"],
    )  # fmt: skip
    # the run is written to a staging folder (where an interrupted run's checkpoint stays)
    # and moved into --out when it is complete
    staging = Staging(settings["out"])
    work = staging.open(resume)
    saved_settings = _settings_to_save(settings)
    state_path = work / "pretrain_state.pt"
    config = config.replace(checkpoint_path=str(state_path))
    try:
        _write_yaml(work / "config.yaml", saved_settings)
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
        save_model(work / "model.pt", result.model, _model_meta(splits, settings, "pretrain"))
        _write_json(work / "metrics.json", metrics)
        _note_resolved(work / "config.yaml", result.config)
        out = staging.commit()
    except BaseException:
        staging.abandon(state_path.name)  # kept when it holds a checkpoint to resume from
        raise
    print(format_metrics_table({"val": metrics["val"], "test": metrics["test"]}, change=False))
    print(f"wrote {out / 'model.pt'}, {out / 'metrics.json'}, {out / 'config.yaml'}")
    return 0
