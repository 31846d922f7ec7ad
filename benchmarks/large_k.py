"""K = 1000 in practice: a frozen-backbone SelMix run on synthetic features, timed.

For each feature dimension d it draws class-conditional features (``_versus_cases.py``'s
generator: K = 1000, rho = 100, N_1 = 200, 20 validation samples per class), fits the
cross-entropy start, and runs :func:`selmix.finetune` with the library defaults (frozen
backbone) in a fresh process, so that each configuration's peak resident memory is its
own. It reports the mean and largest time of a feedback step (evaluation, multipliers,
gain matrix and policy), the whole run's wall time and the peak resident memory.

    PYTHONPATH=src python benchmarks/large_k.py --dims 512 2048 --out docs/results/large_k.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def one_run(dim: int, steps: int | None, threads: int) -> dict:
    import _versus_cases as versus
    import selmix

    torch.set_num_threads(threads)
    spec = dataclasses.replace(versus.GAUSS_1000, dim=dim, held_out=20, test_per_class=20)
    data = versus.load_gauss(spec)
    # the start only needs to be a biased cross-entropy head: a short fit (timing only)
    model = versus.train_linear_head(spec, data.train, epochs=2)
    settings = {} if steps is None else {"steps": steps}
    started = time.perf_counter()
    result = selmix.finetune(model, data.train, data.val, "h_mean", progress=False, **settings)
    wall = time.perf_counter() - started
    feedback = [record["feedback_seconds"] for record in result.history]
    return {
        "dim": dim,
        "num_classes": spec.num_classes,
        "train": len(data.train),
        "val": len(data.val),
        "steps": result.config.steps,
        "feedback_steps": len(feedback),
        "feedback_mean_s": sum(feedback) / len(feedback),
        "feedback_max_s": max(feedback),
        "feedback_share": sum(feedback) / wall,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "val_h_mean": result.history[result.selected_step // result.config.feedback_every][
            "metrics"]["h_mean"] if result.selected_step % result.config.feedback_every == 0
        else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=None, help="default: the library's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_run(args.child, args.steps, args.threads)))
        return
    from _common import machine_line

    rows = []
    for dim in args.dims:
        command = [sys.executable, __file__, "--child", str(dim), "--threads", str(args.threads)]
        if args.steps is not None:
            command += ["--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [
        f"Command: `python benchmarks/large_k.py {' '.join(sys.argv[1:])}`; machine: "
        f"{machine_line(args.threads)}. Synthetic features (benchmarks/_versus_cases.py), "
        "K = 1000, rho = 100, N_1 = 200, 20 validation samples per class, objective H-mean, "
        "library defaults (frozen backbone), seed 0.",
        "",
        "| d | train / val samples | steps | feedback steps | feedback step mean / max (s) "
        "| feedback share of wall | run wall (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dim']} | {r['train']} / {r['val']} | {r['steps']} | {r['feedback_steps']} | "
            f"{r['feedback_mean_s']:.3f} / {r['feedback_max_s']:.3f} | "
            f"{100 * r['feedback_share']:.0f}% | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
