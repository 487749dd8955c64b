"""Combining the clients' own masks into one global mask (`mask-aggregation`): each client scores and
calibrates a mask on its own shard at the target sparsity, and the server keeps an entry trainable by a
stated rule. 'scores' (the default, not here) sums the clients' Fisher scores and calibrates one mask.

vote, intersection and union end at their own densities (intersection below the target, union above), so
density is confounded with the rule. 'vote-rank' is the equal-density comparison: the entries most clients
train, as many as a client's mask holds. Filling the intersection up to the target by vote rank, trimming the
union down to it, or moving the vote's quorum until it meets it all give that same mask (they differ only in
ties), which is why it is one rule and not three."""

from __future__ import annotations

import math

import torch

from masking.calibrate import Masks

RULES = ("vote", "intersection", "union", "vote-rank")


def combine_masks(masks: list[Masks], rule: str, quorum: float = 0.5, seed: int = 0) -> Masks:
    """vote: trainable where at least ceil(quorum * n) of the n clients train it; intersection: where all do;
    union: where any does; vote-rank: the k entries with the most votes, k the clients' mean trainable count,
    ties at the cut drawn at random (seeded, so every run of a config draws the same)."""
    counts = {name: sum(m[name].cpu().to(torch.int32) for m in masks) for name in masks[0]}
    if rule == "vote-rank":
        return _top_voted(counts, round(sum(_trainable(m) for m in masks) / len(masks)), seed)
    n = len(masks)
    need = {"vote": max(1, math.ceil(quorum * n - 1e-9)), "intersection": n, "union": 1}[rule]
    return {name: count >= need for name, count in counts.items()}


def _trainable(mask: Masks) -> int:
    return sum(int(m.sum()) for m in mask.values())


def _top_voted(counts: dict[str, torch.Tensor], k: int, seed: int) -> Masks:
    """The k entries with the highest counts over every tensor; a uniform draw in [0, 1) breaks ties only
    (counts are integers)."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.cat([c.flatten().double() for c in counts.values()])
    flat += torch.rand(flat.numel(), generator=generator, dtype=torch.float64)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k).indices] = True
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = keep[start:start + count.numel()].view(count.shape)
        start += count.numel()
    return out
