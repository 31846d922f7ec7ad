"""The prepared GPU check: every path of selmix on one CUDA device, in one command.

Run it from the repository root on a machine with a GPU (``bash scripts/gpu_check.sh``);
it needs torch with CUDA, torchvision, pytest and what ``pyproject.toml`` lists, and no
network: its image tree is made from the Fashion-MNIST-LT subset the package ships. Each
step runs as its own process, with a time limit, so that one failure still leaves the
others' rows; the whole check is sized for at most 6 minutes on one H200.

Steps: the test suite in its GPU mode (``python -m pytest --device cuda``), ``selmix demo
--device cuda``, a command-line pre-training, a frozen and a whole-model fine-tune, a cRT
baseline and an evaluation on an image tree, and one ``torchrun`` process (NCCL) that must
give the plain process's numbers. It writes ``docs/results/gpu.md`` (or ``--out``): the GPU,
its driver and torch, then one row per step.

    bash scripts/gpu_check.sh                 # everything
    python scripts/gpu_check.py --skip-tests  # the command-line steps only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _environment() -> list[str]:
    import torch

    lines = [
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}"
    ]
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
        lines.append(f"- GPU (nvidia-smi: name, driver, memory): {query}")
    except (OSError, subprocess.SubprocessError) as error:
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        lines.append(f"- GPU: {name} (nvidia-smi failed: {error})")
    return lines


def _run(
    command: list[str], log: Path, limit: float, env: dict[str, str]
) -> tuple[int, float, str]:
    """Runs ``command``; returns (exit status, seconds, its output), the output also in
    ``log``. A command past ``limit`` seconds is stopped (status 124)."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
        )
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = 124
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(
            expired.stdout, bytes) else (expired.stdout or "")  # fmt: skip
    seconds = time.perf_counter() - started
    log.write_text(" ".join(command) + "\n\n" + output)
    print(f"[{status}] {seconds:6.1f} s  {' '.join(command)}", flush=True)
    if status != 0:
        print("\n".join(output.strip().splitlines()[-15:]), flush=True)
    return status, seconds, output


def _make_tree(root: Path) -> Path:
    """root/{train,val,test}/<class>/*.png: the packaged Fashion-MNIST-LT demo subset (a
    long-tailed train split, 100 validation and 300 test images per class), as PNG files."""
    import numpy as np
    from PIL import Image

    from selmix.data.sources import DEMO_FILE

    data = np.load(ROOT / "src" / "selmix" / "assets" / DEMO_FILE)
    classes = [str(name).replace("/", "-") for name in data["classes"]]
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(folder / f"{index}.png")
    return root


def _metric(path: Path, split: str, key: str) -> float | None:
    """``metrics.json[split][key]`` (``split``: "test" of a pre-training, "before" or
    "after" of a fine-tune or baseline), or None."""
    try:
        value = json.loads(path.read_text())[split][key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if value is None else float(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/gpu.md")
    parser.add_argument("--logs", type=Path, default=None, help="folder of the steps' logs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-workers", type=int, default=8,
                        help="pytest-xdist workers (0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="selmix-gpu-check-"))
    logs = args.logs or work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
           "SELMIX_CACHE_DIR": str(work / "cache")}  # fmt: skip
    selmix = [sys.executable, "-m", "selmix"]
    device = ["--device", args.device]
    quiet = ["--set", "progress=false"]
    rows: list[tuple[str, str, int, float, str]] = []

    def step(name: str, command: list[str], limit: float, result: str = "") -> tuple[int, str]:
        status, seconds, output = _run(command, logs / f"{len(rows):02d}-{name}.log", limit, env)
        shown = " ".join(command).replace(str(work), "$TMP").replace(sys.executable, "python")
        rows.append((name, shown, status, seconds, result))
        return status, output

    if not args.skip_tests:
        workers = ["-n", str(args.test_workers)] if args.test_workers else []
        status, output = step(
            "tests on the GPU",
            [sys.executable, "-m", "pytest", "--device", args.device, "-q",
             "-p", "no:cacheprovider", *workers],
            limit=240,
        )  # fmt: skip
        summary = re.findall(r"\d+ (?:passed|failed|skipped|errors?)", output)
        rows[-1] = (*rows[-1][:4], ", ".join(summary) or "no summary line")

    demo_out = work / "demo"
    status, _ = step(
        "selmix demo",
        [*selmix, "demo", *device, "--out", str(demo_out), "--no-progress"],
        180,
    )
    if status == 0:
        metrics = demo_out / "metrics.json"
        rows[-1] = (*rows[-1][:4], _demo_line(metrics))

    tree = _make_tree(work / "tree")
    data = ["--data", f"imagefolder:{tree}", "--seed", "0"]
    pre = work / "pre"
    pretrain = [*selmix, "pretrain", *data, "--model", "small_cnn", "--epochs", "10"]
    step("pretrain (CLI, image tree)", [*pretrain, "--out", str(pre), *device, *quiet], 120)
    rows[-1] = (*rows[-1][:4], _test_line(pre / "metrics.json", "test"))
    finetune = [*selmix, "finetune", *data, "--checkpoint", str(pre / "model.pt"),
                "--objective", "min_recall", "--steps", "200", *device, *quiet]  # fmt: skip
    step("finetune frozen", [*finetune, "--out", str(work / "frozen")], 120)
    rows[-1] = (*rows[-1][:4], _test_line(work / "frozen" / "metrics.json"))
    step(
        "finetune whole model",
        [*finetune, "--set", "frozen_backbone=false", "--out", str(work / "whole")],
        120,
    )
    rows[-1] = (*rows[-1][:4], _test_line(work / "whole" / "metrics.json"))
    crt = [*selmix, "baseline", *data, "--checkpoint", str(pre / "model.pt"), "--method", "crt"]
    step("baseline crt", [*crt, "--out", str(work / "crt"), *device, *quiet], 120)
    rows[-1] = (*rows[-1][:4], _test_line(work / "crt" / "metrics.json"))
    status, _ = step(
        "torchrun, 1 process (NCCL)",
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "-m", "selmix", *finetune[3:], "--out", str(work / "torchrun")],
        limit=150,
    )  # fmt: skip
    same = _metric(work / "torchrun" / "metrics.json", "after", "min_recall") == _metric(
        work / "frozen" / "metrics.json", "after", "min_recall"
    )
    agreement = "the plain process's test min recall" if same else "differs from the plain process"
    rows[-1] = (*rows[-1][:4], f"{_test_line(work / 'torchrun' / 'metrics.json')}; {agreement}")

    lines = [
        "# selmix on a GPU",
        "",
        f"Command: `bash scripts/gpu_check.sh` ({time.strftime('%Y-%m-%d')}); the image tree is "
        "the packaged Fashion-MNIST-LT demo subset as PNG files (10 classes, rho = 100, 3,720 "
        "training, 100 validation and 300 test images per class), seed 0.",
        "",
        *_environment(),
        "",
        "| step | exit | seconds | result | command |",
        "|---|---|---|---|---|",
        *(f"| {name} | {status} | {seconds:.1f} | {result} | `{command}` |"
          for name, command, status, seconds, result in rows),
    ]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [name for name, _, status, _, _ in rows if status != 0]
    print(f"\ngpu check: {len(rows) - len(failed)} of {len(rows)} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; logs in {logs}")  # fmt: skip
    if args.logs is None:
        shutil.rmtree(work / "tree", ignore_errors=True)
    return 1 if failed else 0


def _test_line(path: Path, split: str = "after") -> str:
    """Test min / mean recall of a run's ``metrics.json`` (before -> after for a fine-tune)."""

    def pair(which: str) -> str | None:
        low, mean = _metric(path, which, "min_recall"), _metric(path, which, "mean_recall")
        return None if low is None or mean is None else f"{100 * low:.1f} / {100 * mean:.1f}"

    after = pair(split)
    if after is None:
        return "no metrics.json"
    before = pair("before") if split == "after" else None
    return "test min / mean recall " + (f"{before} -> {after}" if before else after)


def _demo_line(path: Path) -> str:
    """The demo's test min recall before and after each objective's run."""
    try:
        metrics = json.loads(path.read_text())
        before = metrics["before"]["min_recall"]
        after = {name: run["min_recall"] for name, run in metrics["after"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return "no metrics.json"
    runs = ", ".join(f"{name} {100 * value:.1f}" for name, value in after.items())
    return f"test min recall {100 * before:.1f} before; after: {runs}"


if __name__ == "__main__":
    sys.exit(main())
