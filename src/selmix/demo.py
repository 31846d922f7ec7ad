"""``selmix demo``: SelMix end to end on the packaged Fashion-MNIST-LT subset, offline.

Pre-trains the small CNN with the logit-adjusted cross-entropy on a long-tailed training
set (rho = 100: 1,500 images of the first class, 15 of the last), then fine-tunes a copy of
it with SelMix for each of three objectives (min recall, G-mean, mean recall subject to
min coverage), prints the before/after table and writes a report folder (``index.html``
with PNG plots), ``metrics.json`` and the pre-trained model ``pretrained.pt``.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch

from selmix._io import write_json
from selmix.data import load_data
from selmix.engine.evaluate import evaluate
from selmix.engine.precision import configure_threads
from selmix.engine.pretrain import PretrainConfig, pretrain
from selmix.finetune import FinetuneConfig, finetune
from selmix.models import create_model
from selmix.models.checkpoint import save_model
from selmix.report import format_metrics_table, format_start, format_verdict, write_report

__all__ = ["DEMO_OBJECTIVES", "demo_settings", "run_demo"]

#: The objectives the demo fine-tunes for.
DEMO_OBJECTIVES = ("min_recall", "g_mean", "mean_recall_min_coverage")

# The full demo takes about 1-2 minutes on 2 idle CPU cores; the fast one (tests) about 15 s.
# Pre-training uses the logit-adjusted cross-entropy (a start with every class above 0).
# The full demo fine-tunes with the library's defaults (frozen backbone, feedback every 10,
# scale-free policy s = 3, pseudo-count 1, the best step returned) for 2000 steps instead
# of 4000, to stay well under 90 s (test min recall 57.3% at 2000 steps, 58.7% at 4000,
# at twice the fine-tuning time). The fast one keeps a short run for the tests.
_SETTINGS: dict[bool, dict[str, dict[str, Any]]] = {
    False: {
        "data": {},
        "pretrain": {
            "epochs": 10, "batch_size": 128, "lr": 0.1, "loss": "logit_adjusted",
            "augment": False,
        },
        "finetune": {"frozen_backbone": True, "steps": 2000},
    },
    True: {
        "data": {"imbalance": 100.0, "max_per_class": 300, "val_per_class": 30},
        "pretrain": {
            "epochs": 2, "batch_size": 128, "lr": 0.1, "loss": "logit_adjusted",
            "augment": False,
        },
        "finetune": {
            "steps": 30, "batch_size": 64, "lr_head": 1e-4, "feedback_every": 10,
            "frozen_backbone": True,
        },
    },
}  # fmt: skip


def demo_settings(fast: bool = False) -> dict[str, dict[str, Any]]:
    """The pre-training and fine-tuning settings the demo uses (a copy).

    Args:
        fast: the smaller run used by the tests.

    Returns:
        ``{"data": {...}, "pretrain": {...}, "finetune": {...}}``: arguments of
        ``load_data("demo", ...)``, ``PretrainConfig`` and ``FinetuneConfig`` fields.
    """
    return copy.deepcopy(_SETTINGS[bool(fast)])


def run_demo(
    out_dir: str | os.PathLike = "selmix-demo",
    device: str = "cpu",
    seed: int = 0,
    fast: bool = False,
    *,
    data_options: dict[str, Any] | None = None,
    objectives: tuple[str, ...] = DEMO_OBJECTIVES,
    progress: bool = True,
    verbose: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Runs the demo and writes ``out_dir/index.html`` (+ PNGs) and ``out_dir/metrics.json``.

    Args:
        out_dir: the output folder (created if needed).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: seeds the data split, the model's initial weights and every random draw.
        fast: a smaller, quicker run (for tests).
        data_options: extra arguments of ``load_data("demo", ...)`` (e.g. ``imbalance``).
        objectives: the objectives to fine-tune for.
        progress: show progress bars.
        verbose: print what happens and the final table.
        threads: torch CPU threads during the demo (restored afterwards); None: the
            default of :func:`selmix.engine.precision.configure_threads` (``OMP_NUM_THREADS`` if
            set, else the physical cores this process may use). On a small machine busy
            with other work pass 1 (two threads on two busy cores ran 4x slower).

    Returns:
        A dict with ``before`` (test metrics of the pre-trained model), ``after``
        (objective -> test metrics of its fine-tuned model), ``table`` (the printed table),
        ``report`` (path of ``index.html``), ``metrics_path``,
        ``model_path`` (the pre-trained model), ``settings`` and ``wall_time_s``.
    """


    previous = torch.get_num_threads()
    configure_threads(threads)
    try:
        return _run_demo(
            Path(out_dir), device, seed, fast, data_options, tuple(objectives), progress, verbose
        )
    finally:
        torch.set_num_threads(previous)


def _run_demo(
    out: Path,
    device: str,
    seed: int,
    fast: bool,
    data_options: dict[str, Any] | None,
    objectives: tuple[str, ...],
    progress: bool,
    verbose: bool,
) -> dict[str, Any]:


    def say(message: str) -> None:
        if verbose:
            print(message, flush=True)

    if not objectives:
        raise ValueError("`objectives` must name at least one objective")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(fast)

    settings["data"].update(data_options or {})
    splits = load_data("demo", seed=seed, **settings["data"])
    train = splits.train
    num_classes = int(train.num_classes)
    counts = torch.bincount(torch.as_tensor(train.labels).long(), minlength=num_classes)
    say(
        f"selmix demo: {len(train)} long-tailed training images of {num_classes} classes "
        f"(largest {int(counts.max())}, smallest {int(counts.min())}), {len(splits.val)} "
        f"validation, {len(splits.test)} test"
    )

    say(f"1/{len(objectives) + 1} pre-training small_cnn ({settings['pretrain']['loss']} loss)")
    torch.manual_seed(seed)  # the model's initial weights
    model = create_model("small_cnn", num_classes, in_channels=int(train.images.shape[1]))
    pre_config = PretrainConfig(**settings["pretrain"], seed=seed, device=device, progress=progress)
    pretrain(model, train, splits.val, pre_config)
    before = evaluate(model, splits.test, device).metrics()
    model_path = save_model(out / "pretrained.pt", model, {"classes": list(splits.classes)})

    runs: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(objectives, start=2):
        say(f"{index}/{len(objectives) + 1} SelMix fine-tuning for {name}")
        config = FinetuneConfig(
            **settings["finetune"], objective=name, seed=seed, device=device,
            progress=progress, log_path=None,
        )  # fmt: skip
        result = finetune(copy.deepcopy(model), train, splits.val, config=config)
        runs[name] = {
            "before": before,
            "after": result.metrics(splits.test),
            "history": result.history,
            "gains": result.gains,
            "result": result,
        }

    after = {name: run["after"] for name, run in runs.items()}
    table = format_metrics_table({"before": before, **after})
    say("\ntest metrics (%): the pre-trained model, then its SelMix fine-tuned copies")
    say(table)
    for name, run in runs.items():
        result = run["result"]
        alpha = (result.config.objective_params or {}).get("alpha")
        say(f"{name}: " + format_start(result.selected_step, result.head_init,
                                       result.config.head_init))  # fmt: skip
        say(f"{name}: " + format_verdict(name, before, run["after"], alpha=alpha))

    train_time = time.perf_counter() - started
    mode = "head only" if settings["finetune"]["frozen_backbone"] else "whole network"
    report = None
    report_error: Exception | None = None
    try:
        report = write_report(
            out, runs, title="SelMix demo: Fashion-MNIST-LT, small CNN",
            classes=list(splits.classes),
            description=(
                f"A small CNN pre-trained with the logit-adjusted cross-entropy on "
                f"{len(train)} long-tailed Fashion-MNIST images ({num_classes} classes, "
                f"{int(counts.max())} to {int(counts.min())} per class), then fine-tuned "
                f"with SelMix ({mode}, {settings['finetune']['steps']} steps) for each "
                f"objective. Metrics are on the balanced test set ({len(splits.test)} images)."
            ),
            details={
                "pre-training": settings["pretrain"],
                "fine-tuning": settings["finetune"],
                "seed": seed,
                "device": device,
                "training time (s)": f"{train_time:.0f}",
            },
        )  # fmt: skip
    except ImportError as error:
        report_error = error
    wall_time = time.perf_counter() - started
    metrics_path = out / "metrics.json"
    write_json(
        metrics_path,
        {"before": before, "after": after, "settings": settings, "seed": seed,
         "device": device, "threads": torch.get_num_threads(), "wall_time_s": wall_time},
    )  # fmt: skip
    if report is None:
        # the report is the demo's output: a missing one is a failure, not a footnote
        raise RuntimeError(f"wrote {metrics_path} but no report: {report_error}")
    say(f"\nwrote {metrics_path}" + (f" and the report {report}" if report else ""))
    say(f"demo finished in {wall_time:.0f} s")
    return {
        "before": before,
        "after": after,
        "table": table,
        "report": report,
        "metrics_path": metrics_path,
        "model_path": model_path,
        "settings": settings,
        "wall_time_s": wall_time,
    }
