"""Models on the wire as one flat float32 buffer instead of one array per tensor (~150 for a ViT)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import Tensor

State = dict[str, Tensor]
Shapes = dict[str, torch.Size]


def pack_state(state: State) -> ArrayRecord:
    """Every tensor, in the dict's order, flattened into one float32 vector under the key 'flat'."""
    return ArrayRecord({"flat": torch.cat([t.detach().reshape(-1).float().cpu() for t in state.values()])})


def unpack_state(record: ArrayRecord, shapes: Shapes) -> State:
    """Inverse of pack_state, for tensors of these names and shapes (the same order on both sides)."""
    return split_flat(record.to_torch_state_dict()["flat"], shapes)


def split_flat(flat: Tensor, shapes: Shapes) -> State:
    sizes = [s.numel() for s in shapes.values()]
    if flat.numel() != sum(sizes):
        raise ValueError(f"a flat model of {flat.numel()} values does not fit {sum(sizes)}; the two sides differ.")
    return {n: part.view(s) for (n, s), part in zip(shapes.items(), flat.split(sizes))}
