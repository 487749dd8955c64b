"""What travels between server and clients, and how, named once.

What: the message keys (`Key`); a model's payload forms (`Form`: one flat float32 buffer instead of ~150 arrays
for a ViT; under a global mask only the entries that can differ from the initial model); sparse updates as
their trainable entries only (masks go as packed bits: mask_plan.py). Both sides order entries the same way:
parameters in the given name order, each flattened (row-major), keeping the entries whose mask is True. Frozen
entries never travel.

How (`carry` and `take`): inside the message, as Flower's own ArrayRecord (built with one copy, read back as
views), or (transport='files', one machine) as a file in shared memory whose path the message carries.
Through Flower an 87 MB model crosses several processes per message (ServerApp, SuperLink, the simulation
engine, a Ray actor) and is serialized and copied along the way; ten clients a round make that seconds per
round (`bench round` on ViT-S/16-sized payloads). With files the server writes the global model once per round,
clients read it and write their updates next to it, and the messages carry only the paths. The client needs no
setting: it answers in the form it was asked in.
"""

from __future__ import annotations

import functools
import io
import math
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType
from torch import Tensor

from fed_app.errors import override_hint
from fed_app.flower.payload_files import PayloadRoomError, SharedFiles, TransportError, write_private  # noqa: F401

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
    REPLY, TAG = "reply", "tag"  # a train request: the name (field TAG) the server issued for its reply's files


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


# How a payload travels: inside the message, or as a file the message references.

FILE_SUFFIX = "-file"  # content key of a file reference: "arrays-file" stands in for "arrays"


def payload_bytes(record) -> int:
    """Bytes of tensor data a record carries or references (the same count either way)."""
    if isinstance(record, ArrayRecord):
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values())
    if isinstance(record, ConfigRecord) and "bytes" in record and "path" in record:
        return int(record["bytes"])
    return 0


def carry(key: str, tensors: dict[str, Tensor], folder: Path | None, tag: str = "") -> dict:
    """Message content for `tensors` under `key`: an ArrayRecord, or (with a folder) a reference to a file
    holding them, readable by this user only, named `<key>-<tag>.pt` (a reply: the tag its request issued, see
    replies.reply_tag) or a fresh name."""
    if folder is None:
        return {key: encode(tensors)}
    path = folder / f"{key}-{tag or uuid.uuid4().hex}.pt"
    write_private(path, tensors)
    return {key + FILE_SUFFIX: ConfigRecord({"path": str(path),
                                             "bytes": sum(t.numel() * t.element_size() for t in tensors.values())})}


def folder_of(content: RecordDict) -> Path | None:
    """Where a message's payload files are, if it came with any: replies go the same way."""
    ref = next((r for k, r in content.items() if k.endswith(FILE_SUFFIX)), None)
    return Path(str(ref["path"])).parent if ref is not None else None


def discard(content: RecordDict) -> None:
    """Delete the files a message's content references (the server, once every client has read them)."""
    for key, ref in content.items():
        if key.endswith(FILE_SUFFIX):
            Path(str(ref["path"])).unlink(missing_ok=True)


def holds(content: RecordDict, key: str) -> bool:
    """Whether a message's content has tensors under `key`, in the message or as a file reference."""
    return key in content or key + FILE_SUFFIX in content


def take(content: RecordDict, key: str, delete: bool = False) -> dict[str, Tensor]:
    """The tensors under `key`, from the message or from the file it references (then deleted if asked):
    read-only views of the message's bytes or of the file's pages, never to be written into."""
    if key in content:
        return decode(content[key])
    path = Path(str(content[key + FILE_SUFFIX]["path"]))
    try:
        tensors = torch.load(path, weights_only=True, mmap=True)  # pages of /dev/shm, not a copy
    except FileNotFoundError:
        raise TransportError(
            f"the payload file {path} is not on this machine: transport='files' needs every client on the "
            f"server's machine; {override_hint('transport', repr('messages'))} to send models inside Flower messages."
        ) from None
    if delete:
        path.unlink(missing_ok=True)
    return tensors


def encode(tensors: dict[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord of these tensors in Flower's form (each Array holds the bytes of a .npy file), each built
    with one copy of the tensor's data (np.save into a buffer, as ArrayRecord does it, makes two)."""
    return ArrayRecord(array_dict={name: _array(t) for name, t in tensors.items()})


def _array(tensor: Tensor) -> Array:
    values = tensor.detach().cpu().contiguous().numpy()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join((header.getvalue(), memoryview(values).cast("B")))
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY, data=data)


def decode(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord as read-only views of its bytes (Flower's to_torch_state_dict copies each)."""
    return {name: _view(array) for name, array in record.items()}


def _view(array: Array) -> Tensor:
    data = array.data
    shape, fortran, dtype, offset = _npy_header(data[:NPY_PREFIX + int.from_bytes(data[8:NPY_PREFIX], "little")])
    if array.stype != SType.NUMPY or fortran or dtype.hasobject:
        return torch.from_numpy(array.numpy())  # not what encode writes: Flower's own reader
    values = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    with warnings.catch_warnings():  # read-only memory: torch warns that writing to it would be undefined
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


NPY_PREFIX = 10  # a version 1.0 .npy file: magic (6 bytes), version (2), header length (2), then the header


@functools.lru_cache(maxsize=1024)  # a model's headers repeat every round; parsing one is a literal_eval
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    stream = io.BytesIO(prefix)
    if np.lib.format.read_magic(stream) != (1, 0):
        return (), True, np.dtype(object), 0  # another version: left to Flower's reader
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    return shape, fortran, dtype, stream.tell()
