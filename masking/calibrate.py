"""Gradient-mask calibration in R rounds (TaLoS): density d^(r/R), one global threshold, five rules.

A mask is a dict {parameter name: bool tensor}, True = trainable. Each round keeps round(d^(r/R) * N)
entries trainable among those still trainable (frozen entries never come back), ranked by the rule's
score; ties are broken by a seeded random order. Sensitivity rules rescore every round on the model
with its already-frozen weights multiplied by `damping` (TaLoS's soft mask), under one threshold across
layers. Rules whose score does not depend on data (magnitude, random) are computed in one round, as TaLoS
does: R rounds would only redraw their ties; and, as TaLoS does, per layer (each tensor keeps its share),
unless `per_layer` is False.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import torch
from torch import Tensor

from fed_app.registry import MASK_RULES
from masking.fisher import scored_parameters

log = logging.getLogger(__name__)

Masks = dict[str, Tensor]


@dataclass(frozen=True)
class MaskRule:
    """How a rule ranks the trainable entries: by Fisher sensitivity, rescored on data every round (score
    None), or by `score(params, generator)`; the lowest scores stay trainable (keep_lowest) or the highest."""

    keep_lowest: bool
    score: Callable[[dict[str, Tensor], torch.Generator], dict[str, Tensor]] | None = None

    @property
    def needs_fisher(self) -> bool:
        return self.score is None


def magnitude(params: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    return {n: p.detach().abs().float() for n, p in params.items()}


def uniform(params: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    return {n: torch.rand(p.shape, device=p.device, generator=generator) for n, p in params.items()}


for _name, _rule in {"least-sensitive": MaskRule(True), "most-sensitive": MaskRule(False),
                     "lowest-magnitude": MaskRule(True, magnitude), "highest-magnitude": MaskRule(False, magnitude),
                     "random": MaskRule(True, uniform)}.items():
    MASK_RULES.register(_name)(_rule)
RULES = MASK_RULES


def density_schedule(target_density: float, rounds: int) -> list[float]:
    """Trainable fraction after each round: d^(r/R), r = 1..R."""
    return [target_density ** (r / rounds) for r in range(1, rounds + 1)]


@torch.no_grad()
def shrink_masks(scores: dict[str, Tensor], masks: Masks, keep: int, keep_lowest: bool,
                 generator: torch.Generator) -> Masks:
    """Keep `keep` entries trainable, chosen among the trainable ones by score over all layers at once."""
    names = list(masks)
    alive = torch.cat([masks[n].flatten() for n in names])
    if not 0 <= keep <= int(alive.sum()):
        raise ValueError(f"cannot keep {keep} entries trainable out of {int(alive.sum())}.")
    key = torch.cat([scores[n].flatten().double().to(alive.device) for n in names])
    key = key if keep_lowest else -key
    key = torch.where(alive & ~key.isnan(), key, math.inf)
    perm = torch.randperm(len(key), device=alive.device, generator=generator)
    chosen = perm[torch.argsort(key[perm], stable=True)[:keep]]  # ties: the seeded order decides
    flat = torch.zeros_like(alive)
    flat[chosen] = True
    return {n: part.view_as(masks[n]) for n, part in zip(names, flat.split([masks[n].numel() for n in names]))}


def calibrate(
    model: torch.nn.Module,
    rule: str,
    sparsity: float,
    rounds: int,
    score_fn: Callable[[torch.nn.Module], dict[str, Tensor]],
    damping: float = 0.1,
    seed: int = 0,
    per_layer: bool = True,
) -> Masks:
    """Masks over the model's trainable parameters; `score_fn(model)` gives Fisher sums (by name); `per_layer`:
    a rule without data (magnitude, random) thresholds each tensor on its own (TaLoS), else all at once."""
    ranking = MASK_RULES.get(rule)
    params = scored_parameters(model)
    device = next(iter(params.values())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    keep_lowest = ranking.keep_lowest
    rounds = rounds if ranking.needs_fisher else 1
    for r, density in enumerate(density_schedule(1.0 - sparsity, rounds), start=1):
        if ranking.needs_fisher:
            with damped(model, masks, damping):
                scores = score_fn(model)
            masks = shrink_masks(scores, masks, round(density * total), keep_lowest, generator)
        else:
            scores = ranking.score(params, generator)
            groups = [[n] for n in masks] if per_layer else [list(masks)]
            masks = {n: m for names in groups for n, m in shrink_masks(
                {n: scores[n] for n in names}, {n: masks[n] for n in names},
                round(density * sum(masks[n].numel() for n in names)), keep_lowest, generator).items()}
        log.info("calibration round %d/%d (%s): density %.4f", r, rounds, rule, density_of(masks))
    return masks


@contextlib.contextmanager
def damped(model: torch.nn.Module, masks: Masks, damping: float):
    """Frozen entries multiplied by `damping` inside the block; the exact weights come back after."""
    params = {n: p for n, p in model.named_parameters() if n in masks}
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(torch.where(masks[n], 1.0, damping))
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def density_of(masks: Masks) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def mask_stats(masks: Masks) -> list[dict]:
    """Per-layer trainable counts and density, then a total row."""
    rows = [{"name": n, "numel": m.numel(), "trainable": int(m.sum()), "density": float(m.float().mean())}
            for n, m in masks.items()]
    total = sum(r["numel"] for r in rows)
    trainable = sum(r["trainable"] for r in rows)
    return rows + [{"name": "total", "numel": total, "trainable": trainable, "density": trainable / total}]


def save_masks(masks: Masks, out: BinaryIO) -> None:
    """The masks (name -> bool tensor) as torch.save bytes into `out`: the run's folder writes them to disk
    whole, fsynced, with its full-disk sentence, and reads them back weights-only (fed_app/runs/rundir.py)."""
    torch.save({n: m.cpu() for n, m in masks.items()}, out)
