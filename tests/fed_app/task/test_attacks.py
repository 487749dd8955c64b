"""Attacks: which clients attack (seeded, fixed for the run), what each sends, the rows that count them, and
one sentence for settings that attack nobody."""

import json

import pytest
import torch
import torch.nn.functional as F

from fed_app import server_app
from fed_app.client_app import trained_entries
from fed_app.config import ConfigError, RunConfig
from fed_app.flower.loaded_task import load_task
from fed_app.flower.payload import Form
from fed_app.task.attacks import flipped_labels, malicious_partitions, poison_
from fed_app.task.seeds import sample_partitions

from ...conftest import InProcessGrid, fl_cfg


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def test_the_malicious_clients_are_a_seeded_share_drawn_once_for_the_run():
    chosen = malicious_partitions(7, 20, 0.25)
    assert len(chosen) == 5 and chosen == malicious_partitions(7, 20, 0.25) and chosen <= set(range(20))
    assert malicious_partitions(8, 20, 0.25) != chosen  # another seed, other clients


def test_each_update_attack_sends_what_it_says():
    honest = _delta()
    flipped, scaled = _delta(), _delta()
    poison_("sign-flip", 4.0, flipped, 1, 3, 2)
    poison_("scaled", 4.0, scaled, 1, 3, 2)
    assert all(torch.equal(flipped[k], -4.0 * honest[k]) and torch.equal(scaled[k], 4.0 * honest[k]) for k in honest)
    noise, again, other = _delta(), _delta(), _delta()
    for d, pid in ((noise, 2), (again, 2), (other, 5)):
        poison_("gaussian", 4.0, d, 1, 3, pid)
    assert all(torch.equal(noise[k], again[k]) for k in noise)  # (seed, round, client): the same on resume
    assert not torch.equal(noise["w"], other["w"])
    rms = torch.cat([v.flatten() for v in honest.values()]).square().mean().sqrt()
    spread = torch.cat([v.flatten() for v in noise.values()]).std()
    assert 0.5 * 4 * rms < spread < 2 * 4 * rms  # noise at s times the update's size


def test_a_label_flipping_client_trains_on_c_minus_1_minus_y():
    logits, labels = torch.randn(6, 10), torch.tensor([0, 1, 2, 7, 8, 9])
    assert torch.equal(flipped_labels(F.cross_entropy, 10)(logits, labels), F.cross_entropy(logits, 9 - labels))


@pytest.mark.usefixtures("server_app_identity")
@pytest.mark.parametrize("attack", ["sign-flip", "label-flip"])
def test_each_row_counts_the_rounds_attackers_and_the_attack_changes_the_run(tmp_path, attack):
    cfg = fl_cfg(tmp_path, attack, attack=attack, **{"attack-fraction": 0.3, "num-rounds": 2, "eval-every": 1})
    server_app.run(InProcessGrid(cfg), cfg)
    rows = [json.loads(line) for line in (tmp_path / attack / "rows.jsonl").read_text().splitlines()]
    bad = malicious_partitions(cfg.seed, cfg.num_clients, cfg.attack_fraction)
    for row in rows[1:]:
        sampled = sample_partitions(cfg.seed, row["round"], cfg.num_clients, cfg.clients_per_round)
        assert row["attackers"] == len(bad & set(sampled))
    honest = fl_cfg(tmp_path, "honest", **{"num-rounds": 2, "eval-every": 1})
    server_app.run(InProcessGrid(honest), honest)
    theirs = [json.loads(line) for line in (tmp_path / "honest" / "rows.jsonl").read_text().splitlines()]
    assert "attackers" not in theirs[1]
    assert any(r["attackers"] for r in rows[1:])  # seed 42 samples attackers in these rounds
    assert rows[-1]["val_loss"] != theirs[-1]["val_loss"]


def test_settings_that_attack_nobody_are_one_sentence():
    for pairs, sentence in {
        (("attack", "sign-flip"),): "attack='sign-flip' with attack-fraction=0.0 attacks nobody; set both "
                                    "(e.g. attack='sign-flip' attack-fraction=0.2) or neither.",
        (("attack-fraction", 0.2),): "attack='none' with attack-fraction=0.2 attacks nobody; set both "
                                     "(e.g. attack='sign-flip' attack-fraction=0.2) or neither.",
        (("attack", "scaled"), ("attack-fraction", 0.004)): "attack-fraction=0.004 of num-clients=100 is no client; "
                                                            "raise it to at least 0.01.",
    }.items():
        with pytest.raises(ConfigError) as err:
            RunConfig.from_run_config(dict(pairs))
        assert str(err.value) == "run-config " + sentence


def test_an_attack_acts_on_what_the_client_trains_as_it_travels(tmp_path):
    task = load_task(fl_cfg(tmp_path, "entries", head="logistic"))
    delta = task.initial_state()
    dense = trained_entries(task, delta)
    assert list(dense) == list(task.trainable_shapes()) and "head.weight" not in dense  # the head is frozen
    assert all(dense[n] is delta[n] for n in dense)  # views: the attack changes what is sent
    sparse = {Form.VALUES: torch.randn(7)}
    assert trained_entries(task, sparse) is sparse  # under a mask: the flat trainable entries, all of them


@pytest.mark.usefixtures("server_app_identity")
def test_a_gaussian_attacker_in_a_dense_run_leaves_the_frozen_head_as_step_0_fitted_it(tmp_path):
    runs = {}
    for name, attack in (("honest", {}), ("gaussian", {"attack": "gaussian", "attack-fraction": 0.3})):
        cfg = fl_cfg(tmp_path, name, head="logistic", **{"num-rounds": 2, "eval-every": 1}, **attack)
        server_app.run(InProcessGrid(cfg), cfg)
        runs[name] = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
    honest, attacked = runs["honest"], runs["gaussian"]
    assert torch.equal(attacked["head.weight"], honest["head.weight"])  # fitted at step 0, then frozen
    assert torch.equal(attacked["head.bias"], honest["head.bias"])
    assert not torch.equal(attacked["blocks.0.attn.qkv.weight"], honest["blocks.0.attn.qkv.weight"])  # it attacked
