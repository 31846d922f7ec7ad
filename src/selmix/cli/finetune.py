"""``selmix finetune``: fine-tune a model with SelMix for an objective, resumable (the
run's identity: data source, splits and starting checkpoint) and under ``torchrun``."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from selmix.cli.options import (
    PROG,
    Option,
    UsageError,
    _config_from,
    _config_options,
    _data_options,
    _start_model_options,
)
from selmix.cli.run import (
    _ARGV,
    _check_out,
    _Interrupted,
    _load_data,
    _load_start_model,
    _model_meta,
    _note_resolved,
    _num_classes,
    _out_dir,
    _start_run,
    _write_json,
    _write_yaml,
)


def _finetune_options() -> list[Option]:
    from selmix.export import EXPORT_FORMATS
    from selmix.finetune import FinetuneConfig

    return _data_options() + _start_model_options() + [
        Option("checkpoint", None, "model to start from: model.pt of `selmix pretrain`, a "
               "state dict, .safetensors or Lightning .ckpt with --model, or hf:DIR (a "
               "Hugging Face save_pretrained folder)", metavar="FILE", required=True),
        Option("export", None, "also write the returned model in its own family: "
               "safetensors (OUT/model.safetensors), state_dict (OUT/model_state_dict.pt), "
               "both with the starting file's keys, hf (OUT/hf/, save_pretrained); "
               "comma-separated", metavar="|".join(EXPORT_FORMATS)),
        Option("out", None, "output folder (model.pt, log.jsonl, metrics.json, config.yaml)",
               metavar="DIR", required=True),
        Option("resume", None, "resume from a finetune_state.pt of an interrupted run with "
               "the same settings, data and starting checkpoint", metavar="FILE"),
    ] + _config_options(FinetuneConfig)  # fmt: skip


def _run_identity(settings: dict[str, Any], splits: Any = None) -> dict[str, Any]:
    """What a fine-tuning run is made from beyond its settings: the data source (its kind
    and resolved path), how the splits are cut and the starting model file (path and
    content digest). A resumed run must agree on all of them."""
    from selmix.models.loading import checkpoint_digest

    kind, sep, location = str(settings["data"]).partition(":")
    data = f"{kind}:{Path(location).expanduser().resolve()}" if sep and location else kind
    identity = {
        "data": data,
        "imbalance": settings["imbalance"],
        "max_per_class": settings["max_per_class"],
        "val_per_class": settings["val_per_class"],
        "checkpoint": checkpoint_digest(settings["checkpoint"]),
        # streamed trees get other transforms, and --stream auto can choose differently
        # when the free memory changes between a run and its resume
        "storage": _storage(splits),
    }
    for key in ("model", "ckpt_prefix"):  # only when set: earlier runs' identities lack them
        if settings.get(key) is not None:
            identity[key] = settings[key]
    return identity


def _storage(splits: Any) -> str:
    from selmix.data import StreamingImageDataset

    streamed = splits is not None and isinstance(splits.train, StreamingImageDataset)
    return "disk" if streamed else "memory"


def _check_tensorboard(directory: str | None) -> None:
    import importlib.util

    if directory and importlib.util.find_spec("tensorboard") is None:
        raise UsageError(
            "`tensorboard` needs the optional package 'tensorboard': pip install "
            "'selmix[tensorboard]' (or pip install tensorboard)"
        )


def _cmd_finetune(settings: dict[str, Any]) -> int:
    from selmix._validation import check_labels
    from selmix.checkpoint import load_checkpoint, save_model
    from selmix.collective import SingleProcess, evaluate_across
    from selmix.distributed import init_from_env
    from selmix.export import check_export_formats, export_model
    from selmix.finetune import (
        FinetuneConfig,
        check_resume,
        data_fingerprint,
        finetune,
        resolve_objective,
    )
    from selmix.objectives import get_objective
    from selmix.report import format_metrics_table

    # fail fast, before any data is read: every setting, the objective, the files
    config = _config_from(FinetuneConfig, settings, _finetune_options())
    get_objective(config.objective, **config.objective_params)
    _check_tensorboard(config.tensorboard_dir)
    start_kind = "hf" if str(settings["checkpoint"]).startswith("hf:") else "file"
    export = check_export_formats(settings["export"], start_kind)
    if settings["resume"] is not None and not Path(settings["resume"]).is_file():
        raise FileNotFoundError(f"`resume` file {settings['resume']!r} does not exist")
    _check_out(settings)

    splits = _load_data(settings)
    # checked here, before --out is touched, as the library will check them again
    check_labels("train", splits.train.labels, _num_classes(splits))
    check_labels("val", splits.val.labels, _num_classes(splits), every_class=True)
    model, _, source = _load_start_model(settings, splits)
    # the library resolves the run (head classes, objective parameters) as the API does
    config, _ = resolve_objective(config, None, splits.train.labels, _num_classes(splits))
    settings["head_classes"] = config.head_classes
    identity = _run_identity(settings, splits)
    unlabelled = getattr(splits, "unlabelled", None)
    resume_state = None
    if settings["resume"] is not None:
        # checked here, before --out is touched, as the library will check it again
        resume_state = load_checkpoint(settings["resume"])
        check_resume(
            resume_state, config, world_size=int(os.environ.get("WORLD_SIZE", "1")),
            data=data_fingerprint(splits.train, splits.val, unlabelled), identity=identity,
            path=settings["resume"],
        )  # fmt: skip
        out = _out_dir(settings)
    else:
        out = _start_run(settings, keep=[settings["checkpoint"]])
    state_path = out / "finetune_state.pt"
    config = config.replace(log_path=str(out / "log.jsonl"), checkpoint_path=str(state_path))

    # under torchrun every process runs this; rank 0 alone writes files and prints
    context = init_from_env(settings["device"])
    collective = context or SingleProcess()
    try:
        collective.local_batch_size(config.batch_size)  # fail fast on an uneven split
        device = collective.process_device(config.device)

        def test_metrics(trained: Any) -> dict[str, Any]:
            evaluation = evaluate_across(
                collective, trained, splits.test, device, config.eval_batch_size
            )
            return evaluation.metrics(config.head_classes)

        before = test_metrics(model)
        try:
            result = finetune(
                model, splits.train, splits.val, config=config, unlabelled=unlabelled,
                resume=settings["resume"], distributed=context, identity=identity,
            )  # fmt: skip
        except KeyboardInterrupt:
            raise _Interrupted(_resume_hint(settings, state_path)) from None
        after = test_metrics(result.model)
        metrics = {
            "before": before,
            "after": after,
            "select": config.select,
            "selected_step": result.selected_step,
            "best_step": result.best_step,
            "last_step": result.last_step,
        }
        for which, step in (("best", result.best_step), ("last", result.last_step)):
            same = step == result.selected_step
            metrics[which] = after if same else test_metrics(result.model_at(which))
        if collective.is_main:
            meta = _model_meta(splits, settings, "finetune")
            save_model(out / "model.pt", result.model, meta)
            exported = export_model(result.model, out, export, source) if export else []
            _write_json(out / "metrics.json", metrics)
            # wall time of training and feedback per phase, and what `auto` resolved to
            _write_json(out / "timings.json", {**result.timings, "hardware": result.hardware})
            _write_yaml(out / "config.yaml", settings)
            _note_resolved(out / "config.yaml", result.config)
        # all ranks leave together: gloo aborts a process whose peer hung up first
        collective.barrier()
    finally:
        if context is not None:
            context.destroy()
    if not collective.is_main:
        return 0
    print(f"objective: {config.objective} ({config.steps} steps, policy {config.policy})")
    print(
        f"selected step {result.selected_step} ({config.select}; best {result.best_step}, "
        f"last {result.last_step})"
    )
    print(format_metrics_table({"before": before, "after": after}))
    written = ", ".join(str(out / name) for name in ("model.pt", "log.jsonl", "metrics.json"))
    print(f"wrote {written}, {out / 'config.yaml'}")
    if exported:
        print("exported " + ", ".join(str(path) for path in exported))
    return 0


def _resume_hint(settings: dict[str, Any], state_path: Path) -> str:
    """Where the checkpoint is and the command that continues the run; or, before the
    first checkpoint, that there is nothing to resume from."""
    if not state_path.is_file():
        every = settings.get("checkpoint_every")
        when = f"every {every} steps" if every else "at the end"
        return (
            f"interrupted before the first checkpoint (written {when} to {str(state_path)!r}): "
            "nothing to resume from"
        )
    argv = list(_ARGV)
    # drop an earlier --resume (both spellings) and name this checkpoint
    kept: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--resume":
            skip = True
            continue
        if item.startswith("--resume="):
            continue
        kept.append(item)
    command = shlex.join([PROG, *kept, "--resume", str(state_path)])
    return f"interrupted; the checkpoint is {str(state_path)!r}; to continue: {command}"
