"""`bench fisher`: the exact per-sample Fisher diagonal against a per-sample loop, time and agreement."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from experiments.bench.timing import measure, print_table
from fed_app.config import RunConfig
from fed_app.task.head import freeze_head
from fed_app.task.model import build_model
from masking.fisher import fisher_diagonal


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
    freeze_head(model)
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
        seconds, peak = measure(fn, device, repeats)
        rows.append({"method": name, "s_per_1000": seconds * 1000 / samples, "peak_mib": peak})
    return rows


def print_fisher(rows: list[dict], header: str) -> None:
    loop = next(r["s_per_1000"] for r in rows if "loop" in r["method"])
    print_table(header, ["method", "s / 1000 samples", "peak MiB", "loop time / this"], [
        [r["method"], f"{r['s_per_1000']:.3f}", "n/a (CPU)" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
         f"{loop / r['s_per_1000']:.1f}x"] for r in rows])
