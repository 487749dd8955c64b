"""What every benchmark shares: timing a callable on a device (CUDA-synchronized), progress lines, the table printer."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Best wall time of `repeats` runs after one warm-up, and peak CUDA memory in MiB (None on CPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return best, peak


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A Markdown table under a title line, as results/benchmarks.md records it."""
    print(title)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def progress(what: str, seconds_per_round: float, fixed: float | None = None) -> None:
    """One line on stderr per measurement as it ends, so that a long benchmark cut short still says something."""
    tail = f", fixed {fixed:.1f} s/run" if fixed is not None else ""
    print(f"  {what}: {seconds_per_round:.3f} s/round{tail}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def spread(values: list[float], digits: int = 3) -> str:
    """'4.780 (4.71-4.95)': the median of the repetitions and their range."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
