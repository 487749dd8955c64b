"""FedAvg through real `flwr run`: rounds, evaluation schedule, bytes, SIGKILL and resume, one-sentence failures."""

import json
import time

import numpy as np
import pytest
import torch

from fed_app import server_app
from fed_app.flower.payload import SharedFiles
from fed_app.errors import UserError
from fed_app.local.local_federation import LocalFederation
from fed_app.runs.profile import PROFILE

from ..conftest import InProcessGrid, fl_cfg as _cfg, run_in_process

TIMING = {"wall_time", "round_time"}


def _rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "rows.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("partition", ["noniid"])  # iid: the default, under `flwr run` in the SIGKILL tests below
def test_flwr_run_simulation_end_to_end(tmp_path, partition, flower_session):
    cfg = _cfg(tmp_path, partition, partition=partition, **{"classes-per-client": 20, "fraction-evaluate": 0.5})
    flower_session.run(cfg)  # the runner's way: one `flwr run` that serves run after run
    rows = _rows(tmp_path / partition)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # round 0: the starting point, evaluated
    assert all(r["clients"] == 3 for r in rows[1:])
    assert all(r["task_builds"] == 1 for r in rows[1:])  # each task process built model and data once
    assert "val_accuracy" in rows[2] and "val_accuracy" not in rows[3] and "test_accuracy" in rows[4]
    assert "client_accuracy" in rows[2] and "client_accuracy" not in rows[3]  # 5 clients on their own shards
    assert rows[1]["bytes_sent"] == rows[1]["bytes_received"] > 0  # dense: a delta as large as the model
    assert (tmp_path / partition / "DONE").exists()
    counts = np.array(json.loads((tmp_path / partition / "shards.json").read_text())["class_counts"])
    assert counts.shape == (10, 100) and counts.sum() == 3200 - 200  # every training image, once
    if partition == "noniid":
        assert ((counts > 0).sum(1) == 20).all()  # classes-per-client, as the report's figure draws them


# FedAdam's moments and SCAFFOLD's c are checkpointed with the model; the clients' c_i are their own state
SERVER_ADAM = {"server-optimizer": "fedadam", "server-lr": 0.01, "client-algorithm": "scaffold"}
SPARSE = {"optimizer": "sparse-sgdm", "head": "ridge", "sparsity": 0.8, "calibration-rounds": 2, "fisher-samples": 64}


@pytest.mark.slow
# dense FedAvg stopped and resumed under `flwr run`: tests/fed_app/test_launch.py and the runner's SIGTERM test
def test_sigkill_mid_run_then_rerun_ends_with_the_uninterrupted_rows_and_weights(tmp_path):
    settings = {"num-rounds": 12, "local-steps": 8, "checkpoint-every": 3, "eval-every": 4, **SERVER_ADAM}
    # the reference runs in this process with models inside messages, the killed run under `flwr run` through
    # files: same numbers
    run_in_process(_cfg(tmp_path, "whole", transport="messages", **settings))
    cut = _cfg(tmp_path, "cut", **settings)
    assert cut.transport == "files"
    with LocalFederation(tmp_path / "flwr") as sim:
        proc = sim.popen(cut, num_supernodes=10)
        rows_file, deadline = tmp_path / "cut" / "rows.jsonl", time.time() + 240
        while time.time() < deadline and not (rows_file.exists() and len(rows_file.read_text().splitlines()) >= 5):
            time.sleep(0.02)
        sim.stop()  # the machine goes away: SuperLink, simulation and Ray workers, mid-round
        proc.wait()
        assert not (tmp_path / "cut" / "DONE").exists(), "the run finished before it could be killed"
        sim.run(cut, num_supernodes=10, timeout=300)
    _assert_same_run(tmp_path / "cut", tmp_path / "whole")
    assert not list(SharedFiles.base_for(0).glob(f"fedit-payload-*-{cut.run_id()}"))  # the killed server's folder too


@pytest.mark.usefixtures("server_app_identity")
def test_a_sparse_run_stopped_mid_round_resumes_with_its_mask_to_the_uninterrupted_end(tmp_path):
    """Sparse FedAvg in process (the federation under `flwr run` is tested above, with client state): the grid
    goes away mid-round 5, and the rerun takes its mask back from the checkpoint instead of calibrating again."""
    settings = {"num-rounds": 12, "local-steps": 8, "checkpoint-every": 3, "eval-every": 4, **SPARSE}
    run_in_process(_cfg(tmp_path, "whole", **settings))
    cut = _cfg(tmp_path, "cut", **settings)
    with pytest.raises(RuntimeError, match="the federation went away"):
        server_app.run(InProcessGrid(cut, fail_after=3 * 4 + 1), cut)
    rows = _rows(tmp_path / "cut")
    assert rows[-1]["round"] == 4 and not (tmp_path / "cut" / "DONE").exists()
    stamp = (tmp_path / "cut" / "mask.pt").stat().st_mtime_ns
    run_in_process(cut)
    assert (tmp_path / "cut" / "mask.pt").stat().st_mtime_ns == stamp  # not calibrated again
    _assert_same_run(tmp_path / "cut", tmp_path / "whole")


def _assert_same_run(cut, whole):
    assert _rows(cut) == _rows(whole)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("server_app_identity")
def test_a_federation_of_the_wrong_size_fails_the_run_with_one_sentence(tmp_path):
    cfg = _cfg(tmp_path, "wrong", **{"num-rounds": 1})
    four_nodes = InProcessGrid(cfg.replace(num_clients=4))
    with pytest.raises(UserError) as err:
        server_app.run(four_nodes, cfg)
    assert "num-clients=10 but 4 nodes are connected" in str(err.value)
    assert "start exactly 10 supernodes" in str(err.value)
    assert not (tmp_path / "wrong" / "rows.jsonl").exists() and not (tmp_path / "wrong" / "DONE").exists()


def test_make_run_refuses_a_bad_value_in_one_sentence_before_starting_flower(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fed_app.launch", "--run-config", "partition='pathological'"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: run-config partition='pathological' is not one of iid, noniid, dirichlet; pick one of those."
    assert not (tmp_path / "results").exists()  # no SuperLink home, no run directory


def test_make_run_without_cifar_offline_says_where_to_put_it_before_starting_flower(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fed_app.launch", "--run-config",
                           f"data-root='{tmp_path / 'nowhere'}' download=false"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: CIFAR-100 is not under data-root=") and "cifar-100-python" in proc.stderr
    assert "pass --run-config \"data-root=" in proc.stderr  # the fix, as this command takes values
    assert not (tmp_path / "results" / ".flwr").exists()
    assert not (tmp_path / "results").exists()  # the failed start left no folder at any level


@pytest.mark.usefixtures("server_app_identity")
def test_when_discovery_and_the_servers_own_task_both_fail_the_servers_error_comes_first(tmp_path):
    """The server's data and model build while the nodes report their partitions. If both fail (here the
    nodes crash, as a SuperNode reports it, and the server finds no CIFAR-100), the server's error is the one
    raised: it says what to do in one sentence. With the data there, the nodes' failure is the one raised.
    (That the two overlap is what `bench grid`'s stages show, not this test.)"""
    from flwr.app import Error, Message

    from fed_app import server_app
    from fed_app.task.data import DataError

    from ..conftest import PushPullGrid

    class CrashingNodes(PushPullGrid):
        def get_node_ids(self):
            return list(range(1000, 1010))

        def answer(self, messages):
            return [Message(Error(code=0, reason="worker crashed"), reply_to=m) for m in messages]

    missing = _cfg(tmp_path, "missing", dataset="cifar100", download=False, **{"data-root": str(tmp_path / "none")})
    with pytest.raises(DataError, match=r"CIFAR-100 is not under data-root="):
        server_app.run(CrashingNodes(), missing)
    with pytest.raises(RuntimeError, match=r"failed to report its partition: worker crashed"):
        server_app.run(CrashingNodes(), _cfg(tmp_path, "there"))


@pytest.mark.usefixtures("server_app_identity")
def test_with_fedit_profile_set_each_row_says_where_its_round_went(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "profiled", **{"num-rounds": 2})
    server_app.run(InProcessGrid(cfg), cfg)  # unprofiled: rows without the phases
    assert not any(k.startswith("profile_") for r in _rows(tmp_path / "profiled") for k in r)
    monkeypatch.setenv(PROFILE, "1")
    cfg = _cfg(tmp_path, "profile", **{"num-rounds": 2})
    server_app.run(InProcessGrid(cfg), cfg)
    rows = [json.loads(line) for line in (tmp_path / "profile" / "rows.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        phases = {k[len("profile_"):]: v for k, v in row.items() if k.startswith("profile_")}
        evaluated = {"evaluate"} if "val_accuracy" in row else set()  # and the server's evaluation, when it ran
        assert set(phases) == {"send", "exchange", "aggregate", "apply", "client_read", "client_train",
                               "client_write"} | evaluated
        phases.pop("evaluate", None)
        assert all(v >= 0 for v in phases.values()) and phases["client_train"] > 0
        # in process the clients answer inside the exchange, and the server's phases lie inside the round
        work = phases["client_read"] + phases["client_train"] + phases["client_write"]
        assert work <= phases["exchange"] + 1e-6
        assert phases["send"] + phases["exchange"] + phases["aggregate"] + phases["apply"] <= row["round_time"]
    marks = json.loads((tmp_path / "profile" / "profile.json").read_text())  # the fixed cost's stages, in order
    ended = marks.pop("round_ended")  # when each round ended: the CPU sampler's round boundaries
    assert list(marks) == ["claimed", "discovered", "task_loaded", "steps_done", "finished"]
    assert list(marks.values()) == sorted(marks.values())
    assert marks["task_loaded"] < ended[0] < ended[1] < marks["steps_done"]
    assert not (tmp_path / "profiled" / "profile.json").exists()
