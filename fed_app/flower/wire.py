"""What travels between server and clients, named once: the message keys (`Key`), the payload forms of a
model (`Form`: one flat float32 buffer instead of ~150 arrays for a ViT; under a global mask only the entries
that can differ from the initial model), masks as packed bits, and sparse updates as trainable entries only.
How a payload travels (inside the message or as a file) is fed_app.flower.transport's.

Both sides order entries the same way: parameters in the given name order, each flattened (row-major),
keeping the entries whose mask is True. Frozen entries never travel."""

from __future__ import annotations

import torch
from torch import Tensor

import numpy as np

State = dict[str, Tensor]
Masks = dict[str, Tensor]
Shapes = dict[str, torch.Size]


class Key:
    """Record keys of Flower messages and the fields inside them (records: lower case, fields: kebab case)."""

    ARRAYS = "arrays"  # the global model, in one of the Forms (Flower's FedAvg arrayrecord_key)
    CONFIG = "config"  # the train config: SERVER_ROUND, PHASE (Flower's FedAvg configrecord_key)
    METRICS = "metrics"  # every reply: PARTITION_ID, NUM_EXAMPLES, and TRAIN_LOSS, TASK_BUILDS for training
    DELTA = "delta"  # a client's update, in one of the Forms
    MASK = "mask"  # packed mask bits under field BITS
    CONTROL = "control"  # client-algorithm='scaffold': the server's control variate c, flat over trainable entries
    CONTROL_DELTA = "control-delta"  # a SCAFFOLD client's c_i+ - c_i, in the same form
    INFO, STATS, LOSSES, SUMS = "info", "stats", "losses", "sums"  # step-0 query replies
    BITS = "bits"
    WEIGHT, BIAS = "weight", "bias"  # head='logistic': the head a query asks the clients' sums for
    PARTITION_ID, NUM_EXAMPLES, TASK_BUILDS = "partition-id", "num-examples", "task-builds"
    SERVER_ROUND, PHASE, TRAIN_LOSS = "server-round", "phase", "train_loss"
    CHECKPOINTED = "checkpointed-round"  # the train config: the round of the run's last checkpoint
    RUN, CONFIG_JSON = "run", "config"  # every message: the run's whole config, as JSON (fed_app/local/session.py)
    TIME_READ, TIME_TRAIN, TIME_WRITE = "time-read", "time-train", "time-write"  # a train reply's phases (s)
    ATTACKER = "attacker"  # a train reply under attack != 'none': 1 if a malicious client sent it
    CLIPPED = "clipped"  # a train reply under dp != 'none': 1 if its update was clipped
    CLIPPING_NORM = "clipping-norm"  # the train config under client-side DP: the round's clipping norm C


class Form:
    """The payload forms of a model or an update (besides its tensors by name: model_payload)."""

    FLAT = "flat"  # every tensor in one float32 vector, in state-dict order
    VALUES = "values"  # only the trainable entries under a mask, in mask order
    REST = "rest"  # with VALUES: the parameters no mask covers (the frozen head), flat


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
            return {Form.FLAT: base}
    return {Form.FLAT: torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])}


def model_payload(state: State, flat: bool) -> State:
    """A model or an update as it travels: one flat buffer (`flat`: what one file holds, written and mapped at
    once), or its tensors by name, as Flower's examples send a state dict (inside messages: Flower and Ray copy
    each array several times, and one 87 MB array costs a fresh allocation, page faults included, each time)."""
    return flat_state(state) if flat else dict(state)


def model_state(arrays: State, shapes: Shapes) -> State:
    """The model of a payload (model_payload's inverse) for parameters of these shapes, in this order."""
    if Form.FLAT in arrays:
        return split_flat(arrays[Form.FLAT], shapes)
    if list(arrays) != list(shapes) or any(arrays[n].shape != s for n, s in shapes.items()):
        raise ValueError(f"a model of {len(arrays)} tensors does not fit {len(shapes)}; the two sides differ.")
    return arrays


def split_flat(flat: Tensor, shapes: Shapes) -> State:
    sizes = [s.numel() for s in shapes.values()]
    if flat.numel() != sum(sizes):
        raise ValueError(f"a flat model of {flat.numel()} values does not fit {sum(sizes)}; the two sides differ.")
    return {n: part.view(s) for (n, s), part in zip(shapes.items(), flat.split(sizes))}


def masked_state(state: State, masks: dict[str, Tensor]) -> State:
    """A model under a global mask, as only what can differ from the seeded initial model: its trainable
    entries ('values', in mask order) and every parameter the mask does not cover ('rest', e.g. the head)."""
    rest = [t.detach().reshape(-1).float() for n, t in state.items() if n not in masks]
    return {Form.VALUES: gather_trainable(state, masks), Form.REST: torch.cat(rest) if rest else torch.zeros(0)}


def unpack_masked_state(arrays: State, base: State, masks: dict[str, Tensor]) -> State:
    """Inverse of masked_state: `base` (the initial model, whose frozen entries the
    global model keeps bit for bit) with the trainable entries and the uncovered parameters put back."""
    state = {n: t.clone() for n, t in base.items()}
    offset = 0
    for n, m in masks.items():
        k = int(m.sum())
        state[n].view(-1)[m.flatten()] = arrays[Form.VALUES][offset:offset + k].to(state[n].dtype)
        offset += k
    rest = split_flat(arrays[Form.REST], {n: t.shape for n, t in base.items() if n not in masks})
    state.update({n: t.to(base[n].dtype) for n, t in rest.items()})
    return state


def apply_update(state: State, update: State, masks: dict[str, Tensor] | None) -> State:
    """global + averaged delta, in place: a flat dense delta, the flat trainable entries of a global mask,
    or (local masks) the parameters that have a mask; what no update names (the frozen head) is untouched."""
    if Form.VALUES in update:
        add_trainable_(state, update[Form.VALUES], masks)
        return state
    if Form.FLAT in update:
        update = split_flat(update[Form.FLAT], {n: t.shape for n, t in state.items()})
    for name, delta in update.items():
        state[name] += delta.to(state[name].dtype)
    return state


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
