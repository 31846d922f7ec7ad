"""``selmix evaluate``: print (and save) the test metrics of a model."""

from __future__ import annotations

from typing import Any

from selmix.cli.options import Option, _common_options, _data_options, _start_model_options
from selmix.cli.outcome import _load_model_data
from selmix.cli.run import (
    _check_early,
    _check_out,
    _head_classes,
    _load_start_model,
    _out_dir,
    _write_json,
)


def _evaluate_options() -> list[Option]:
    return _data_options() + _start_model_options() + [
        Option("checkpoint", None, "model to evaluate: a selmix model file, a state dict, "
               ".safetensors or Lightning .ckpt with --model, or hf:DIR", metavar="FILE",
               required=True),
        Option("out", None, "if set, write OUT/metrics.json (key `test`)", metavar="DIR"),
        Option("batch_size", 512, "evaluation batch size", type=int),
        Option("head_classes", None, "head classes for head/tail metrics; unset: the 90% "
               "most frequent training classes", flag=False),
    ] + _common_options()  # fmt: skip


def _cmd_evaluate(settings: dict[str, Any]) -> int:
    from selmix.engine.evaluate import evaluate
    from selmix.report import format_metrics_table, format_per_class_table

    _check_early(settings)
    if settings["out"] is not None:
        _check_out(settings)
    splits, _ = _load_model_data(settings)
    model = _load_start_model(settings, splits).model
    head_classes = _head_classes(settings, splits)
    settings["head_classes"] = head_classes
    metrics = evaluate(model, splits.test, settings["device"], settings["batch_size"]).metrics(
        head_classes
    )
    print(format_metrics_table({"test": metrics}))
    print()
    print(format_per_class_table({"test": metrics}, classes=splits.classes))
    if settings["out"] is not None:
        out = _out_dir(settings)
        _write_json(out / "metrics.json", {"test": metrics})
        print(f"wrote {out / 'metrics.json'}")
    return 0
