"""Benchmarks that print a table and ratios: `python -m experiments bench fisher`."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fed_app.config import RunConfig
from fed_app.model import build_model
from masking.fisher import fisher_diagonal


def _measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
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


def _loop_fisher(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: one forward and backward per sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in params.items():
            scores[n] += p.grad.square()
    return scores


def bench_fisher(model_name: str, samples: int, chunk: int, repeats: int, device: torch.device) -> list[dict]:
    model, spec = build_model(RunConfig(model=model_name, model_weights="random"), 100)
    model.to(device).eval()
    model.head.requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(samples, 3, spec.input_size, spec.input_size, device=device, generator=g)
    y = torch.randint(0, 100, (samples,), device=device, generator=g)
    methods = {
        "exact per-sample (vmap)": lambda: fisher_diagonal(model, x, y, mode="empirical", chunk_size=chunk),
        "per-sample backward loop": lambda: _loop_fisher(model, x, y),
        "batch shortcut (not exact)": lambda: fisher_diagonal(model, x, y, mode="batch", chunk_size=chunk),
    }
    rows = []
    for name, fn in methods.items():
        seconds, peak = _measure(fn, device, repeats)
        rows.append({"method": name, "s_per_1000": seconds * 1000 / samples, "peak_mib": peak})
    return rows


def print_fisher(rows: list[dict], header: str) -> None:
    ref = rows[1]["s_per_1000"]
    print(header)
    print("| method | s / 1000 samples | peak MiB | loop time / this |")
    print("|---|---|---|---|")
    for r in rows:
        peak = "n/a (CPU)" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {r['method']} | {r['s_per_1000']:.3f} | {peak} | {ref / r['s_per_1000']:.1f}x |")
