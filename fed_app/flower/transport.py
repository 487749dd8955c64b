"""How models travel (train rounds, step-0 and calibration queries, client evaluation): inside the message, or
(transport='files', one machine) as a file in shared memory whose path the message carries.

Through Flower, an 87 MB model crosses several processes per message (ServerApp, SuperLink, the simulation
engine, a Ray actor) and is serialized and copied along the way; ten clients a round make that seconds per
round (`bench round` on ViT-S/16-sized payloads). With files the server writes the global model once per
round, clients read it and write their updates next to it, and the messages carry only the paths.
The client needs no setting: it answers in the form it was asked in.
"""

from __future__ import annotations

import functools
import io
import math
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.utils.serialization
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType
from torch import Tensor

from fed_app.errors import override_hint

FILE_SUFFIX = "-file"  # content key of a file reference: "arrays-file" stands in for "arrays"
SHM = Path("/dev/shm")


class TransportError(RuntimeError):
    """A payload file that this process cannot read: the client runs on another machine."""


def payload_bytes(record) -> int:
    """Bytes of tensor data a record carries or references (the same count either way)."""
    if isinstance(record, ArrayRecord):
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values())
    if isinstance(record, ConfigRecord) and "bytes" in record and "path" in record:
        return int(record["bytes"])
    return 0


def carry(key: str, tensors: dict[str, Tensor], folder: Path | None) -> dict:
    """Message content for `tensors` under `key`: an ArrayRecord, or (with a folder) a reference to a file
    holding them."""
    if folder is None:
        return {key: encode(tensors)}
    path = folder / f"{key}-{uuid.uuid4().hex}.pt"
    tmp = path.with_name(path.name + ".part")
    with torch.utils.serialization.config.patch("save.compute_crc32", False):  # 40% of the write on a 2-core CPU
        torch.save(tensors, tmp)
    os.replace(tmp, path)  # a reader never sees a partial file, so the checksum guards nothing here
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


class SharedFiles:
    """A private folder for one run's payload files: /dev/shm when it has room, else the temp folder.
    Removed by close(); folders left by a killed server of the same run are removed on creation."""

    def __init__(self, tag: str, room_bytes: int):
        base = self.base_for(room_bytes)
        for stale in base.glob(f"fedit-{tag}-*"):
            if not _alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True)
        self.root = base / f"fedit-{tag}-{os.getpid()}"
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def base_for(room_bytes: int) -> Path:
        if SHM.is_dir() and os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free > room_bytes:
            return SHM
        return Path(tempfile.gettempdir())

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()
