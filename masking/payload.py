"""Masks and sparse updates on the wire: masks as packed bits, updates as the trainable entries only.

Both sides order entries the same way: parameters in the given name order, each flattened (row-major),
keeping the entries whose mask is True. Frozen entries never travel.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

Masks = dict[str, Tensor]


def pack_masks(masks: Masks) -> np.ndarray:
    """All masks, in their dict order, as one packed uint8 bit array."""
    flat = torch.cat([m.flatten().cpu() for m in masks.values()]).numpy()
    return np.packbits(flat)


def unpack_masks(bits: np.ndarray, shapes: dict[str, torch.Size]) -> Masks:
    """Inverse of pack_masks for parameters of these shapes (in this order)."""
    sizes = [int(np.prod(s)) for s in shapes.values()]
    flat = torch.from_numpy(np.unpackbits(np.asarray(bits, dtype=np.uint8), count=sum(sizes)).astype(bool))
    return {n: part.view(s) for (n, s), part in zip(shapes.items(), flat.split(sizes))}


def gather_trainable(state: dict[str, Tensor], masks: Masks) -> Tensor:
    """The entries of `state` that the masks mark trainable, as one flat float32 vector."""
    return torch.cat([state[n].flatten()[m.flatten()].float() for n, m in masks.items()])


@torch.no_grad()
def add_trainable_(state: dict[str, Tensor], values: Tensor, masks: Masks) -> None:
    """state[n][mask] += values, in gather order; entries outside the masks are not touched at all."""
    offset = 0
    for n, m in masks.items():
        k = int(m.sum())
        flat = state[n].view(-1)
        flat[m.flatten()] += values[offset:offset + k].to(flat.dtype)
        offset += k
    if offset != len(values):
        raise ValueError(f"{len(values)} values for {offset} trainable entries; the masks do not match the update.")
