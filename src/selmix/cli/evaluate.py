"""``selmix evaluate``: print (and save) the test metrics of a model."""

from __future__ import annotations

from typing import Any

from selmix.cli.options import (
    Option,
    _common_options,
    _data_options,
    _overwrite_option,
    _settings_to_save,
    _start_model_options,
)
from selmix.cli.outcome import _load_model_data, _note_preprocessing
from selmix.cli.run import (
    _check_early,
    _check_model_takes_data,
    _flag,
    _head_classes,
    _load_start_model,
    _write_json,
    _write_yaml,
)
from selmix.cli.staging import Staging, check_out


def _evaluate_options() -> list[Option]:
    return _data_options() + _start_model_options() + [
        Option("checkpoint", None, "model to evaluate: a selmix model file, a state dict, "
               ".safetensors or Lightning .ckpt with --model, or hf:DIR", metavar="FILE",
               required=True),
        Option("out", None, "if set, write OUT/metrics.json (key `test`) and OUT/config.yaml; "
               "they are written to OUT.partial/ and moved here when complete",
               metavar="DIR"),
        _overwrite_option("evaluation"),
        Option("batch_size", 512, "evaluation batch size", type=int),
        Option("head_classes", None, "head classes for head/tail metrics; unset: the 90% "
               "most frequent training classes", flag=False),
    ] + _common_options()  # fmt: skip


def _cmd_evaluate(settings: dict[str, Any]) -> int:
    from selmix.engine.evaluate import evaluate
    from selmix.report import format_metrics_table, format_per_class_table

    # fail fast: the settings and --out are checked before any data is read, and --out is
    # only written once the metrics are known
    _check_early(settings)
    out = settings["out"]
    if out is not None:
        check_out(out, overwrite=_flag(settings, "overwrite"), keep=[settings["checkpoint"]])
    splits, preprocessing = _load_model_data(settings)
    model = _load_start_model(settings, splits).model
    _check_model_takes_data(model, splits.test, str(settings["checkpoint"]))
    head_classes = _head_classes(settings, splits)
    settings["head_classes"] = head_classes
    metrics = evaluate(model, splits.test, settings["device"], settings["batch_size"]).metrics(
        head_classes
    )
    print(format_metrics_table({"test": metrics}))
    print()
    print(format_per_class_table({"test": metrics}, classes=splits.classes))
    if out is None:
        return 0
    # written to a staging folder and moved into --out when complete, as the other commands
    staging = Staging(out, keep=[settings["checkpoint"]])
    work = staging.open()
    saved_settings = _settings_to_save(settings)
    try:
        _write_json(work / "metrics.json", {"test": metrics})
        _write_yaml(work / "config.yaml", saved_settings)
        _note_preprocessing(work / "config.yaml", preprocessing)
        written = staging.commit()
    except BaseException:
        staging.abandon()  # nothing to resume: an earlier run in --out stays as it was
        raise
    print(f"wrote {written / 'metrics.json'}, {written / 'config.yaml'}")
    return 0
