"""Combining the clients' own masks into one global mask (`mask-aggregation`): each client scores and
calibrates a mask on its own shard at the target sparsity, and the server keeps an entry trainable by a
stated rule. 'scores' (the default, not here) sums the clients' Fisher scores and calibrates one mask."""

from __future__ import annotations

import math

import torch

from masking.calibrate import Masks

RULES = ("vote", "intersection", "union")


def combine_masks(masks: list[Masks], rule: str, quorum: float = 0.5) -> Masks:
    """vote: trainable where at least ceil(quorum * n) of the n clients train it; intersection: where all do;
    union: where any does."""
    n = len(masks)
    need = {"vote": max(1, math.ceil(quorum * n - 1e-9)), "intersection": n, "union": 1}[rule]
    out = {}
    for name in masks[0]:
        count = torch.zeros(masks[0][name].shape, dtype=torch.int32)
        for m in masks:
            count += m[name].cpu().to(torch.int32)
        out[name] = count >= need
    return out
