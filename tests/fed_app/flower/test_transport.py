"""How tensors travel: inside a message as Flower's own ArrayRecord (read back without a copy), or as a file
(transport='files'); a client that cannot read the server's files is told why; a killed server's folder is
removed by the next one."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fed_app.flower.transport import SharedFiles, TransportError, carry, decode, encode, folder_of, take

TENSORS = {"flat": torch.randn(1000), "w": torch.randn(3, 4, 5), "scalar": torch.tensor(2.5),
           "sums": torch.randn(7, dtype=torch.float64), "bits": torch.tensor([1, 255, 0], dtype=torch.uint8),
           "empty": torch.zeros(0), "strided": torch.randn(4, 6).t()}


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.values(), b.values()))


def test_records_are_flowers_own_and_read_back_as_views_of_the_message_bytes():
    record = encode(TENSORS)
    assert _same(record.to_torch_state_dict(), TENSORS)  # Flower's reader: the deployment engine's peers too
    assert _same(decode(ArrayRecord(TENSORS)), TENSORS)  # Flower's writer: what a stock app sends
    views = decode(record)
    assert _same(views, TENSORS)
    for name, view in views.items():  # no copy: each tensor lies inside its Array's bytes
        assert view.numel() == 0 or np.shares_memory(view.numpy(), np.frombuffer(record[name].data, np.uint8))


def test_both_transports_carry_the_same_tensors(tmp_path):
    for folder in (None, tmp_path):
        content = RecordDict(carry("delta", TENSORS, folder))
        assert folder_of(content) == folder and _same(take(content, "delta", delete=True), TENSORS)
    assert list(tmp_path.iterdir()) == []  # taken and deleted; no partial file left


def test_a_client_on_another_machine_is_told_to_use_messages(tmp_path):
    content = RecordDict({"arrays-file": ConfigRecord({"path": str(tmp_path / "gone.pt"), "bytes": 12})})
    with pytest.raises(TransportError, match=r"transport='files' needs every client on the server's machine; "
                                             r"pass --run-config \"transport='messages'\""):
        take(content, "arrays")


def test_a_killed_servers_payload_folder_is_removed_by_the_next_one():
    dead = SharedFiles("test-stale", 10**6)
    stale = dead.root.with_name("fedit-test-stale-999999999")  # no such process
    dead.root.rename(stale)
    (stale / "arrays-x.pt").write_bytes(b"0" * 10)
    fresh = SharedFiles("test-stale", 10**6)
    assert not stale.exists() and fresh.root.exists()
    fresh.close()
