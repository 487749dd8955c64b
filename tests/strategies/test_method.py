"""FedAvg's client hook, the local update (strategies/method.py), on the task a process loads once: exactly J
steps on its own shard, no DataLoader, the round's learning rate, FedProx's term."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fed_app.flower.loaded_task import load_task
from strategies.method import local_update

from ..conftest import fl_cfg as _cfg


def test_a_client_takes_exactly_j_optimizer_steps_on_its_own_shard(tmp_path):
    cfg = _cfg(tmp_path, "unit", **{"local-steps": 7})
    task = load_task(cfg)
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        delta, loss, examples = local_update(task, task.initial_state(), partition_id=3, server_round=1)
    finally:
        handle.remove()
    assert len(steps) == 7 and examples == len(task.shards[3]) == 300
    assert any(d.abs().sum() > 0 for d in delta.values())
    again, _, _ = local_update(task, task.initial_state(), partition_id=3, server_round=1)
    assert all(torch.equal(delta[k], again[k]) for k in delta)  # (seed, round, client) fixes the batches
    assert load_task(cfg) is task  # built once per process, reused by every message
    buffer = task.reply_buffer()  # a ClientApp's delta goes into one buffer kept for the process
    into, _, _ = local_update(task, task.initial_state(), partition_id=3, server_round=1, out=buffer)
    assert task.reply_buffer() is buffer and all(t.untyped_storage().data_ptr() == buffer.data_ptr() for t in into.values())
    assert all(torch.equal(delta[k], into[k]) for k in delta)


@pytest.mark.slow
def test_compile_gives_the_eager_update_and_compiles_once_per_worker(tmp_path):
    cfg = _cfg(tmp_path, "unit", **{"local-steps": 12})  # 300 images, batch 32: a pass's short batch too
    eager = load_task(cfg)
    state = eager.initial_state()
    expected, expected_loss, _ = local_update(eager, state, partition_id=3, server_round=1)
    compiled = load_task(cfg.replace(compile=True))
    delta, loss, _ = local_update(compiled, state, partition_id=3, server_round=1)
    assert compiled.trainer is not compiled.model and loss == pytest.approx(expected_loss, rel=1e-5)
    assert all(torch.allclose(delta[k], expected[k], atol=1e-6) for k in delta)
    trainer = compiled.trainer
    local_update(compiled, state, partition_id=4, server_round=2)
    assert compiled.trainer is trainer and load_task(cfg.replace(compile=True)) is compiled


def test_the_client_path_uses_no_dataloader(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a DataLoader was built in the client path")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", refuse)
    task = load_task(_cfg(tmp_path, "unit"))
    state = task.initial_state()
    local_update(task, state, partition_id=0, server_round=1)
    task.evaluate(state, task.shard(0))


def test_round_scheduler_cosine_decays_the_client_lr_over_the_run(tmp_path):
    from fed_app.task.train import client_lr

    cfg = _cfg(tmp_path, "cos", **{"round-scheduler": "cosine", "num-rounds": 8})
    assert [round(client_lr(cfg, t) / cfg.lr, 4) for t in (1, 5, 8)] == [1.0, 0.5, 0.0381]
    assert client_lr(cfg.replace(round_scheduler="constant"), 8) == cfg.lr
    decayed, _, _ = local_update(load_task(cfg), load_task(cfg).initial_state(), partition_id=2, server_round=5)
    plain = load_task(cfg.replace(round_scheduler="constant", lr=cfg.lr * 0.5))  # the same round at half the lr
    expected, _, _ = local_update(plain, plain.initial_state(), partition_id=2, server_round=5)
    assert all(torch.equal(decayed[k], expected[k]) for k in expected)


def test_fedprox_update_equals_a_hand_written_proximal_sgd_and_mu_0_is_fedavg(tmp_path, monkeypatch):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from strategies import method
    from strategies.method import proximal

    cfg = _cfg(tmp_path, "prox", **{"local-steps": 4, "lr": 0.2})
    plain = load_task(cfg)
    start = plain.initial_state()
    fedavg, _, _ = local_update(plain, start, partition_id=1, server_round=2)
    mu = 0.5
    # the reference: plain cross-entropy steps, each gradient given mu * (w - w_global) by hand
    anchor = {n: start[n] for n, p in plain.model.named_parameters() if p.requires_grad}
    params = {p: n for n, p in plain.model.named_parameters() if p.requires_grad}

    def add_prox(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad.add_(p.detach() - anchor[params[p]], alpha=mu)

    handle = register_optimizer_step_pre_hook(add_prox)
    try:
        by_hand, _, _ = local_update(plain, start, partition_id=1, server_round=2)
    finally:
        handle.remove()
    prox, _, _ = local_update(load_task(cfg.replace(prox_mu=mu)), start, partition_id=1, server_round=2)
    assert all(torch.allclose(prox[k], by_hand[k], atol=1e-6) for k in prox)
    assert max((prox[k] - fedavg[k]).abs().max() for k in prox) > 1e-4  # the proximal term does pull
    # mu = 0 through the proximal objective itself: the update is the FedAvg one, bit for bit
    monkeypatch.setattr(method, "proximal", lambda objective, model, _: proximal(objective, model, 0.0))
    zero, _, _ = local_update(load_task(cfg.replace(prox_mu=1e-30)), start, partition_id=1, server_round=2)
    assert all(torch.equal(zero[k], fedavg[k]) for k in fedavg)
