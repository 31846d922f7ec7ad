"""The ``selmix`` entry point, :func:`main`: parse, run the command, and turn every user
error into one line on stderr with its exit status."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from selmix.cli.baseline import _cmd_baseline
from selmix.cli.demo import _cmd_demo
from selmix.cli.evaluate import _cmd_evaluate
from selmix.cli.finetune import _cmd_finetune
from selmix.cli.options import EXIT_USAGE, PROG, _one_line
from selmix.cli.parser import _build_parser, resolve_settings
from selmix.cli.pretrain import _cmd_pretrain
from selmix.cli.run import _ARGV, _Interrupted

_RUNNERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "pretrain": _cmd_pretrain,
    "finetune": _cmd_finetune,
    "baseline": _cmd_baseline,
    "evaluate": _cmd_evaluate,
    "demo": _cmd_demo,
}


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "out of memory" in text or "DefaultCPUAllocator" in text


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``selmix`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a usage error, 1 for a failed run, 130 when
        interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    try:
        args = _build_parser(show_defaults=True).parse_args(argv)
    except SystemExit as exit_request:  # --help, --version or an argparse error
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    command = args.command
    started = time.perf_counter()

    def show_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
        print(f"{PROG} {command}: warning: {_one_line(message)}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning  # one line, no source excerpt
            settings = resolve_settings(command, argv)
            status = _RUNNERS[command](settings)
    except KeyboardInterrupt as interrupt:
        text = str(interrupt) if isinstance(interrupt, _Interrupted) else "interrupted"
        print(f"{PROG} {command}: {text}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError, ImportError, MemoryError) as error:
        if os.environ.get("SELMIX_DEBUG"):
            raise
        print(f"{PROG} {command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (FloatingPointError, RuntimeError) as error:
        if os.environ.get("SELMIX_DEBUG"):
            raise
        if _is_out_of_memory(error):
            # a batch too large for the memory, outside the fine-tuning loop's own check
            print(
                f"{PROG} {command}: error: out of memory ({_one_line(error)[:200]}); lower "
                "`batch_size` (or `eval_batch_size`)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        print(f"{PROG} {command}: failed: {_one_line(error)}", file=sys.stderr)
        return 1
    # under torchrun only rank 0 reports
    if command != "demo" and os.environ.get("RANK", "0") == "0":
        print(f"done in {time.perf_counter() - started:.1f} s")
    return status
