"""Models on the wire: one flat float32 buffer instead of one array per tensor (~150 for a ViT); under a
global mask, only the entries that can differ from the initial model."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from masking.payload import add_trainable_, gather_trainable

State = dict[str, Tensor]
Shapes = dict[str, torch.Size]


def flat_state(state: State) -> State:
    """Every tensor, in the dict's order, flattened into one float32 vector under the key 'flat'. Tensors
    that already are, in order, the whole of one such vector (split_flat's views) give it without a copy."""
    tensors = list(state.values())
    base = tensors[0]._base if tensors else None
    if base is not None and base.dim() == 1 and base.dtype == torch.float32 and base.device.type == "cpu":
        offsets = [base.storage_offset()]
        for t in tensors:
            offsets.append(offsets[-1] + t.numel())
        if offsets[-1] - offsets[0] == base.numel() and all(
                t._base is base and t.is_contiguous() and t.storage_offset() == o for t, o in zip(tensors, offsets)):
            return {"flat": base}
    return {"flat": torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])}


def pack_state(state: State) -> ArrayRecord:
    """flat_state as a Flower ArrayRecord."""
    return ArrayRecord(flat_state(state))


def unpack_state(record: ArrayRecord, shapes: Shapes) -> State:
    """Inverse of pack_state, for tensors of these names and shapes (the same order on both sides)."""
    return split_flat(record.to_torch_state_dict()["flat"], shapes)


def split_flat(flat: Tensor, shapes: Shapes) -> State:
    sizes = [s.numel() for s in shapes.values()]
    if flat.numel() != sum(sizes):
        raise ValueError(f"a flat model of {flat.numel()} values does not fit {sum(sizes)}; the two sides differ.")
    return {n: part.view(s) for (n, s), part in zip(shapes.items(), flat.split(sizes))}


def masked_state(state: State, masks: dict[str, Tensor]) -> State:
    """A model under a global mask, as only what can differ from the seeded initial model: its trainable
    entries ('values', in mask order) and every parameter the mask does not cover ('rest', e.g. the head)."""
    rest = [t.detach().reshape(-1).float() for n, t in state.items() if n not in masks]
    return {"values": gather_trainable(state, masks), "rest": torch.cat(rest) if rest else torch.zeros(0)}


def unpack_masked_state(arrays: State, base: State, masks: dict[str, Tensor]) -> State:
    """Inverse of masked_state: `base` (the initial model, whose frozen entries the
    global model keeps bit for bit) with the trainable entries and the uncovered parameters put back."""
    state = {n: t.clone() for n, t in base.items()}
    offset = 0
    for n, m in masks.items():
        k = int(m.sum())
        state[n].view(-1)[m.flatten()] = arrays["values"][offset:offset + k].to(state[n].dtype)
        offset += k
    rest = split_flat(arrays["rest"], {n: t.shape for n, t in base.items() if n not in masks})
    state.update({n: t.to(base[n].dtype) for n, t in rest.items()})
    return state


def apply_update(state: State, update: State, masks: dict[str, Tensor] | None) -> State:
    """global + averaged delta, in place: a flat dense delta, the flat trainable entries of a global mask,
    or (local masks) the parameters that have a mask; what no update names (the frozen head) is untouched."""
    if "values" in update:
        add_trainable_(state, update["values"], masks)
        return state
    if "flat" in update:
        update = split_flat(update["flat"], {n: t.shape for n, t in state.items()})
    for name, delta in update.items():
        state[name] += delta.to(state[name].dtype)
    return state
