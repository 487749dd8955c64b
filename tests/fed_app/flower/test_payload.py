"""What travels: the payload forms (flat, by name, masked), mask bits, sparse updates, applied updates; and how:
inside a message as Flower's own ArrayRecord (read back without a copy), or as a file (transport='files'); a
client that cannot read the server's files is told why; a killed server's folder is removed by the next one."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fed_app.flower.mask_plan import pack_masks, unpack_masks
from fed_app.runs import procfs
from fed_app.flower.payload import (SharedFiles, TransportError, add_trainable_, apply_update, carry, decode, encode,
                                    flat_state, folder_of, gather_trainable, masked_state, model_payload, model_state,
                                    split_flat, take, unpack_masked_state)

def test_masks_and_sparse_updates_round_trip_on_the_wire():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(3, 5, generator=g) < 0.3, "b": torch.rand(7, generator=g) < 0.6}
    shapes = {n: m.shape for n, m in masks.items()}
    back = unpack_masks(pack_masks(masks), shapes)
    assert all(torch.equal(masks[n], back[n]) for n in masks)
    delta = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g)}
    values = gather_trainable(delta, masks)
    assert len(values) == sum(int(m.sum()) for m in masks.values())
    state = {"a": torch.ones(3, 5), "b": torch.zeros(7)}
    add_trainable_(state, values, masks)
    for n, m in masks.items():
        base = torch.ones(3, 5) if n == "a" else torch.zeros(7)
        assert torch.equal(state[n][~m], base[~m]) and torch.allclose(state[n][m], base[m] + delta[n][m])


def test_a_masked_model_travels_as_its_trainable_entries_and_comes_back_exact():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "head": torch.randn(2, generator=g)}
    masks = {"w": torch.rand(4, 3, generator=g) < 0.4, "b": torch.rand(3, generator=g) < 0.4}
    state = {n: t.clone() for n, t in base.items()}
    state["w"][masks["w"]] += 1.0  # training moved trainable entries; frozen ones stay as in the base
    state["head"] = torch.tensor([7.0, 8.0])  # step 0 set the head, outside the mask
    sent = masked_state(state, masks)
    assert sent["values"].numel() == int(masks["w"].sum() + masks["b"].sum())
    back = unpack_masked_state(sent, base, masks)
    assert all(torch.equal(back[n], state[n]) for n in state)


def test_apply_update_reads_each_wire_form_and_leaves_what_it_does_not_name():
    def fresh():
        return {"w": torch.ones(2, 2), "head": torch.full((2,), 5.0)}

    dense = apply_update(fresh(), flat_state({"w": torch.full((2, 2), 0.5), "head": torch.ones(2)}), None)
    assert torch.equal(dense["w"], torch.full((2, 2), 1.5)) and torch.equal(dense["head"], torch.full((2,), 6.0))
    masks = {"w": torch.tensor([[True, False], [False, True]])}
    masked = apply_update(fresh(), {"values": torch.tensor([2.0, 3.0])}, masks)
    assert masked["w"].tolist() == [[3.0, 1.0], [1.0, 4.0]] and torch.equal(masked["head"], torch.full((2,), 5.0))
    local = apply_update(fresh(), {"w": torch.ones(2, 2)}, None)  # per-name: the head is not named
    assert torch.equal(local["w"], torch.full((2, 2), 2.0)) and torch.equal(local["head"], torch.full((2,), 5.0))


def test_a_state_of_views_into_one_vector_goes_on_the_wire_without_a_copy():
    flat = torch.arange(10.0)
    shapes = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    views = split_flat(flat, shapes)
    assert flat_state(views)["flat"] is flat
    swapped = {"b": views["b"], "a": views["a"]}  # same buffer, other order: copied, in the dict's order
    assert torch.equal(flat_state(swapped)["flat"], torch.cat([flat[6:], flat[:6]]))
    part = split_flat(flat[:6], {"a": shapes["a"]})  # a view of part of a bigger vector: copied
    assert flat_state(part)["flat"] is not flat and torch.equal(flat_state(part)["flat"], flat[:6])


def test_a_model_travels_flat_or_by_name_and_comes_back_as_the_same_views():
    flat = torch.arange(10.0)
    shapes = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    state = split_flat(flat, shapes)
    assert model_payload(state, flat=True)["flat"] is flat  # one file: the buffer itself
    by_name = model_payload(state, flat=False)  # inside messages: the tensors, as Flower's examples send them
    assert list(by_name) == ["a", "b"] and all(by_name[n] is state[n] for n in shapes)
    for payload in (model_payload(state, True), by_name):
        back = model_state(payload, shapes)
        assert list(back) == ["a", "b"] and all(torch.equal(back[n], state[n]) for n in shapes)
    with pytest.raises(ValueError, match="a model of 1 tensors does not fit 2; the two sides differ"):
        model_state({"a": state["a"]}, shapes)
    with pytest.raises(ValueError, match="does not fit"):
        model_state({"a": state["a"], "b": torch.zeros(5)}, shapes)


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
    stale = dead.root.with_name(f"fedit-payload-{procfs.identity_tag()}-999999999-1-abcdefgh-test-stale")  # no pid
    dead.root.rename(stale)
    (stale / "arrays-x.pt").write_bytes(b"0" * 10)
    fresh = SharedFiles("test-stale", 10**6)
    assert not stale.exists() and fresh.root.exists()
    fresh.close()


@pytest.mark.parametrize("length", [0, 1, 3])
def test_mask_bits_of_another_length_are_refused_not_cut_or_padded(length):
    shapes = {"w": torch.Size([3, 4])}  # 12 entries: 2 bytes of bits
    masks = unpack_masks(pack_masks({"w": torch.ones(3, 4, dtype=torch.bool)}), shapes)
    assert masks["w"].all()
    with pytest.raises(ValueError, match="do not fit 12 entries"):
        unpack_masks(np.zeros(length, dtype=np.uint8), shapes)
