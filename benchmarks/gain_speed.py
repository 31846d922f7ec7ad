"""Speed and peak memory of `selmix.core.gain_matrix` (docs/maths.md section 3).

Times one gain matrix (median of --repeats calls after a warm-up) for K in {10, 100, 1000}
and d in {64, 512, 2048}, for the objectives mean_recall, h_mean and mean_recall_min_coverage
(multipliers updated first), in float32. Inputs are realistic: a confusion matrix with a
dominant diagonal and head-biased mistakes, prototypes from randn, an nn.Linear head.

Peak memory: each K = 1000 configuration runs in a fresh subprocess
(``--single K d objective``), which reports its peak RSS minus the RSS right after its
imports (inputs included). On Linux the peak is VmHWM of /proc/self/status, reset after the
imports through /proc/self/clear_refs: ru_maxrss is not usable here, because a child's
ru_maxrss starts at its parent's RSS at fork time. On CUDA the peak of torch's allocator is
read in-process instead.

Side by side, a straightforward reference written here the way the authors' code is
organised: a Python loop over the (i, j) pairs fills the K x K x K x K tensor dA_ij[q, l],
which is then contracted with d psi / dA. It uses the exact derivative (z_ij . mu_q, not
mu_i . mu_q), so its result must equal selmix's; it runs for K = 10 and 100 with mean_recall
(K = 1000 would need 4 TB).

Usage:
    python benchmarks/gain_speed.py [--repeats 5] [--device cpu|cuda] [--threads N]
                                    [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import selmix

KS = (10, 100, 1000)
DIMS = (64, 512, 2048)
OBJECTIVES = ("mean_recall", "h_mean", "mean_recall_min_coverage")
REFERENCE_KS = (10, 100)
MIX = 0.8
TARGET_K100_S = 2e-3
TARGET_K1000_D2048_S = 0.5
TARGET_PEAK_MB = 1024.0


def make_inputs(num_classes: int, dim: int, device: str, seed: int = 0):
    """A realistic validation confusion matrix, prototypes and a linear head (float32)."""
    generator = torch.Generator().manual_seed(seed)
    k = torch.arange(num_classes, dtype=torch.float64)
    recall = 0.9 - 0.5 * k / (num_classes - 1)  # head classes are recalled better
    mistakes = torch.rand(num_classes, num_classes, dtype=torch.float64, generator=generator)
    mistakes = mistakes / (1.0 + 4.0 * k / num_classes)  # mistakes go to head classes
    mistakes.fill_diagonal_(0.0)
    mistakes = mistakes / mistakes.sum(dim=1, keepdim=True) * (1 - recall)[:, None]
    confusion = (mistakes + torch.diag(recall)) / num_classes  # a balanced validation set
    prototypes = torch.randn(num_classes, dim, generator=generator)
    torch.manual_seed(seed)
    head = nn.Linear(dim, num_classes)
    return confusion.to(device), prototypes.to(device), head.to(device)


def make_objective(name: str, confusion: torch.Tensor):
    objective = selmix.get_objective(name)
    objective.update(confusion)
    return objective


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(function, repeats: int, device: str, warmup: bool = True):
    """Median wall time and median CPU time of ``repeats`` calls (after one untimed call),
    and the last result.

    The CPU time (this process, all its threads) barely depends on other processes'
    load, where the wall time on a shared machine does.
    """
    if warmup:
        function()
        synchronize(device)
    times, cpu_times = [], []
    result = None
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = function()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), statistics.median(cpu_times), result


def reference_gain_k4(objective, confusion, prototypes, head, mix=MIX):
    """The K^4 formulation: fill dA_ij[q, l] pair by pair, then contract with d psi / dA."""
    num_classes = prototypes.shape[0]
    grad_a = selmix.core.confusion_gradient(objective, confusion).to(prototypes)
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    beta = 0.0 if bias is None else 1.0
    eye = torch.eye(num_classes, dtype=prototypes.dtype, device=prototypes.device)
    delta = torch.empty((num_classes,) * 4, dtype=prototypes.dtype, device=prototypes.device)
    for i in range(num_classes):
        for j in range(num_classes):
            mixed = mix * prototypes[i] + (1 - mix) * prototypes[j]
            logits = weight @ mixed if bias is None else weight @ mixed + bias
            probs = torch.softmax(logits, dim=0)
            delta[i, j] = (prototypes @ mixed + beta)[:, None] * (eye[i] - probs)[None, :]
    return torch.einsum("ijql,ql->ij", delta, grad_a)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB, None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> float:
    """Starts a new peak-RSS window; returns the baseline in MB.

    ru_maxrss of a child process starts at its parent's RSS at fork time on Linux, so it
    cannot measure a fresh subprocess; VmHWM of /proc/self/status belongs to the process's
    own address space, and writing 5 to /proc/self/clear_refs resets it to the current RSS.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        current = _status_mb("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    high_water = _status_mb("VmHWM")
    if high_water is not None:
        return high_water
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def peak_rss() -> float:
    high_water = _status_mb("VmHWM")
    if high_water is not None:
        return high_water
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_single(num_classes: int, dim: int, name: str, device: str) -> dict:
    """One configuration in this (fresh) process: extra peak memory of building and gaining."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    confusion, prototypes, head = make_inputs(num_classes, dim, device)
    objective = make_objective(name, confusion)
    start = time.perf_counter()
    gains = selmix.core.gain_matrix(objective, confusion, prototypes, head, mix=MIX)
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss() - base
    return {"peak_mb": peak, "seconds": seconds, "finite": bool(torch.isfinite(gains).all())}


def peak_in_subprocess(num_classes: int, dim: int, name: str, args) -> float:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--single",
        str(num_classes),
        str(dim),
        name,
        "--device",
        args.device,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    if not result["finite"]:
        raise RuntimeError(f"non-finite gain for K={num_classes} d={dim} {name}")
    return result["peak_mb"]


def format_seconds(seconds: float) -> str:
    if seconds < 1e-2:
        return f"{seconds * 1e3:.3f} ms"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's default)"
    )
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument(
        "--single", nargs=3, metavar=("K", "D", "OBJECTIVE"), help=argparse.SUPPRESS
    )  # internal: one configuration, JSON on stdout
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    if args.single:
        num_classes, dim, name = int(args.single[0]), int(args.single[1]), args.single[2]
        print(json.dumps(run_single(num_classes, dim, name, args.device)))
        return

    on_cuda = args.device.startswith("cuda")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# selmix.core.gain_matrix speed ({args.device}, float32)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s) of "
        f"{os.cpu_count()} cores, load average at start {load:.2f}; median of {args.repeats} "
        "calls after a warm-up; multipliers updated before timing.",
        "peak MB: "
        + (
            "CUDA allocator peak above the memory in use before the inputs"
            if on_cuda
            else "peak RSS (VmHWM) of a fresh subprocess minus its RSS after "
            "imports (inputs included; measured for K = 1000)"
        )
        + ".",
        "selmix: median wall time per gain matrix; CPU time: median process CPU time of the "
        "same calls (all threads; less sensitive to other processes' load).",
        "K^4 reference: dA_ij[q, l] filled by a Python loop over (i, j), then contracted "
        "(the authors' organisation, exact derivative); mean_recall only.",
        "",
        "| K | d | objective | selmix | selmix CPU time | peak MB | K^4 reference "
        "| speed-up | max rel. diff |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    k100_worst = k100_cpu_worst = 0.0
    k1000_d2048_worst = k1000_d2048_cpu_worst = 0.0
    peak_worst = 0.0
    for num_classes in KS:
        for dim in DIMS:
            confusion, prototypes, head = make_inputs(num_classes, dim, args.device)
            for name in OBJECTIVES:
                objective = make_objective(name, confusion)

                def gain(
                    objective=objective, confusion=confusion, prototypes=prototypes, head=head
                ):
                    return selmix.core.gain_matrix(objective, confusion, prototypes, head, mix=MIX)

                seconds, cpu_seconds, actual = median_seconds(gain, args.repeats, args.device)
                cpu = "-" if on_cuda else format_seconds(cpu_seconds)
                peak = "-"
                if on_cuda:
                    peak_mb = run_single(num_classes, dim, name, args.device)["peak_mb"]
                    peak, peak_worst = f"{peak_mb:.0f}", max(peak_worst, peak_mb)
                elif num_classes == 1000:
                    peak_mb = peak_in_subprocess(num_classes, dim, name, args)
                    peak, peak_worst = f"{peak_mb:.0f}", max(peak_worst, peak_mb)
                reference = speedup = diff = "-"
                if name == "mean_recall":
                    if num_classes in REFERENCE_KS:

                        def slow(
                            objective=objective,
                            confusion=confusion,
                            prototypes=prototypes,
                            head=head,
                        ):
                            return reference_gain_k4(objective, confusion, prototypes, head)

                        ref_repeats = args.repeats if num_classes <= 10 else min(args.repeats, 3)
                        ref_seconds, _, expected = median_seconds(
                            slow, ref_repeats, args.device, warmup=num_classes <= 10
                        )
                        rel = float((actual - expected).abs().max() / expected.abs().max())
                        reference = format_seconds(ref_seconds)
                        ratio = ref_seconds / seconds
                        speedup = f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2f}x"
                        diff = f"{rel:.1e}"
                        del expected
                    else:
                        reference = "n/a (K^4 memory)"
                if num_classes == 100:
                    k100_worst = max(k100_worst, seconds)
                    k100_cpu_worst = max(k100_cpu_worst, cpu_seconds)
                if num_classes == 1000 and dim == 2048:
                    k1000_d2048_worst = max(k1000_d2048_worst, seconds)
                    k1000_d2048_cpu_worst = max(k1000_d2048_cpu_worst, cpu_seconds)
                row = (
                    f"| {num_classes} | {dim} | {name} | {format_seconds(seconds)} | {cpu} "
                    f"| {peak} | {reference} | {speedup} | {diff} |"
                )
                lines.append(row)
                print(row, flush=True)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def cpu_note(cpu_seconds: float) -> str:
        return "" if on_cuda else f" (CPU time {format_seconds(cpu_seconds)})"

    summary = [
        "",
        "Targets (wall time; on a loaded machine see the CPU time too):",
        f"- K = 100 (every d, objective) <= 2 ms: worst {format_seconds(k100_worst)}"
        f"{cpu_note(k100_cpu_worst)} {verdict(k100_worst <= TARGET_K100_S)}",
        f"- K = 1000, d = 2048 <= 0.5 s: worst {format_seconds(k1000_d2048_worst)}"
        f"{cpu_note(k1000_d2048_cpu_worst)} "
        f"{verdict(k1000_d2048_worst <= TARGET_K1000_D2048_S)}",
        f"- peak memory < 1 GB: worst {peak_worst:.0f} MB {verdict(peak_worst < TARGET_PEAK_MB)}",
    ]
    print("\n".join(summary))
    lines += summary
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
