"""Sparse fine-tuning in FL through real `flwr run`: federated ridge and Fisher masks equal their
centralized counterparts on the union of the shards; frozen entries never move; sparse payloads."""

import json

import pytest
import torch

from fed_app.config import RunConfig
from fed_app.data import BatchTransform, load_dataset
from fed_app.editing import calibrate_masks, fit_head
from fed_app.head import freeze_head, set_head
from fed_app.model import build_model
from fed_app.local_federation import LocalFederation
from masking.calibrate import load_masks
from fed_app.wire import apply_update, flat_state, masked_state, pack_state, split_flat, unpack_masked_state
from fed_app.wire import add_trainable_, gather_trainable, pack_masks, unpack_masks

from .conftest import TINY

SPARSE_FL = {**TINY, "num-clients": 10, "fraction-train": 0.3, "num-rounds": 3, "eval-every": 1, "local-steps": 3,
             "optimizer": "sparse-sgdm", "head": "ridge", "sparsity": 0.8, "calibration-rounds": 2,
             "fisher-mode": "empirical", "fisher-samples": 100000}  # every image of every shard is scored


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

    dense = apply_update(fresh(), pack_state({"w": torch.full((2, 2), 0.5), "head": torch.ones(2)})
                         .to_torch_state_dict(), None)
    assert torch.equal(dense["w"], torch.full((2, 2), 1.5)) and torch.equal(dense["head"], torch.full((2,), 6.0))
    masks = {"w": torch.tensor([[True, False], [False, True]])}
    masked = apply_update(fresh(), {"values": torch.tensor([2.0, 3.0])}, masks)
    assert masked["w"].tolist() == [[3.0, 1.0], [1.0, 4.0]] and torch.equal(masked["head"], torch.full((2,), 5.0))
    local = apply_update(fresh(), {"w": torch.ones(2, 2)}, None)  # per-name: the head is not named
    assert torch.equal(local["w"], torch.full((2, 2), 2.0)) and torch.equal(local["head"], torch.full((2,), 5.0))


@pytest.mark.slow
def test_sparse_fedavg_matches_centralized_step_0_and_mask_and_never_moves_frozen_entries(tmp_path):
    cfg = RunConfig.from_run_config({**SPARSE_FL, "run-dir": str(tmp_path / "run")})
    with LocalFederation(tmp_path / "flwr") as sim:
        sim.run(cfg, num_supernodes=10, timeout=300)
    run = tmp_path / "run"
    final = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    fed_masks = load_masks(run / "mask.pt")

    # the centralized counterparts on the union of the shards (= the whole training split)
    device = torch.device("cpu")
    data = load_dataset(cfg, device)
    model, spec = build_model(cfg, 100)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tf = BatchTransform.for_model(spec)
    everything = torch.arange(len(data.train))
    found = fit_head(cfg, model, data.train, everything, tf, tf, torch.autocast("cpu", enabled=False), 100)
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["head_temperature"] == pytest.approx(found["head_temperature"], rel=1e-9)  # one sum of sums
    torch.testing.assert_close(final["head.weight"], model.head.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final["head.bias"], model.head.bias.detach(), rtol=1e-4, atol=1e-5)
    set_head(model, final["head.weight"], final["head.bias"])  # frozen after step 0
    central_masks = calibrate_masks(cfg, model, data.train, everything, tf)
    assert set(central_masks) == set(fed_masks)
    agree = sum(int((central_masks[n] == fed_masks[n]).sum()) for n in fed_masks)
    total = sum(m.numel() for m in fed_masks.values())
    assert agree == total

    moved = 0
    for name, mask in fed_masks.items():
        assert torch.equal(final[name][~mask], init[name][~mask]), name  # frozen: bit-identical
        moved += int((final[name][mask] != init[name][mask]).sum())
    assert moved > 0

    assert rows[0]["round"] == 0 and rows[0]["density"] == pytest.approx(0.2, abs=1e-4)
    model_bytes = 4 * sum(v.numel() for v in final.values())  # ridge, temperature, 2 Fisher rounds, 10 clients each
    assert rows[0]["bytes_sent"] == pytest.approx(4 * 10 * model_bytes, rel=0.01)  # every step-0 exchange
    dense_bytes = 4 * sum(v.numel() for v in final.values()) * 3  # 3 clients' full deltas in fp32
    backbone = sum(m.numel() for m in fed_masks.values()) / sum(v.numel() for v in final.values())
    masked = sum(m.numel() for m in fed_masks.values())
    trainable = sum(int(m.sum()) for m in fed_masks.values())
    head = final["head.weight"].numel() + final["head.bias"].numel()
    compact_down = 3 * (4 * (trainable + head) + masked / 8)  # trainable entries, frozen head, mask bits
    for r in rows[1:]:
        assert r["bytes_received"] == pytest.approx(dense_bytes * 0.2 * backbone, rel=0.01)
        assert r["bytes_sent"] == pytest.approx(compact_down, rel=0.02)  # not the whole model
        assert r["bytes_sent"] < 0.4 * dense_bytes


@pytest.mark.slow
def test_local_masks_each_client_its_own_and_entries_frozen_everywhere_never_move(tmp_path):
    settings = {**SPARSE_FL, "mask-scope": "local", "partition": "noniid", "classes-per-client": 10,
                "fisher-samples": 64, "fisher-mode": "sampled"}
    cfg = RunConfig.from_run_config({**settings, "run-dir": str(tmp_path / "run")})
    with LocalFederation(tmp_path / "flwr") as sim:
        sim.run(cfg, num_supernodes=10, timeout=300)
    run = tmp_path / "run"
    model, _ = build_model(cfg, 100)
    freeze_head(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bits = torch.load(run / "client_masks.pt", weights_only=False)
    masks = {p: unpack_masks(b, shapes) for p, b in bits.items()}
    assert sorted(masks) == list(range(10))
    for m in masks.values():
        assert sum(int(x.sum()) for x in m.values()) == pytest.approx(0.2 * sum(x.numel() for x in m.values()), abs=1)
    assert not all(torch.equal(masks[0][n], masks[1][n]) for n in shapes)  # own data, own mask
    final = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    for name in shapes:
        frozen_everywhere = ~torch.stack([masks[p][name] for p in masks]).any(0)
        assert torch.equal(final[name][frozen_everywhere], init[name][frozen_everywhere]), name
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["density"] == pytest.approx(0.2, abs=1e-3) and len(rows) == 4


@pytest.mark.slow
def test_head_rounds_train_the_head_and_no_backbone_entry(tmp_path):
    settings = {**SPARSE_FL, "head": "train", "head-rounds": 2, "num-rounds": 2, "fisher-samples": 64,
                "mask-rule": "random", "calibration-rounds": 1}
    cfg = RunConfig.from_run_config({**settings, "run-dir": str(tmp_path / "run")})
    with LocalFederation(tmp_path / "flwr") as sim:
        sim.run(cfg, num_supernodes=10, timeout=300)
    model, _ = build_model(cfg, 100)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    masks = load_masks(tmp_path / "run" / "mask.pt")
    assert "head.weight" not in masks and not torch.equal(final["head.weight"], init["head.weight"])
    for name, mask in masks.items():  # head rounds moved no backbone entry; sparse rounds only trainable ones
        assert torch.equal(final[name][~mask], init[name][~mask]), name


def test_a_state_of_views_into_one_vector_goes_on_the_wire_without_a_copy():
    flat = torch.arange(10.0)
    shapes = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    views = split_flat(flat, shapes)
    assert flat_state(views)["flat"] is flat
    swapped = {"b": views["b"], "a": views["a"]}  # same buffer, other order: copied, in the dict's order
    assert torch.equal(flat_state(swapped)["flat"], torch.cat([flat[6:], flat[:6]]))
    part = split_flat(flat[:6], {"a": shapes["a"]})  # a view of part of a bigger vector: copied
    assert flat_state(part)["flat"] is not flat and torch.equal(flat_state(part)["flat"], flat[:6])
