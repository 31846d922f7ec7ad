"""``selmix baseline``: run a baseline SelMix is compared with on a model."""

from __future__ import annotations

import warnings
from typing import Any

from selmix.cli.options import (
    Option,
    _config_from,
    _config_options,
    _data_options,
    _overwrite_option,
    _settings_to_save,
    _start_model_options,
)
from selmix.cli.outcome import _load_model_data, _note_preprocessing, _verdict
from selmix.cli.run import (
    _check_model_takes_data,
    _flag,
    _load_start_model,
    _model_meta,
    _num_classes,
    _write_json,
    _write_yaml,
)
from selmix.cli.staging import Staging, check_out


def _baseline_methods() -> list[str]:
    from selmix.baselines import list_baselines

    return [name for name in list_baselines() if name != "start"]


def _baseline_options() -> list[Option]:
    from selmix.baselines import BaselineConfig

    return _data_options() + _start_model_options() + [
        Option("checkpoint", None, "model file to start from (model.pt of `selmix pretrain`)",
               metavar="FILE", required=True),
        Option("out", None, "output folder (model.pt, metrics.json, config.yaml and, for "
               "posthoc_la, crt and mislas_stage2, details.json)", metavar="DIR",
               required=True),
        Option("method", None, "the baseline: posthoc_la (post-hoc logit adjustment, tau tuned "
               "on the validation set for --objective), crt (classifier re-training on the "
               "frozen backbone), mislas_stage2 (the model's head fine-tuned on the frozen "
               "backbone like crt, with label-aware smoothing) or la_finetune (fine-tuning "
               "with the logit-adjusted loss); the settings of the other methods are ignored "
               "(with a warning)",
               choices=_baseline_methods(), required=True),
        _overwrite_option(),
    ] + _config_options(BaselineConfig)  # fmt: skip


def _warn_ignored_settings(settings: dict[str, Any], options: list[Option]) -> None:
    """One warning naming the other methods' settings that differ from their defaults."""
    from selmix.baselines import BaselineConfig

    method = settings["method"]
    used = set(BaselineConfig.used_by(method))
    ignored = sorted(
        option.key
        for option in options
        if option.field
        and option.field not in used
        and option.field != "progress"  # a display setting, not a method's
        and settings[option.key] != option.default
    )
    if ignored:
        warnings.warn(f"method {method} ignores the setting(s) {', '.join(ignored)}", stacklevel=2)


def _cmd_baseline(settings: dict[str, Any]) -> int:
    from selmix.baselines import BaselineConfig, baseline
    from selmix.core.objectives import get_objective
    from selmix.engine.evaluate import evaluate
    from selmix.finetune import resolve_objective
    from selmix.models.checkpoint import save_model
    from selmix.report import format_metrics_table

    method = settings["method"]
    options = _baseline_options()
    # fail fast, before any data is read
    config = _config_from(BaselineConfig, settings, options)
    if method == "posthoc_la":
        get_objective(config.objective, **config.objective_params)
    _warn_ignored_settings(settings, options)
    check_out(settings["out"], overwrite=_flag(settings, "overwrite"),
              keep=[settings["checkpoint"]])  # fmt: skip

    splits, preprocessing = _load_model_data(settings)
    model = _load_start_model(settings, splits).model
    _check_model_takes_data(model, splits.train, str(settings["checkpoint"]))
    # the library resolves the run (head classes, objective parameters) as the API does
    config, _ = resolve_objective(config, None, splits.train.labels, _num_classes(splits))
    settings["head_classes"] = config.head_classes
    # the run is written to a staging folder and moved into --out when it is complete
    staging = Staging(settings["out"], keep=[settings["checkpoint"]])
    work = staging.open()
    saved_settings = _settings_to_save(settings)

    def test_metrics(trained: Any) -> dict[str, Any]:
        evaluation = evaluate(trained, splits.test, config.device, config.eval_batch_size)
        return evaluation.metrics(config.head_classes)

    try:
        _write_yaml(work / "config.yaml", saved_settings)
        _note_preprocessing(work / "config.yaml", preprocessing)
        before = test_metrics(model)
        result = baseline(method, model, splits.train, splits.val, config)
        after = test_metrics(result.model)
        meta = _model_meta(splits, settings, "baseline")
        meta["preprocessing"] = preprocessing.to_dict()
        save_model(work / "model.pt", result.model, meta)
        _write_json(work / "metrics.json", {"before": before, "after": after})
        names = ["model.pt", "metrics.json", "config.yaml"]
        if result.details:  # posthoc_la: the tau search; crt, mislas_stage2: per-epoch history
            _write_json(work / "details.json", result.details)
            names.append("details.json")
        out = staging.commit()
    except BaseException:
        staging.abandon()  # a baseline has no checkpoint to resume from
        raise
    written = [out / name for name in names]

    if method == "posthoc_la":
        print(
            f"method: posthoc_la, tau = {result.details['tau']} (the best of "
            f"{len(result.details['taus'])} taus on the validation set for "
            f"{settings['objective']})"
        )
    elif method == "crt":
        print(f"method: crt ({config.epochs} epochs, lr {config.lr:g})")
    elif method == "mislas_stage2":
        print(
            f"method: mislas_stage2 ({config.epochs} epochs, lr {config.lr:g}, label-aware "
            f"smoothing {config.smooth_head:g} (head) to {config.smooth_tail:g} (tail))"
        )
    else:
        part = "head only" if config.frozen_backbone else "full backbone"
        print(f"method: la_finetune ({config.steps} steps, tau {config.la_tau:g}, {part})")
    print(format_metrics_table({"before": before, "after": after}, objective=config.objective))
    print(_verdict(config, before, after))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
