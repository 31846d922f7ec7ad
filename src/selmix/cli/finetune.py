"""``selmix finetune``: fine-tune a model with SelMix for an objective, resumable (the
run's identity: data source, splits and starting checkpoint) and under ``torchrun``."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selmix.cli.options import (
    PROG,
    Option,
    UsageError,
    _config_from,
    _config_options,
    _data_options,
    _one_line,
    _overwrite_option,
    _settings_to_save,
    _start_model_options,
)
from selmix.cli.outcome import _load_model_data, _note_preprocessing, _verdict
from selmix.cli.run import (
    _ARGV,
    _check_model_takes_data,
    _check_split_labels,
    _flag,
    _Interrupted,
    _load_start_model,
    _model_meta,
    _note_resolved,
    _num_classes,
    _write_json,
    _write_yaml,
)
from selmix.cli.staging import Staging, check_out


def _finetune_options() -> list[Option]:
    from selmix.finetune import FinetuneConfig
    from selmix.models.export import EXPORT_FORMATS

    return _data_options() + _start_model_options() + [
        Option("checkpoint", None, "model to start from: model.pt of `selmix pretrain`, a "
               "state dict, .safetensors or Lightning .ckpt with --model, or hf:DIR (a "
               "Hugging Face save_pretrained folder)", metavar="FILE", required=True),
        Option("export", None, "also write the returned model in its own family: "
               "safetensors (OUT/model.safetensors), state_dict (OUT/model_state_dict.pt), "
               "both with the starting file's keys, hf (OUT/hf/, save_pretrained); "
               "one or more, comma-separated (e.g. --export safetensors,hf); a failed export "
               "keeps the finished run in OUT and exits 2 naming the failure",
               metavar="{" + ",".join(EXPORT_FORMATS) + "}[,...]"),
        Option("out", None, "output folder (model.pt, log.jsonl, metrics.json, config.yaml); "
               "the run is written to OUT.partial/ and moved here when complete",
               metavar="DIR", required=True),
        Option("resume", None, "resume from a finetune_state.pt of an interrupted run with "
               "the same settings, data and starting checkpoint (an interrupted run's is in "
               "OUT.partial/)", metavar="FILE"),
        _overwrite_option(),
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


@dataclass
class _CheckedRun:
    """A ``selmix finetune`` command's inputs, checked before ``--out`` is touched."""

    config: Any  # FinetuneConfig, the objective resolved, the files still unset
    splits: Any
    preprocessing: Any
    model: Any
    source: Any
    identity: dict[str, Any]
    export: list[str]


def _cmd_finetune(settings: dict[str, Any]) -> int:
    run = _check_run(settings)
    outcome = _staged_run(settings, run)
    if outcome is not None:  # rank 0 alone prints
        _print_outcome(run.config, *outcome)
    return 0


def _check_run(settings: dict[str, Any]) -> _CheckedRun:
    """Every check that must pass before ``--out`` is touched: a bad input never damages
    an earlier run there. The library checks the labels and the resume again when the run
    starts, but only once the run's folder is staged."""
    from selmix.core.objectives import get_objective
    from selmix.finetune import FinetuneConfig, check_resume, data_fingerprint, resolve_objective
    from selmix.models.checkpoint import load_checkpoint
    from selmix.models.export import check_export_formats

    # fail fast, before any data is read: every setting, the objective, the files
    config = _config_from(FinetuneConfig, settings, _finetune_options())
    get_objective(config.objective, **config.objective_params)
    _check_tensorboard(config.tensorboard_dir)
    start_kind = "hf" if str(settings["checkpoint"]).startswith("hf:") else "file"
    export = check_export_formats(settings["export"], start_kind)
    if settings["resume"] is not None and not Path(settings["resume"]).is_file():
        raise FileNotFoundError(f"`resume` file {settings['resume']!r} does not exist")
    # every file of the run goes to a staging folder, moved into --out when it ends
    check_out(settings["out"], overwrite=_flag(settings, "overwrite"),
              resume=settings["resume"], keep=[settings["checkpoint"]],
              writer=os.environ.get("RANK", "0") == "0")  # fmt: skip
    splits, preprocessing = _load_model_data(settings)
    _check_split_labels(splits)  # names the missing classes and what to change
    model, _, source = _load_start_model(settings, splits)
    _check_model_takes_data(model, splits.train, str(settings["checkpoint"]))
    # the library resolves the run (head classes, objective parameters) as the API does
    config, _ = resolve_objective(
        config, None, splits.train.labels, _num_classes(splits), splits.val.labels
    )
    settings["head_classes"] = config.head_classes
    identity = _run_identity(settings, splits)
    if preprocessing.from_model:  # a resumed run must normalise as the run it continues
        identity["preprocessing"] = preprocessing.to_dict()
    if settings["resume"] is not None:
        check_resume(
            load_checkpoint(settings["resume"]), config,
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            data=data_fingerprint(splits.train, splits.val, getattr(splits, "unlabelled", None)),
            identity=identity, path=settings["resume"],
        )  # fmt: skip
    return _CheckedRun(config, splits, preprocessing, model, source, identity, export)


def _staged_run(settings: dict[str, Any], run: _CheckedRun) -> tuple[Any, ...] | None:
    """The run in a staging folder, moved into ``--out`` when complete; on rank 0
    ``(result, before, after, out, exported, export_failure)``, on the others None."""
    from selmix.engine.collective import SingleProcess, evaluate_across
    from selmix.engine.distributed import init_from_env
    from selmix.finetune import finetune
    from selmix.models.checkpoint import save_model

    staging = Staging(settings["out"], keep=[settings["checkpoint"]],
                      write=os.environ.get("RANK", "0") == "0")  # fmt: skip
    work = staging.path
    saved_settings = _settings_to_save(settings)
    state_path = work / "finetune_state.pt"
    config = run.config.replace(log_path=str(work / "log.jsonl"), checkpoint_path=str(state_path))
    splits = run.splits
    # under torchrun every process runs this; rank 0 alone writes files and prints
    context = init_from_env(settings["device"])
    collective = context or SingleProcess()
    try:
        # a resumed run extends the log of the run it continues
        staging.open(settings["resume"], carry=["log.jsonl"])
        if settings["resume"] is None and staging.write:
            _write_yaml(work / "config.yaml", saved_settings)
        collective.local_batch_size(config.batch_size)  # fail fast, before the test set
        device = collective.process_device(config.device)

        def test_metrics(trained: Any) -> dict[str, Any]:
            evaluation = evaluate_across(
                collective, trained, splits.test, device, config.eval_batch_size
            )
            return evaluation.metrics(config.head_classes)

        before = test_metrics(run.model)
        try:
            result = finetune(
                run.model, splits.train, splits.val, config=config,
                unlabelled=getattr(splits, "unlabelled", None), resume=settings["resume"],
                distributed=context, identity=run.identity,
            )  # fmt: skip
        except KeyboardInterrupt:
            hint = _resume_hint(settings, state_path)
            staging.abandon(state_path.name)
            raise _Interrupted(hint) from None
        after = test_metrics(result.model)
        metrics = _test_record(result, before, after, test_metrics)
        if collective.is_main:
            meta = _model_meta(splits, settings, "finetune")
            meta["preprocessing"] = run.preprocessing.to_dict()
            save_model(work / "model.pt", result.model, meta)
            _write_json(work / "metrics.json", metrics)
            # wall time of training and feedback per phase, and what `auto` resolved to
            _write_json(work / "timings.json", {**result.timings, "hardware": result.hardware})
            _write_yaml(work / "config.yaml", saved_settings)
            _note_resolved(work / "config.yaml", result.config)
            _note_preprocessing(work / "config.yaml", run.preprocessing)
            exported, export_failure = _export(result.model, work, run.export, run.source,
                                               staging)  # fmt: skip
            out = staging.commit()
            exported = [out / path.name for path in exported]
            if export_failure is not None:  # the staging folder it names is --out now
                export_failure = export_failure.replace(str(work), str(out))
        # all ranks leave together: gloo aborts a process whose peer hung up first
        collective.barrier()
    except BaseException:
        # keeps an interrupted or failed run's checkpoint (to resume from), else nothing
        staging.abandon(state_path.name)
        raise
    finally:
        if context is not None:
            context.destroy()
    if not collective.is_main:
        return None
    return result, before, after, out, exported, export_failure


def _test_record(
    result: Any, before: dict[str, Any], after: dict[str, Any], test_metrics: Any
) -> dict[str, Any]:
    """metrics.json: the test metrics before and after, of the best and last steps, which
    step was returned and the verdict."""
    metrics = {
        "before": before,
        "after": after,
        "select": result.config.select,
        "selected_step": result.selected_step,
        "best_step": result.best_step,
        "last_step": result.last_step,
        "start_head": (result.head_init or {}).get("head_init", "model"),
        "stop_reason": result.stop_reason,
    }
    for which, step in (("best", result.best_step), ("last", result.last_step)):
        same = step == result.selected_step
        metrics[which] = after if same else test_metrics(result.model_at(which))
    metrics["verdict"] = _verdict(result.config, before, after)
    return metrics


def _print_outcome(
    config: Any,
    result: Any,
    before: dict[str, Any],
    after: dict[str, Any],
    out: Path,
    exported: list[Path],
    export_failure: str | None,
) -> None:
    """What the finished run prints; a failed export is a UsageError (exit 2) after it."""
    from selmix.engine.timing import parse_duration
    from selmix.report import format_metrics_table, format_start

    print(f"objective: {config.objective} ({config.steps} steps, policy {config.policy})")
    selection = f"{config.select}; best {result.best_step}, last {result.last_step}"
    if result.stop_reason == "max_time":
        print(
            f"stopped at step {result.last_step} of {config.steps}: max_time "
            f"({parse_duration('max_time', config.max_time):g} s) ran out; returned step "
            f"{result.selected_step} ({config.select} so far)"
        )
    print(format_start(result.selected_step, result.head_init, config.head_init, selection))
    print(format_metrics_table({"before": before, "after": after}, objective=config.objective))
    print(_verdict(result.config, before, after))
    written = ", ".join(str(out / name) for name in ("model.pt", "log.jsonl", "metrics.json"))
    print(f"wrote {written}, {out / 'config.yaml'}")
    if exported:
        print("exported " + ", ".join(str(path) for path in exported))
    if export_failure is not None:
        # exit 2: the run is complete, the export is what the user must fix and redo
        raise UsageError(
            f"the run finished and is in {str(out)!r} (model.pt, metrics.json), but "
            f"`export` failed, so none was written: {export_failure}"
        )


def _export(
    model: Any, work: Path, formats: list[str], source: Any, staging: Staging
) -> tuple[list[Path], str | None]:
    """Exports ``model`` into the staging folder; a failed export is dropped (the finished
    run is kept without it) and returned as one line."""
    from selmix.models.export import EXPORT_FILES, export_model

    if not formats:
        return [], None
    try:
        return export_model(model, work, formats, source), None
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as error:
        names = [EXPORT_FILES[name] for name in formats]
        staging.drop([*names, *(name + ".partial" for name in names)])
        return [], f"{', '.join(formats)}: {_one_line(error)}"


def _resume_hint(settings: dict[str, Any], state_path: Path) -> str:
    """Where the checkpoint is and the command that continues the run; or, before the
    first checkpoint, that there is nothing to resume from."""
    if not state_path.is_file() and settings.get("resume") is not None:
        # a resumed run without a checkpoint of its own: the one it started from continues it
        state_path = Path(settings["resume"])
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
