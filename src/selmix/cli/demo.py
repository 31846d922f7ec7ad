"""``selmix demo``: pre-train and fine-tune on the packaged Fashion-MNIST-LT subset."""

from __future__ import annotations

from typing import Any

from selmix.cli.options import Option, _common_options, _data_options
from selmix.cli.run import _flag


def _demo_options() -> list[Option]:
    return (
        [
            Option("out", "selmix-demo", "output folder (report, metrics.json)", metavar="DIR"),
            Option("fast", False, "a smaller, quicker run (used by the tests)"),
            Option("progress", True, "show progress (plain lines when not a terminal)"),
            Option(
                "threads",
                None,
                "torch CPU threads; unset: OMP_NUM_THREADS if set, else the physical cores "
                "this process may use (1 is the fastest on a small, busy machine)",
                type=int,
                metavar="N",
            ),
        ]
        + _data_options(required=False)
        + _common_options(device="cpu")
    )


def _cmd_demo(settings: dict[str, Any]) -> int:
    from selmix._validation import check_seed
    from selmix.demo import run_demo

    check_seed("seed", settings["seed"])
    _flag(settings, "fast")

    data_options = {
        key: settings[key]
        for key in ("imbalance", "max_per_class", "val_per_class", "cache_dir")
        if settings[key] is not None
    }
    run_demo(
        out_dir=settings["out"], device=settings["device"], seed=settings["seed"],
        fast=settings["fast"], data_options=data_options or None,
        threads=settings["threads"] or None, progress=_flag(settings, "progress"),
    )  # fmt: skip
    return 0
