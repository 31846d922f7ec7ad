"""Issue 37's "Must show" list, item by item: runs the tests that assert each item and
prints whether it holds.

    PYTHONPATH=src python scripts/issue37_checks.py

Each item is shown by tests that run the real command line (``selmix.cli.main``, or a
``python -m selmix`` process for the signals) and assert the exit status, the one error
line and the SHA-256 of every file of the earlier run in ``--out``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAD = (
    "tests/test_bad_inputs.py::test_bad_input_is_one_line_exit_2_and_leaves_the_previous_run_intact"
)
PREP = "tests/test_preprocessing.py::"

#: (item of the issue, the tests that show it)
ITEMS: list[tuple[str, list[str]]] = [
    ("NaN in a state dict's head, --head-init none: exit 2, one line, run intact",
     [f"{BAD}[nan in a state dict's head, --model]", f"{BAD}[nan in the head, head_init none]"]),
    ("hf: ViT built for other sizes than the data's: exit 2, one line, run intact",
     [f"{BAD}[hf ViT built for 16x16, data 12x12]"]),
    ("--val-per-class equal to the smallest class: exit 2, one line naming it, run intact",
     [f"{BAD}[val_per_class equal to the smallest class]"]),
    ("OUT/model_state_dict.pt is a folder: exit 2, one line, run intact",
     [f"{BAD}[OUT/model_state_dict.pt is a folder]"]),
    ("Ctrl-C (real SIGINT) of a new run into a used --out: exit 130, run intact",
     ["tests/test_bad_inputs.py::"
      "test_ctrl_c_of_a_new_run_into_a_used_out_leaves_the_earlier_run_intact",
      "tests/test_bad_inputs.py::"
      "test_kill_9_into_a_used_out_then_resume_from_the_staging_folder",
      "tests/test_bad_inputs.py::"
      "test_ctrl_c_of_evaluate_into_a_used_out_leaves_the_earlier_run_intact"]),
    ("--export hf over a read-only OUT/hf: refused before the run; a failed export keeps "
     "the finished run (one line)",
     ["tests/test_bad_inputs.py::test_a_read_only_earlier_export_is_refused_before_the_run",
      "tests/test_bad_inputs.py::"
      "test_a_failed_export_keeps_the_finished_run_and_says_so_in_one_line"]),
    ("a rerun without --export leaves no stale hf/",
     ["tests/test_bad_inputs.py::test_a_rerun_without_export_leaves_no_stale_export"]),
    ("evaluate --out: staged, refused without --overwrite, run intact",
     [f"{BAD}[evaluate into a used out, no --overwrite]",
      f"{BAD}[evaluate: OUT/metrics.json is a folder]",
      "tests/test_bad_inputs.py::"
      "test_evaluate_with_overwrite_replaces_the_earlier_run_but_keeps_its_checkpoint"]),
    ("timm pretrained_cfg: its normalisation and size, shown in config.yaml",
     [f"{PREP}test_timm_pretrained_cfg_sets_normalisation_and_size",
      f"{PREP}test_a_real_timm_config_names_the_resize_and_crop_it_does_not_apply"]),
    ("Hugging Face folder with a processor: its normalisation, shown in config.yaml",
     [f"{PREP}test_hugging_face_processor_sets_normalisation",
      f"{PREP}test_a_saved_hugging_face_processor_names_what_is_not_applied"]),
    ("a tree of mixed image sizes runs with --image-size (memory and disk)",
     [f"{PREP}test_mixed_image_sizes_run_with_image_size"]),
    ("the verdict line of each run (console, metrics.json, HTML report)",
     ["tests/test_verdict.py::test_finetune_prints_the_verdict_start_head_and_marked_table",
      "tests/test_verdict.py::test_report_shows_each_runs_verdict_and_marks_the_objective",
      "tests/test_verdict.py::test_verdict_of_a_coverage_run_that_misses_its_target"]),
]  # fmt: skip


def main() -> int:
    failed = 0
    for item, tests in ITEMS:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        holds = run.returncode == 0
        failed += not holds
        print(f"{'holds' if holds else 'DOES NOT HOLD'}: {item} ({len(tests)} test(s))")
        if not holds:
            print(run.stdout[-2000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
