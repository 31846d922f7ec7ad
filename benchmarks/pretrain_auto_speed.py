"""`selmix pretrain` with the default hardware settings against fp32 + contiguous, 1 thread.

Runs ``selmix pretrain --data demo --model resnet32 --epochs 1 --threads 1`` (the CLI, one
process each, ``OMP_NUM_THREADS=1``) in these ways, in this order:

1. ``defaults, measured``: the defaults with an empty hardware cache (``SELMIX_CACHE_DIR``
   a fresh folder), so the run includes the timing of the ``auto`` candidates;
2. ``precision auto, measured``: ``--set precision=auto`` (precision and layout both
   measured), also with nothing cached for it yet;
3. ``defaults, cached`` and ``precision auto, cached``: the same again, the choices read
   from the cache;
4. ``fp32, contiguous``: ``--set precision=fp32 --set channels_last=false``.

Prints (and writes with ``--out``) a table of each run's wall time, the ratio to the fixed
run and the one line in which ``auto`` said what it chose; ``--repeats`` repeats the cached
and fixed runs alternately (the machine is shared: the table shows each run).

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/pretrain_auto_speed.py \\
        [--repeats 1] [--epochs 1] [--out docs/results/pretrain_auto_speed.md]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selmix.hardware import machine_description  # noqa: E402


def run(args: list[str], cache: str, out: str) -> tuple[float, str]:
    """Wall seconds of one CLI run and its ``selmix hardware:`` line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELMIX_CACHE_DIR": cache}
    command = [sys.executable, "-m", "selmix", "pretrain", *args, "--out", out]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-2000:]}")
    line = next((x for x in result.stdout.splitlines() if x.startswith("selmix hardware:")), "")
    return seconds, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    base = ["--data", "demo", "--model", options.model, "--epochs", str(options.epochs),
            "--threads", "1", "--no-progress"]  # fmt: skip
    fixed = [*base, "--set", "precision=fp32", "--set", "channels_last=false"]
    auto = [*base, "--set", "precision=auto"]
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as folder:
        cache, out = str(Path(folder) / "cache"), str(Path(folder) / "run")
        seconds, line = run(base, cache, out)
        rows.append(("defaults, measured (empty cache)", seconds, line))
        print(rows[-1], flush=True)
        seconds, line = run(auto, cache, out)
        rows.append(("precision auto, measured", seconds, line))
        print(rows[-1], flush=True)
        for _ in range(options.repeats):
            seconds, line = run(base, cache, out)
            rows.append(("defaults, cached", seconds, line))
            print(rows[-1], flush=True)
            seconds, line = run(auto, cache, out)
            rows.append(("precision auto, cached", seconds, line))
            print(rows[-1], flush=True)
            seconds, _ = run(fixed, cache, out)
            rows.append(("fp32, contiguous", seconds, ""))
            print(rows[-1], flush=True)
    reference = statistics.median(s for name, s, _ in rows if name == "fp32, contiguous")
    lines = [
        "# `selmix pretrain` with the default hardware settings vs fp32 + contiguous",
        "",
        f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=src python {shlex.join(sys.argv)}`",
        "",
        f"Machine: {machine_description()}, shared with other jobs. Each run: "
        f"`selmix pretrain {shlex.join(base)}` (one process, wall time including start-up, "
        "data loading and the final evaluation); `fp32, contiguous` adds `--set "
        "precision=fp32 --set channels_last=false`. Speed-up: the median fixed run's time "
        "divided by the run's.",
        "",
        "| run | wall s | speed-up vs fp32, contiguous | auto said |",
        "|---|---:|---:|---|",
    ]
    for name, seconds, line in rows:
        said = line.removeprefix("selmix hardware: ") if line else ""
        lines.append(f"| {name} | {seconds:.1f} | {reference / seconds:.2f}x | {said} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if options.out:
        Path(options.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
