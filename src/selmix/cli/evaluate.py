"""``selmix evaluate``: print (and save) the test metrics of a model."""

from __future__ import annotations

from typing import Any

from selmix.cli.options import Option, _common_options, _data_options, _start_model_options
from selmix.cli.run import (
    _check_early,
    _check_out,
    _head_classes,
    _load_data,
    _load_start_model,
    _out_dir,
    _write_json,
)


def _evaluate_options() -> list[Option]:
    from selmix.preprocessing import PREPROCESSING_CHOICES

    return _data_options() + _start_model_options() + [
        Option("checkpoint", None, "model to evaluate: a selmix model file, a state dict, "
               ".safetensors or Lightning .ckpt with --model, or hf:DIR", metavar="FILE",
               required=True),
        Option("out", None, "if set, write OUT/metrics.json (key `test`)", metavar="DIR"),
        Option("batch_size", 512, "evaluation batch size", type=int),
        Option("head_classes", None, "head classes for head/tail metrics; unset: the 90% "
               "most frequent training classes", flag=False),
        Option("preprocessing", "auto", "input size and normalisation, as for finetune: "
               "'model' (the model's own), 'data' (the training images' statistics) or "
               "'auto' (the model's when its files record it, as a model.pt of finetune "
               "does, else the data's)", choices=PREPROCESSING_CHOICES,
               metavar="auto|model|data"),
    ] + _common_options()  # fmt: skip


def _cmd_evaluate(settings: dict[str, Any]) -> int:
    from selmix.evaluate import evaluate
    from selmix.preprocessing import resolve_preprocessing
    from selmix.report import format_metrics_table, format_per_class_table

    _check_early(settings)
    if settings["out"] is not None:
        _check_out(settings)
    preprocessing = resolve_preprocessing(
        settings["preprocessing"], settings["checkpoint"], settings.get("model"),
        settings.get("image_size"), resizable=str(settings["data"]).startswith("imagefolder:"),
    )  # fmt: skip
    splits = _load_data(settings, preprocessing)
    print(preprocessing.describe())
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
