"""FedAvg on Flower: seeded sampling, weighted delta averaging, J steps, real `flwr run` runs and resume."""

import json
import time

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fed_app.config import ConfigError, RunConfig
from fed_app.local_federation import LocalFederation, FlowerRunError
from fed_app.transport import SharedFiles
from fed_app.loaded_task import load_task
from strategies.fedavg import sample_partitions, weighted_average

from .conftest import TINY

FL = {**TINY, "num-clients": 10, "fraction-train": 0.3, "num-rounds": 4, "eval-every": 2, "checkpoint-every": 2,
      "local-steps": 2}
TIMING = {"wall_time", "round_time"}


def _cfg(tmp_path, name, **changes):
    return RunConfig.from_run_config({**FL, **changes, "run-dir": str(tmp_path / name)})


def _rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "rows.jsonl").read_text().splitlines()]


def test_sampling_is_a_function_of_seed_and_round():
    a = sample_partitions(seed=1, server_round=5, num_clients=100, per_round=10)
    assert a == sample_partitions(1, 5, 100, 10) and len(set(a)) == 10 and all(0 <= p < 100 for p in a)
    assert a != sample_partitions(1, 6, 100, 10) and a != sample_partitions(2, 5, 100, 10)


def test_weighted_average_of_deltas_matches_a_hand_computation():
    deltas = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])},
              {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([6.0])}]
    avg = weighted_average(deltas, [1, 3])  # (1*d1 + 3*d2) / 4
    assert torch.allclose(avg["w"], torch.tensor([2.5, -1.0])) and torch.allclose(avg["b"], torch.tensor([4.5]))


def test_a_client_takes_exactly_j_optimizer_steps_on_its_own_shard(tmp_path):
    cfg = _cfg(tmp_path, "unit", **{"local-steps": 7})
    task = load_task(cfg)
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        delta, loss, examples = task.local_update(task.initial_state(), partition_id=3, server_round=1)
    finally:
        handle.remove()
    assert len(steps) == 7 and examples == len(task.shards[3]) == 300
    assert any(d.abs().sum() > 0 for d in delta.values())
    again, _, _ = task.local_update(task.initial_state(), partition_id=3, server_round=1)
    assert all(torch.equal(delta[k], again[k]) for k in delta)  # (seed, round, client) fixes the batches
    assert load_task(cfg) is task  # built once per process, reused by every message


@pytest.mark.slow
def test_compile_gives_the_eager_update_and_compiles_once_per_worker(tmp_path):
    cfg = _cfg(tmp_path, "unit", **{"local-steps": 12})  # 300 images, batch 32: a pass's short batch too
    eager = load_task(cfg)
    state = eager.initial_state()
    expected, expected_loss, _ = eager.local_update(state, partition_id=3, server_round=1)
    compiled = load_task(cfg.replace(compile=True))
    delta, loss, _ = compiled.local_update(state, partition_id=3, server_round=1)
    assert compiled.trainer is not compiled.model and loss == pytest.approx(expected_loss, rel=1e-5)
    assert all(torch.allclose(delta[k], expected[k], atol=1e-6) for k in delta)
    trainer = compiled.trainer
    compiled.local_update(state, partition_id=4, server_round=2)
    assert compiled.trainer is trainer and load_task(cfg.replace(compile=True)) is compiled


def test_the_client_path_uses_no_dataloader(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a DataLoader was built in the client path")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", refuse)
    task = load_task(_cfg(tmp_path, "unit"))
    state = task.initial_state()
    task.local_update(state, partition_id=0, server_round=1)
    task.evaluate(state, task.shard(0))


@pytest.mark.slow
@pytest.mark.parametrize("partition", ["iid", "noniid"])
def test_flwr_run_simulation_end_to_end(tmp_path, partition):
    cfg = _cfg(tmp_path, partition, partition=partition, **{"classes-per-client": 20, "fraction-evaluate": 0.5})
    with LocalFederation(tmp_path / "flwr") as sim:
        sim.run(cfg, num_supernodes=10, timeout=300)
    rows = _rows(tmp_path / partition)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # round 0: the starting point, evaluated
    assert all(r["clients"] == 3 for r in rows[1:])
    assert all(r["task_builds"] == 1 for r in rows[1:])  # each task process built model and data once
    assert "val_accuracy" in rows[2] and "val_accuracy" not in rows[3] and "test_accuracy" in rows[4]
    assert "client_accuracy" in rows[2] and "client_accuracy" not in rows[3]  # 5 clients on their own shards
    assert rows[1]["bytes_sent"] == rows[1]["bytes_received"] > 0  # dense: a delta as large as the model
    assert (tmp_path / partition / "DONE").exists()


SPARSE = {"optimizer": "sparse-sgdm", "head": "ridge", "sparsity": 0.8, "calibration-rounds": 2, "fisher-samples": 64}


@pytest.mark.slow
@pytest.mark.parametrize("editing", [{}, SPARSE], ids=["dense", "sparse"])
def test_sigkill_mid_run_then_rerun_ends_with_the_uninterrupted_rows_and_weights(tmp_path, editing):
    settings = {"num-rounds": 12, "local-steps": 8, "checkpoint-every": 3, "eval-every": 4, **editing}
    # the reference moves models inside Flower messages, the killed run through files: same numbers
    whole = _cfg(tmp_path, "whole", transport="messages", **settings)
    cut = _cfg(tmp_path, "cut", **settings)
    assert cut.transport == "files"
    with LocalFederation(tmp_path / "flwr") as sim:
        sim.run(whole, num_supernodes=10, timeout=300)
        proc = sim.popen(cut, num_supernodes=10)
        rows_file, deadline = tmp_path / "cut" / "rows.jsonl", time.time() + 240
        while time.time() < deadline and not (rows_file.exists() and len(rows_file.read_text().splitlines()) >= 5):
            time.sleep(0.02)
        sim.stop()  # the machine goes away: SuperLink, simulation and Ray workers, mid-round
        proc.wait()
        assert not (tmp_path / "cut" / "DONE").exists(), "the run finished before it could be killed"
        mask_file = tmp_path / "cut" / "mask.pt"
        stamp = mask_file.stat().st_mtime_ns if editing else None
        sim.run(cut, num_supernodes=10, timeout=300)
        if editing:  # the mask came back from the checkpoint: calibration was not redone
            assert mask_file.stat().st_mtime_ns == stamp
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")
    assert not list(SharedFiles.base_for(0).glob(f"fedit-{cut.run_id()}-*"))  # the killed server's folder too
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_federation_of_the_wrong_size_fails_the_run_with_one_sentence(tmp_path):
    cfg = _cfg(tmp_path, "wrong", **{"num-rounds": 1})
    with LocalFederation(tmp_path / "flwr") as sim, pytest.raises(FlowerRunError) as err:
        sim.run(cfg, num_supernodes=4, timeout=300)
    assert "num-clients=10 but 4 nodes are connected" in str(err.value)
    assert "start exactly 10 supernodes" in str(err.value)
    assert not (tmp_path / "wrong" / "rows.jsonl").exists() and not (tmp_path / "wrong" / "DONE").exists()


def test_bad_fl_values_fail_before_any_round():
    with pytest.raises(ConfigError, match="partition='dirichlet' is not one of iid, noniid"):
        RunConfig.from_run_config({"partition": "dirichlet"})
    with pytest.raises(ConfigError, match="local-steps=0 is out of range"):
        RunConfig.from_run_config({"local-steps": 0})
    with pytest.raises(ConfigError, match="fraction-train=1.5 is out of range; it must be <= 1.0"):
        RunConfig.from_run_config({"fraction-train": 1.5})


def test_rounds_scaling_keeps_total_local_steps_equal_across_j():
    for j, rounds in [(4, 500), (8, 250), (16, 125)]:
        cfg = RunConfig(num_rounds=500, local_steps=j, rounds_scaling=True)
        assert cfg.total_rounds == rounds and cfg.total_rounds * j == 2000
    assert RunConfig(num_rounds=500, local_steps=16).total_rounds == 500


def test_make_run_refuses_a_bad_value_in_one_sentence_before_starting_flower(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fed_app.launch", "--run-config", "partition='dirichlet'"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: run-config partition='dirichlet' is not one of iid, noniid; pick one of those."
    assert not (tmp_path / "results").exists()  # no SuperLink home, no run directory


def test_make_run_without_cifar_offline_says_where_to_put_it_before_starting_flower(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fed_app.launch", "--run-config",
                           f"data-root='{tmp_path / 'nowhere'}' download=false"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: CIFAR-100 is not under data-root=") and "cifar-100-python" in proc.stderr
    assert not (tmp_path / "results" / ".flwr").exists()


def test_round_scheduler_cosine_decays_the_client_lr_over_the_run(tmp_path):
    from fed_app.task import client_lr

    cfg = _cfg(tmp_path, "cos", **{"round-scheduler": "cosine", "num-rounds": 8})
    assert [round(client_lr(cfg, t) / cfg.lr, 4) for t in (1, 5, 8)] == [1.0, 0.5, 0.0381]
    assert client_lr(cfg.replace(round_scheduler="constant"), 8) == cfg.lr
    decayed, _, _ = load_task(cfg).local_update(load_task(cfg).initial_state(), partition_id=2, server_round=5)
    plain = load_task(cfg.replace(round_scheduler="constant", lr=cfg.lr * 0.5))  # the same round at half the lr
    expected, _, _ = plain.local_update(plain.initial_state(), partition_id=2, server_round=5)
    assert all(torch.equal(decayed[k], expected[k]) for k in expected)
