"""Sparse fine-tuning in FL through real `flwr run`: federated ridge and Fisher masks equal their
centralized counterparts on the union of the shards; frozen entries never move; sparse payloads. The module's
runs share one Flower simulation (a session, as the runner runs them)."""

import json

import pytest
import torch

from fed_app.config import RunConfig
from fed_app.task.batches import BatchTransform
from fed_app.task.data import load_dataset
from fed_app.task.editing import calibrate_masks, fit_head
from fed_app.task.head import freeze_head, set_head
from fed_app.task.model import build_model
from fed_app.flower.mask_plan import unpack_masks
from masking.combine import combine_masks
from fed_app.runs.rundir import RunDir

from ..conftest import TINY

SPARSE_FL = {**TINY, "num-clients": 10, "fraction-train": 0.3, "num-rounds": 3, "eval-every": 1, "local-steps": 3,
             "optimizer": "sparse-sgdm", "head": "ridge", "sparsity": 0.8, "calibration-rounds": 2,
             "fisher-mode": "empirical", "fisher-samples": 100000}  # every image of every shard is scored


@pytest.mark.slow
def test_sparse_fedavg_matches_centralized_step_0_and_mask_and_never_moves_frozen_entries(tmp_path, flower_session):
    cfg = RunConfig.from_run_config({**SPARSE_FL, "run-dir": str(tmp_path / "run")})
    flower_session.run(cfg)
    run = tmp_path / "run"
    final = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    fed_masks = RunDir(run).load_mask()

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
def test_local_masks_each_client_its_own_and_entries_frozen_everywhere_never_move(tmp_path, flower_session):
    settings = {**SPARSE_FL, "mask-scope": "local", "partition": "noniid", "classes-per-client": 10,
                "fisher-samples": 64, "fisher-mode": "sampled", "head": "logistic"}  # ridge's head diverges here
    cfg = RunConfig.from_run_config({**settings, "run-dir": str(tmp_path / "run")})
    flower_session.run(cfg)
    run = tmp_path / "run"
    model, _ = build_model(cfg, 100)
    freeze_head(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bits = torch.load(run / "client_masks.pt", weights_only=True)
    masks = {p: unpack_masks(b, shapes) for p, b in bits.items()}
    assert sorted(masks) == list(range(10))
    for m in masks.values():
        assert sum(int(x.sum()) for x in m.values()) == pytest.approx(0.2 * sum(x.numel() for x in m.values()), abs=1)
    assert not all(torch.equal(masks[0][n], masks[1][n]) for n in shapes)  # own data, own mask
    final = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    for name in shapes:
        frozen_everywhere = ~torch.stack([masks[p][name] for p in masks]).any(0)
        assert torch.equal(final[name][frozen_everywhere], init[name][frozen_everywhere]), name
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["density"] == pytest.approx(0.2, abs=1e-3) and len(rows) == 4


@pytest.mark.slow
def test_head_rounds_train_the_head_and_no_backbone_entry(tmp_path, flower_session):
    settings = {**SPARSE_FL, "head": "train", "head-rounds": 2, "num-rounds": 2, "fisher-samples": 64,
                "mask-rule": "random", "calibration-rounds": 1}
    cfg = RunConfig.from_run_config({**settings, "run-dir": str(tmp_path / "run")})
    flower_session.run(cfg)
    model, _ = build_model(cfg, 100)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    masks = RunDir(tmp_path / "run").load_mask()
    assert "head.weight" not in masks and not torch.equal(final["head.weight"], init["head.weight"])
    for name, mask in masks.items():  # head rounds moved no backbone entry; sparse rounds only trainable ones
        assert torch.equal(final[name][~mask], init[name][~mask]), name


@pytest.mark.slow
def test_a_voted_global_mask_is_the_clients_own_masks_combined_and_frozen_entries_never_move(tmp_path, flower_session):
    settings = {**SPARSE_FL, "partition": "noniid", "classes-per-client": 10, "fisher-samples": 64,
                "fisher-mode": "sampled", "num-rounds": 2}
    own = RunConfig.from_run_config({**settings, "mask-scope": "local", "run-dir": str(tmp_path / "own")})
    voted = RunConfig.from_run_config({**settings, "mask-aggregation": "vote", "mask-quorum": 0.3,
                                       "run-dir": str(tmp_path / "voted")})
    flower_session.run(own)
    flower_session.run(voted)
    model, _ = build_model(voted, 100)
    freeze_head(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bits = torch.load(tmp_path / "own" / "client_masks.pt", weights_only=True)
    clients = [unpack_masks(bits[p], shapes) for p in sorted(bits)]  # the same calibration, client by client
    mask = RunDir(tmp_path / "voted").load_mask()
    expected = combine_masks(clients, "vote", 0.3)
    assert all(torch.equal(mask[n], expected[n]) for n in shapes)
    density = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert 0.2 < density < 1.0  # 3 of 10 votes keep more than one client's 20%
    rows = [json.loads(line) for line in (tmp_path / "voted" / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["density"] == pytest.approx(density)
    final = torch.load(tmp_path / "voted" / "checkpoint.pt", weights_only=True)["model"]
    for name in shapes:
        assert torch.equal(final[name][~mask[name]], init[name][~mask[name]]), name
