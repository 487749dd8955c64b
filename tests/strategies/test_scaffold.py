"""SCAFFOLD (client-algorithm='scaffold'): whole runs of the real ServerApp and ClientApp in process equal a
plain implementation of the paper's algorithm, the clients' control variates are versioned so that a run
stopped mid-round resumes bit for bit, and c stays the mean of the clients' c_i."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from fed_app import server_app
from fed_app.task.batches import batch_stream
from fed_app.config import ConfigError
from fed_app.flower.loaded_task import load_task
from fed_app.task.seeds import client_generator
from strategies.fedavg import sample_partitions
from strategies.scaffold import ControlStore, effective_steps

from ..conftest import InProcessGrid, fl_cfg

pytestmark = pytest.mark.usefixtures("server_app_identity")  # the server's side builds Flower messages

# plain SGD, so that the paper's update y <- y - lr (g - c_i + c) is the reference step for step
PAPER = {"client-algorithm": "scaffold", "momentum": 0.0, "weight-decay": 0.0, "num-rounds": 5, "local-steps": 3,
         "lr": 0.1, "partition": "noniid", "classes-per-client": 10, "checkpoint-every": 2, "eval-every": 5}


def paper_scaffold(cfg):
    """SCAFFOLD as Karimireddy et al. write it (option II), by hand on a copy of the tiny model, with the run's
    batches: (the global model x, the server control c, every client's c_i)."""
    task = load_task(cfg)
    model = copy.deepcopy(task.model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    x = {n: t.clone() for n, t in task.initial_state().items()}
    c = {n: torch.zeros_like(x[n]) for n in names}
    ci = {pid: {n: torch.zeros_like(x[n]) for n in names} for pid in range(cfg.num_clients)}
    K, lr = cfg.local_steps, cfg.lr
    for t in range(1, cfg.num_rounds + 1):
        moves, weights, changes = [], [], []
        for pid in sample_partitions(cfg.seed, t, cfg.num_clients, cfg.clients_per_round):
            model.load_state_dict(x)
            params = dict(model.named_parameters())
            gen = client_generator(task.device, cfg.seed, t, pid, False)
            batches = batch_stream(task.shards[pid], cfg.batch_size, gen)
            for _ in range(K):
                idx = next(batches)
                loss = F.cross_entropy(model(task.train_tf(task.data.train.images[idx], gen)),
                                       task.data.train.labels[idx])
                grads = torch.autograd.grad(loss, [params[n] for n in names])
                with torch.no_grad():
                    for n, g in zip(names, grads):
                        params[n] -= lr * (g - ci[pid][n] + c[n])
            y = {n: v.detach().clone() for n, v in model.state_dict().items()}
            new = {n: ci[pid][n] - c[n] + (x[n] - y[n]) / (K * lr) for n in names}
            changes.append({n: new[n] - ci[pid][n] for n in names})
            ci[pid] = new
            moves.append({n: y[n] - x[n] for n in x})
            weights.append(len(task.shards[pid]))
        x = {n: x[n] + sum(w * m[n] for w, m in zip(weights, moves)) / sum(weights) for n in x}
        c = {n: c[n] + sum(d[n] for d in changes) / cfg.num_clients for n in names}
    return x, torch.cat([c[n].flatten() for n in names]), ci


def test_scaffold_run_equals_the_papers_algorithm_written_by_hand(tmp_path):
    cfg = fl_cfg(tmp_path, "scaffold", **PAPER)
    server_app.run(InProcessGrid(cfg), cfg)
    done = torch.load(tmp_path / "scaffold" / "checkpoint.pt", weights_only=True)
    x, c, _ = paper_scaffold(cfg)
    assert all(torch.allclose(done["model"][n], x[n], atol=1e-5) for n in x)
    assert torch.allclose(done["server_control"], c, atol=1e-5) and c.abs().max() > 1e-3  # c did move
    fedavg_cfg = fl_cfg(tmp_path, "fedavg", **{**PAPER, "client-algorithm": "fedavg"})
    server_app.run(InProcessGrid(fedavg_cfg), fedavg_cfg)
    plain = torch.load(tmp_path / "fedavg" / "checkpoint.pt", weights_only=True)["model"]
    assert max((plain[n] - x[n]).abs().max() for n in x) > 1e-3  # the correction changes the run
    assert not (tmp_path / "scaffold" / "client_state").exists()  # done: the clients' c_i are let go


def _rows(path):  # task_builds counts this test process's loads, not a Flower worker's
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_time") and k != "task_builds"}
            for line in (path / "rows.jsonl").read_text().splitlines()]


def test_a_scaffold_run_stopped_mid_round_resumes_bit_for_bit_from_the_clients_versions(tmp_path):
    whole = fl_cfg(tmp_path, "whole", **PAPER)
    server_app.run(InProcessGrid(whole), whole)
    cut = fl_cfg(tmp_path, "cut", **PAPER)
    with pytest.raises(RuntimeError, match="went away"):  # 3 clients a round: stops inside round 4
        server_app.run(InProcessGrid(cut, fail_after=3 * 3 + 2), cut)
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 2
    store = ControlStore.for_config(cut)
    later = {pid: max(store.versions(pid)) for pid in range(10) if store.versions(pid)}
    assert max(later.values()) == 4  # versions written after the checkpoint, which the resume must not read
    # c at the checkpoint is the mean of the c_i each client had then (zeros for clients yet to train)
    in_force = [store.load(pid, 3) for pid in range(10)]
    mean = sum(v for v in in_force if v is not None) / 10
    assert torch.allclose(checkpoint["server_control"], mean, atol=1e-6)
    server_app.run(InProcessGrid(cut), cut)
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    assert torch.equal(a["server_control"], b["server_control"])


def test_a_client_keeps_only_the_versions_a_resume_can_need(tmp_path):
    store = ControlStore(tmp_path / "client_state")
    for server_round, checkpointed in [(2, 0), (5, 4), (7, 4), (9, 8), (11, 8)]:
        store.save(3, server_round, torch.full((4,), float(server_round)), checkpointed)
    assert sorted(store.versions(3)) == [7, 9, 11]  # 7: in force at the checkpoint of round 8; 9, 11: after it
    assert store.load(3, 9).tolist() == [7.0] * 4 and store.load(3, 12).tolist() == [11.0] * 4
    assert store.load(3, 2) is None and store.load(4, 10) is None  # nothing before: zeros, as never trained
    store.save(3, 9, torch.zeros(4), 8)  # the run stopped in round 12 and resumes from round 8: 11 goes
    assert sorted(store.versions(3)) == [7, 9] and store.load(3, 12).tolist() == [0.0] * 4


def test_scaffold_with_sparse_masks_is_one_sentence():
    with pytest.raises(ConfigError, match=r"client-algorithm='scaffold' .* optimizer='sparse-sgdm' use "
                                          r"client-algorithm='fedavg' \(or optimizer='sgdm'\)\.$"):
        fl_cfg(__import__("pathlib").Path("/tmp"), "x", **{"client-algorithm": "scaffold", "optimizer": "sparse-sgdm",
                                                           "head": "ridge"})


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_the_control_scale_is_how_far_torch_sgd_moves_a_constant_gradient(momentum):
    w = torch.zeros(3, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5])
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=momentum)
    for _ in range(8):
        optimizer.zero_grad()
        (w * g).sum().backward()
        optimizer.step()
    assert torch.allclose(-w.detach() / 0.1, effective_steps(8, momentum) * g, rtol=1e-5)
    assert effective_steps(8, 0.0) == 8  # the paper's K
